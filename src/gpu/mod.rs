//! The WebGPU backend: device context, tensors in storage buffers, and kernels.
//!
//! Each kernel is a small struct that knows its WGSL source (in `shaders/`, loaded with
//! `include_str!`), its bindings and its dispatch size, and is tested against a CPU reference.

pub mod context;
pub mod device;
pub(crate) mod kernels;
pub(crate) mod tensor;

use wgpu::util::DeviceExt;

pub use context::{AdapterKind, GpuContext, GpuFeatures};
pub use device::WgpuDevice;
pub(crate) use tensor::GpuIndices;
pub use tensor::GpuTensor;

/// Most workgroups along one dispatch axis (WebGPU's default limit).
const MAX_GROUPS_PER_AXIS: usize = 65535;

/// A dispatch of `groups` workgroups as a 2-d grid `[x, y, 1]` with `x <= 65535`; kernels
/// recover the linear workgroup index as `wid.y * num_workgroups.x + wid.x` and skip the excess.
pub(crate) fn grid(groups: usize) -> [u32; 3] {
    let groups = groups.max(1);
    let y = groups.div_ceil(MAX_GROUPS_PER_AXIS);
    [groups.div_ceil(y) as u32, y as u32, 1]
}

/// A compiled compute pipeline (bind group 0, bindings in declaration order).
pub(crate) struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

impl Pipeline {
    /// Compiles the entry point `entry` of `source`.
    pub fn new(ctx: &GpuContext, source: &str, entry: &str) -> Self {
        Self::with_constants(ctx, source, entry, &[])
    }

    /// Compiles `entry` with pipeline-overridable constants (`override NAME` in WGSL) set.
    pub fn with_constants(
        ctx: &GpuContext,
        source: &str,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Self {
        let label = entry;
        // a shader the device rejects is kept as the context's error (returned by the next
        // `wait` or `check`: WgpuDevice::new checks after compiling every kernel), not a panic;
        // the invalid pipeline is never run (its dispatches are rejected too)
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = ctx
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = ctx
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            ctx.record_error(&format!("compiling kernel `{entry}`"), &e.to_string());
        }
        let layout = pipeline.get_bind_group_layout(0);
        Self { pipeline, layout }
    }

    /// Runs one dispatch of `workgroups` with `buffers` bound at 0, 1, 2, ... and a uniform
    /// block of `params` (padded to 16 bytes) bound after them.
    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        buffers: &[&wgpu::Buffer],
        params: &[u32],
        workgroups: [u32; 3],
    ) {
        // Uniform blocks are sized in 16-byte steps; unused trailing words are zero.
        let mut padded = params.to_vec();
        padded.resize(params.len().div_ceil(4).max(1) * 4, 0);
        let uniform = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::cast_slice(&padded),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let mut entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        entries.push(wgpu::BindGroupEntry {
            binding: buffers.len() as u32,
            resource: uniform.as_entire_binding(),
        });
        let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &self.layout,
            entries: &entries,
        });
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        ctx.queue.submit([encoder.finish()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_cover_every_workgroup() {
        for groups in [0usize, 1, 65535, 65536, 200_000, 10_000_000] {
            let [x, y, _] = grid(groups);
            assert!(x as usize <= MAX_GROUPS_PER_AXIS);
            assert!(x as usize * y as usize >= groups.max(1));
        }
    }
}
