//! Rotary position embedding, rotate-half form (`shaders/rope.wgsl`).

use super::expect_len;
use crate::error::{Error, Result};
use crate::gpu::{grid, GpuContext, GpuTensor, Pipeline};

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/rope.wgsl");

/// RoPE applied in place to every head of `x [rows, heads * head_dim]`, with host tables
/// from [`crate::device::rope_tables`].
pub struct Rope {
    pipeline: Pipeline,
}

impl Rope {
    /// Compiles the kernel.
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            pipeline: Pipeline::new(ctx, SOURCE, "main"),
        }
    }

    /// Rotates `x` with tables `cos`, `sin` of shape `[rows, head_dim / 2]`.
    pub fn run(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        cos: &GpuTensor,
        sin: &GpuTensor,
        head_dim: usize,
    ) -> Result<()> {
        let &[rows, width] = x.shape.as_slice() else {
            return Err(Error::invalid("rope", "x must be 2-d"));
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) || width % head_dim != 0 {
            return Err(Error::invalid(
                "rope",
                format!("head_dim {head_dim} for width {width}"),
            ));
        }
        expect_len(cos, rows * head_dim / 2, "rope cos table")?;
        expect_len(sin, rows * head_dim / 2, "rope sin table")?;
        let heads = width / head_dim;
        let params = [rows as u32, heads as u32, head_dim as u32];
        self.pipeline.dispatch(
            ctx,
            &[&x.buffer, &cos.buffer, &sin.buffer],
            &params,
            grid((rows * heads * head_dim / 2).div_ceil(256)),
        );
        Ok(())
    }
}
