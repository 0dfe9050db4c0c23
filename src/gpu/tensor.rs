//! f32 tensors in device storage buffers: upload, download, and poisoned outputs for tests.

use wgpu::util::DeviceExt;

use super::context::GpuContext;
use crate::error::{Error, Result};

/// A row-major f32 tensor in one storage buffer (cloning shares the buffer).
#[derive(Clone)]
pub struct GpuTensor {
    /// The buffer (storage, copy source and destination).
    pub(crate) buffer: wgpu::Buffer,
    /// Row-major shape.
    pub(crate) shape: Vec<usize>,
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl GpuTensor {
    /// Row-major shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn check_fits(ctx: &GpuContext, bytes: u64) -> Result<()> {
        if bytes > ctx.max_binding_bytes() {
            return Err(Error::invalid(
                "tensor",
                format!(
                    "{bytes} bytes exceed the adapter's {}-byte storage binding",
                    ctx.max_binding_bytes()
                ),
            ));
        }
        Ok(())
    }

    /// Uploads `data` (row-major `shape`).
    pub fn upload(ctx: &GpuContext, data: &[f32], shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::invalid(
                "tensor",
                format!("{} values for shape {shape:?}", data.len()),
            ));
        }
        // wgpu rejects empty storage bindings: keep one element at least.
        let padded;
        let contents: &[f32] = if data.is_empty() {
            padded = [0f32];
            &padded
        } else {
            data
        };
        let bytes = (contents.len() * 4) as u64;
        Self::check_fits(ctx, bytes)?;
        let buffer = ctx.scoped(&format!("allocating a {bytes}-byte tensor"), || {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(contents),
                    usage: USAGE,
                })
        })?;
        Ok(Self {
            buffer,
            shape: shape.to_vec(),
        })
    }

    /// A zero-filled tensor (wgpu zero-initializes new buffers).
    pub fn zeros(ctx: &GpuContext, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        let bytes = (n.max(1) * 4) as u64;
        Self::check_fits(ctx, bytes)?;
        let buffer = ctx.scoped(&format!("allocating a {bytes}-byte tensor"), || {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: bytes,
                usage: USAGE,
                mapped_at_creation: false,
            })
        })?;
        Ok(Self {
            buffer,
            shape: shape.to_vec(),
        })
    }

    /// An output tensor filled with NaN, so that any element a kernel fails to write shows.
    pub fn poisoned(ctx: &GpuContext, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        Self::upload(ctx, &vec![f32::NAN; n], shape)
    }

    /// Copies the tensor back to the host (blocks until the queue is idle).
    pub fn download(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        let words = download_words(ctx, &self.buffer, self.numel())?;
        Ok(words.into_iter().map(f32::from_bits).collect())
    }
}

/// Copies the first `count` 32-bit words of a storage buffer back to the host.
pub fn download_words(ctx: &GpuContext, buffer: &wgpu::Buffer, count: usize) -> Result<Vec<u32>> {
    let bytes = (count.max(1) * 4) as u64;
    let mut out = download_ranges(ctx, &[(buffer, 0, bytes)])?;
    let mut words: Vec<u32> = bytemuck::pod_collect_to_vec(&out.pop().unwrap_or_default());
    words.truncate(count);
    Ok(words)
}

/// Copies byte ranges `(buffer, offset, len)` (offsets and lengths multiples of 4) back to the
/// host in one transfer, once the queue has finished writing them.
pub fn download_ranges(
    ctx: &GpuContext,
    ranges: &[(&wgpu::Buffer, u64, u64)],
) -> Result<Vec<Vec<u8>>> {
    let total: u64 = ranges.iter().map(|r| r.2).sum();
    if total == 0 {
        return Ok(ranges.iter().map(|_| Vec::new()).collect());
    }
    let staging = ctx.scoped(
        &format!("allocating a {total}-byte download buffer"),
        || {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("download"),
                size: total,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        },
    )?;
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut at = 0;
    for &(buffer, offset, len) in ranges {
        if len > 0 {
            encoder.copy_buffer_to_buffer(buffer, offset, &staging, at, len);
        }
        at += len;
    }
    ctx.queue.submit([encoder.finish()]);
    let all = map_read(ctx, &staging)?;
    let mut at = 0usize;
    Ok(ranges
        .iter()
        .map(|&(_, _, len)| {
            let part = all[at..at + len as usize].to_vec();
            at += len as usize;
            part
        })
        .collect())
}

/// Maps a `MAP_READ` buffer once the queue has finished writing it and copies it out.
fn map_read(ctx: &GpuContext, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
    let slice = staging.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.wait()?;
    rx.recv()
        .map_err(|_| Error::invalid("gpu", "map callback dropped"))?
        .map_err(|e| Error::invalid("gpu", format!("map failed: {e}")))?;
    let view = slice
        .get_mapped_range()
        .map_err(|e| Error::invalid("gpu", format!("mapped range: {e}")))?;
    let out = view.to_vec();
    drop(view);
    staging.unmap();
    Ok(out)
}

/// u32 data (token ids, positions, per-row attention info) in a storage buffer.
pub struct GpuIndices {
    /// The buffer.
    pub(crate) buffer: wgpu::Buffer,
    /// Number of values.
    pub(crate) len: usize,
}

impl GpuIndices {
    /// Uploads `data` (an empty slice becomes one zero, as empty bindings are invalid).
    pub fn upload(ctx: &GpuContext, data: &[u32]) -> Self {
        let contents: &[u32] = if data.is_empty() { &[0] } else { data };
        let buffer = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("indices"),
                contents: bytemuck::cast_slice(contents),
                usage: wgpu::BufferUsages::STORAGE,
            });
        Self {
            buffer,
            len: data.len(),
        }
    }
}
