//! Kernels, one family per file, each with its WGSL source in `shaders/` and a CPU reference
//! in `crate::reference::ops` that the tests compare against.

pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod kv_f16;
pub mod kv_quant;
pub mod logprob;
pub mod matmul;
pub mod matmul_blocks;
pub mod matmul_q;
pub mod norm;
pub mod rope;
#[cfg(test)]
mod tests;

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};

/// Checks that a row kernel whose 64 lanes each walk `len` values `loops` times (plus a tree
/// reduction of 6 steps per loop) stays within the adapter's loop budget
/// ([`GpuContext::loop_budget`]): `loops * (ceil(len / 64) + 6) <= budget`.
fn check_row_loops(ctx: &GpuContext, len: usize, loops: usize, what: &str) -> Result<()> {
    let iterations = loops * (len.div_ceil(64) + 6);
    if iterations > ctx.loop_budget() {
        return Err(Error::Unsupported {
            what: format!(
                "{what} over rows of {len} values on this adapter ({iterations} loop \
                 iterations per invocation, budget {})",
                ctx.loop_budget()
            ),
        });
    }
    Ok(())
}

/// A zeroed storage buffer of `words` u32 words for a KV cache (`kind` names its format in
/// errors), refused when it exceeds one binding.
fn cache_buffer(ctx: &GpuContext, words: usize, kind: &str) -> Result<wgpu::Buffer> {
    let bytes = (words.max(1) * 4) as u64;
    if bytes > ctx.max_binding_bytes() {
        return Err(Error::invalid(
            "KV cache",
            "a layer's cache exceeds one binding",
        ));
    }
    ctx.scoped(
        &format!("allocating {bytes} bytes of {kind} KV cache"),
        || {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kv cache"),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        },
    )
}

/// Checks that `t` holds `n` elements.
fn expect_len(t: &GpuTensor, n: usize, what: &str) -> Result<()> {
    if t.numel() != n {
        return Err(Error::invalid(
            what,
            format!(
                "tensor of shape {:?} where {n} elements are needed",
                t.shape
            ),
        ));
    }
    Ok(())
}
