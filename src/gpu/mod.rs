//! The WebGPU backend: device context, tensors in storage buffers, and kernels.
//!
//! Each kernel is a small struct that knows its WGSL source (in `shaders/`, loaded with
//! `include_str!`), its bindings and its dispatch size, and is tested against a CPU reference.

pub mod context;
pub mod kernels;
pub mod tensor;

use wgpu::util::DeviceExt;

pub use context::{AdapterKind, GpuContext, GpuFeatures};
pub use tensor::GpuTensor;

/// A compiled compute pipeline (bind group 0, bindings in declaration order).
pub struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

impl Pipeline {
    /// Compiles `source`'s `main` entry point.
    pub fn new(ctx: &GpuContext, label: &str, source: &str) -> Self {
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
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        let layout = pipeline.get_bind_group_layout(0);
        Self { pipeline, layout }
    }

    /// Runs one dispatch of `workgroups` with `buffers` bound at 0, 1, 2, ... and a uniform
    /// block of `params` bound after them.
    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        buffers: &[&wgpu::Buffer],
        params: &[u32],
        workgroups: [u32; 3],
    ) {
        let uniform = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::cast_slice(params),
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
