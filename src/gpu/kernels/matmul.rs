//! f32 linear layer `y = x W^T` (see `shaders/matmul_f32.wgsl` for the indexing).

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Pipeline};

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/matmul_f32.wgsl");

/// Outputs per invocation along each axis (the register tile is `TILE x TILE`).
const TILE: usize = 4;
/// Workgroup size along each axis.
const WORKGROUP: usize = 8;

/// The f32 matrix product `x [m, k] . W [n, k]^T -> y [m, n]`.
pub struct MatmulF32 {
    pipeline: Pipeline,
}

impl MatmulF32 {
    /// Compiles the kernel.
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            pipeline: Pipeline::new(ctx, "matmul_f32", SOURCE),
        }
    }

    /// Workgroups for an `[m, n]` output: each covers `(TILE * WORKGROUP)^2` outputs.
    pub fn workgroups(m: usize, n: usize) -> [u32; 3] {
        let span = TILE * WORKGROUP;
        [n.div_ceil(span) as u32, m.div_ceil(span) as u32, 1]
    }

    /// Computes `y = x W^T` into the poison-able output `y`.
    pub fn run(&self, ctx: &GpuContext, x: &GpuTensor, w: &GpuTensor, y: &GpuTensor) -> Result<()> {
        let (&[m, k], &[n, k2], &[m2, n2]) =
            (x.shape.as_slice(), w.shape.as_slice(), y.shape.as_slice())
        else {
            return Err(Error::invalid("matmul", "x, W and y must be 2-d"));
        };
        if k != k2 || m != m2 || n != n2 {
            return Err(Error::invalid(
                "matmul",
                format!(
                    "shapes x {:?}, W {:?}, y {:?} do not agree",
                    x.shape, w.shape, y.shape
                ),
            ));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dims = [m as u32, k as u32, n as u32, 0];
        self.pipeline.dispatch(
            ctx,
            &[&x.buffer, &w.buffer, &y.buffer],
            &dims,
            Self::workgroups(m, n),
        );
        Ok(())
    }
}
