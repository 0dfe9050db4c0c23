//! Kernels, one family per file, each with its WGSL source in `shaders/` and a CPU reference
//! in `crate::cpu::ops` that the tests compare against.

pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod kv_quant;
pub mod logprob;
pub mod matmul;
pub mod matmul_q;
pub mod norm;
pub mod rope;

use crate::error::{Error, Result};
use crate::gpu::GpuTensor;

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
