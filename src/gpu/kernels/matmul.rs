//! f32 linear layer `y = x W^T` (see `shaders/matmul_f32.wgsl` for the indexing).

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Pipeline};

/// WGSL source (any k).
pub const SOURCE: &str = include_str!("../../../shaders/matmul_f32.wgsl");
/// WGSL source for k a multiple of 4 (vec4 loads along k).
pub const SOURCE_VEC4: &str = include_str!("../../../shaders/matmul_f32_vec4.wgsl");

/// Outputs per invocation along each axis (the register tile is `TILE x TILE`).
const TILE: usize = 4;
/// Workgroup size along each axis.
const WORKGROUP: usize = 8;

/// The f32 matrix product `x [m, k] . W [n, k]^T -> y [m, n]`.
pub struct MatmulF32 {
    scalar: Pipeline,
    vec4: Pipeline,
}

impl MatmulF32 {
    /// Compiles the kernel.
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            scalar: Pipeline::new(ctx, SOURCE, "main"),
            vec4: Pipeline::new(ctx, SOURCE_VEC4, "main"),
        }
    }

    /// Workgroups for an `[m, n]` output: each covers `(TILE * WORKGROUP)^2` outputs.
    pub fn workgroups(m: usize, n: usize) -> [u32; 3] {
        let span = TILE * WORKGROUP;
        [n.div_ceil(span) as u32, m.div_ceil(span) as u32, 1]
    }

    /// Computes `x W^T` into columns `y_offset .. y_offset + n` of `y [m, total]`.
    pub fn run(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
        y_offset: usize,
    ) -> Result<()> {
        let (&[m, k], &[n, k2], &[m2, total]) =
            (x.shape.as_slice(), w.shape.as_slice(), y.shape.as_slice())
        else {
            return Err(Error::invalid("matmul", "x, W and y must be 2-d"));
        };
        if k != k2 || m != m2 || y_offset + n > total {
            return Err(Error::invalid(
                "matmul",
                format!(
                    "shapes x {:?}, W {:?}, y {:?} (column offset {y_offset}) do not agree",
                    x.shape, w.shape, y.shape
                ),
            ));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dims = [m, k, n, total, y_offset].map(|v| v as u32);
        let pipeline = if k % 4 == 0 { &self.vec4 } else { &self.scalar };
        pipeline.dispatch(
            ctx,
            &[&x.buffer, &w.buffer, &y.buffer],
            &dims,
            Self::workgroups(m, n),
        );
        Ok(())
    }
}
