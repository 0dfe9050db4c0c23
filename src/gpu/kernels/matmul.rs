//! f32 linear layer `y = x W^T` (see `shaders/matmul_f32.wgsl` for the indexing).

use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::gpu::{AdapterKind, GpuContext, GpuTensor, Pipeline};
use crate::layout::passes;

/// WGSL source (any k).
pub const SOURCE: &str = concat!(
    include_str!("../../../shaders/matmul_f32_common.wgsl"),
    include_str!("../../../shaders/matmul_f32.wgsl")
);
/// WGSL source for k a multiple of 4 (vec4 loads along k).
pub const SOURCE_VEC4: &str = concat!(
    include_str!("../../../shaders/matmul_f32_common.wgsl"),
    include_str!("../../../shaders/matmul_f32_vec4.wgsl")
);
/// WGSL source of the workgroup-tiled variant for real GPUs.
pub const SOURCE_TILED: &str = concat!(
    include_str!("../../../shaders/matmul_f32_common.wgsl"),
    include_str!("../../../shaders/matmul_f32_tiled.wgsl")
);

/// Which f32 kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulVariant {
    /// Register tiles, no workgroup memory or barriers (fast on CPU adapters such as lavapipe).
    Register,
    /// Workgroup-memory tiles with barriers (the classic GPU kernel).
    Tiled,
}

impl MatmulVariant {
    /// The variant suited to an adapter kind.
    pub fn for_adapter(kind: AdapterKind) -> Self {
        match kind {
            AdapterKind::Cpu => MatmulVariant::Register,
            AdapterKind::Gpu => MatmulVariant::Tiled,
        }
    }
}

/// Length of the k range one matrix-product dispatch covers: a quarter of the loop budget
/// (the kernels spend fewer than 4 loop iterations per k even where the compiler does not
/// unroll their inner loops; measured on lavapipe: k = 16,384 exact, 65,536 truncated in one
/// pass), rounded down to whole groups of 64 so that no quantization group straddles passes.
pub(crate) fn k_per_pass(ctx: &GpuContext) -> usize {
    (ctx.loop_budget() / 4 / 64).max(1) * 64
}

/// Outputs per invocation along each axis (the register tile is `TILE x TILE`).
const TILE: usize = 4;
/// Workgroup size along each axis.
const WORKGROUP: usize = 8;

/// The f32 matrix product `x [m, k] . W [n, k]^T -> y [m, n]`.
pub struct MatmulF32 {
    variant: MatmulVariant,
    /// `[scalar, vec4, tiled]`.
    pipelines: [Pipeline; 3],
    /// The same, adding to y: the k passes after the first (compiled when first needed).
    accumulating: OnceLock<[Pipeline; 3]>,
}

/// The scalar, vec4 and tiled kernels.
fn compile(ctx: &GpuContext, accumulate: bool) -> [Pipeline; 3] {
    let c = [("ACCUMULATE", f64::from(u8::from(accumulate)))];
    [SOURCE, SOURCE_VEC4, SOURCE_TILED].map(|s| Pipeline::with_constants(ctx, s, "main", &c))
}

impl MatmulF32 {
    /// Compiles the kernels, running the variant suited to the adapter.
    pub fn new(ctx: &GpuContext) -> Self {
        Self::with_variant(ctx, MatmulVariant::for_adapter(ctx.kind))
    }

    /// Compiles the kernels, running `variant` (tests run both on any adapter).
    pub fn with_variant(ctx: &GpuContext, variant: MatmulVariant) -> Self {
        Self {
            variant,
            pipelines: compile(ctx, false),
            accumulating: OnceLock::new(),
        }
    }

    /// The variant this instance runs.
    #[cfg(test)]
    pub fn variant(&self) -> MatmulVariant {
        self.variant
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
        let buffers = [&x.buffer, &w.buffer, &y.buffer];
        for (p, ks) in passes(k, k_per_pass(ctx)).into_iter().enumerate() {
            let dims = [m, k, n, total, y_offset, ks.start, ks.end].map(|v| v as u32);
            let [scalar, vec4, tiled] = if p == 0 {
                &self.pipelines
            } else {
                self.accumulating.get_or_init(|| compile(ctx, true))
            };
            match self.variant {
                // 64 x 64 outputs per 16 x 16 workgroup
                MatmulVariant::Tiled => tiled.dispatch(
                    ctx,
                    &buffers,
                    &dims,
                    [n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1],
                ),
                MatmulVariant::Register => {
                    let pipeline = if k % 4 == 0 { vec4 } else { scalar };
                    pipeline.dispatch(ctx, &buffers, &dims, Self::workgroups(m, n));
                }
            }
        }
        Ok(())
    }
}
