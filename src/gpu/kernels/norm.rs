//! LayerNorm and RMSNorm over rows (`shaders/norm.wgsl`).

use super::expect_len;
use crate::error::{Error, Result};
use crate::gpu::{grid, GpuContext, GpuTensor, Pipeline};

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/norm.wgsl");

/// The two row norms.
pub struct Norm {
    layer: Pipeline,
    rms: Pipeline,
}

fn rows_width(ctx: &GpuContext, x: &GpuTensor, y: &GpuTensor) -> Result<(usize, usize)> {
    let &[rows, width] = x.shape.as_slice() else {
        return Err(Error::invalid("norm", "x must be 2-d"));
    };
    expect_len(y, rows * width, "norm output")?;
    super::check_row_loops(ctx, width, 3, "normalization")?;
    Ok((rows, width))
}

impl Norm {
    /// Compiles both.
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            layer: Pipeline::new(ctx, SOURCE, "layer_norm"),
            rms: Pipeline::new(ctx, SOURCE, "rms_norm"),
        }
    }

    /// `y = LayerNorm(x) * w + b` per row of `x [rows, width]`.
    pub fn layer_norm(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        w: &GpuTensor,
        b: &GpuTensor,
        y: &GpuTensor,
        eps: f32,
    ) -> Result<()> {
        let (rows, width) = rows_width(ctx, x, y)?;
        expect_len(w, width, "LayerNorm weight")?;
        expect_len(b, width, "LayerNorm bias")?;
        let params = [rows as u32, width as u32, eps.to_bits()];
        self.layer.dispatch(
            ctx,
            &[&x.buffer, &w.buffer, &b.buffer, &y.buffer],
            &params,
            grid(rows),
        );
        Ok(())
    }

    /// `y = x / rms(x) * w` per row of `x [rows, width]`.
    pub fn rms_norm(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
        eps: f32,
    ) -> Result<()> {
        let (rows, width) = rows_width(ctx, x, y)?;
        expect_len(w, width, "RMSNorm weight")?;
        let params = [rows as u32, width as u32, eps.to_bits()];
        // binding 2 (LayerNorm's bias) is unused by rms_norm; the weight fills it
        self.rms.dispatch(
            ctx,
            &[&x.buffer, &w.buffer, &w.buffer, &y.buffer],
            &params,
            grid(rows),
        );
        Ok(())
    }
}
