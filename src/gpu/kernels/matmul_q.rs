//! Linear layers with packed weights (4-bit, 8-bit or f16 codes), decoded inside the kernel
//! (`shaders/matmul_q.wgsl`).
//!
//! [`PackedWeight`] is the kernel's layout: per row of `W [n, k]`, `padded_k` codes of `bits`
//! (4, 8 or 16) packed little-endian into u32 words, and per group of `group` codes one u32
//! `pack2x16float(step, min)`; a value is `code * step + min`, a 16-bit code being an IEEE half.
//! Every source format maps onto it without requantizing (only bits move):
//! - FlexGen 4-bit groups along `k` ([`Group4`] with `group_dim = 1`): codes and (step, min) as
//!   stored;
//! - GGUF Q4_1 (`d * q + m`): step `d`, min `m`; nibbles reordered (GGUF puts value `j` and
//!   `j + 16` in one byte);
//! - GGUF Q4_0 (`d * (q - 8)`): step `d`, min `-8 d` (exact in f16);
//! - GGUF Q8_0 (`d * q`, q signed): 8-bit codes `q + 128`, step `d`, min `-128 d` (exact);
//! - f16 tensors: the halves as stored, in groups of 64 with step 1 and min 0 (half the bytes
//!   of f32; the scales add 1/32 of a byte per value).

use std::sync::OnceLock;

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Pipeline};
use crate::layout::passes;
pub use crate::layout::PackedWeight;

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/matmul_q.wgsl");

/// WGSL of the subgroup variant (entry `main_subgroup`), appended to [`SOURCE`].
pub const SUBGROUP_SOURCE: &str = include_str!("../../../shaders/matmul_q_subgroup.wgsl");

/// A [`PackedWeight`] on the device (cloning shares the buffers).
#[derive(Clone)]
pub struct GpuPackedWeight {
    codes: wgpu::Buffer,
    scales: wgpu::Buffer,
    /// Its shape and format (codes and scales dropped).
    pub meta: PackedWeight,
}

impl GpuPackedWeight {
    /// Wraps buffers already holding `meta`'s codes and scales (in [`PackedWeight`]'s layout).
    pub(crate) fn from_buffers(
        codes: wgpu::Buffer,
        scales: wgpu::Buffer,
        meta: PackedWeight,
    ) -> Self {
        Self {
            codes,
            scales,
            meta,
        }
    }

    /// Uploads a packed weight.
    pub fn upload(ctx: &GpuContext, w: PackedWeight) -> Result<Self> {
        for (what, words) in [("codes", w.codes.len()), ("scales", w.scales.len())] {
            if (words * 4) as u64 > ctx.max_binding_bytes() {
                return Err(Error::invalid(
                    "quantized weight",
                    format!("{what} exceed one binding"),
                ));
            }
        }
        let buffer = |data: &[u32]| {
            let data: &[u32] = if data.is_empty() { &[0] } else { data };
            ctx.scoped("allocating a packed weight", || {
                ctx.device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("packed weight"),
                        contents: bytemuck::cast_slice(data),
                        usage: wgpu::BufferUsages::STORAGE,
                    })
            })
        };
        let (codes, scales) = (buffer(&w.codes)?, buffer(&w.scales)?);
        let meta = PackedWeight {
            codes: Vec::new(),
            scales: Vec::new(),
            ..w
        };
        Ok(Self {
            codes,
            scales,
            meta,
        })
    }
}

/// Which compilation of the quantized kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulQVariant {
    /// Every lane loads each x value itself (any adapter).
    Plain,
    /// Lanes load 8 x values between them and share them by `subgroupBroadcast`
    /// (`shaders/matmul_q_subgroup.wgsl`); needs subgroups of at least 8 invocations.
    Subgroup,
}

impl MatmulQVariant {
    /// The fastest variant the context offers: [`Subgroup`](Self::Subgroup) where subgroups are
    /// enabled (not forced off by `FERROGEN_GPU_FALLBACK=1`) and at least 8 wide.
    pub fn for_context(ctx: &GpuContext) -> Self {
        if ctx.features.subgroups && ctx.info.subgroup_min_size >= 8 {
            Self::Subgroup
        } else {
            Self::Plain
        }
    }
}

/// The quantized-weight matrix product: tiles of 8 rows of x, of 4 for 4 to 7 rows, and of 1
/// for fewer (decode), for 4-, 8- and 16-bit codes: nine compilations of the same source.
pub struct MatmulQ {
    #[cfg_attr(not(test), allow(dead_code))] // read by the tests, which run every variant
    variant: MatmulQVariant,
    /// `[rows8, rows4, matvec]` for 4-, 8- and 16-bit codes.
    pipelines: [[Pipeline; 3]; 3],
    /// The same, adding to y: the k passes after the first (compiled when first needed).
    accumulating: OnceLock<[[Pipeline; 3]; 3]>,
    source: String,
    entry: &'static str,
}

/// The nine compilations of the quantized kernel (`[bits][rows]`).
fn compile(ctx: &GpuContext, source: &str, entry: &str, accumulate: bool) -> [[Pipeline; 3]; 3] {
    let acc = f64::from(u8::from(accumulate));
    [4.0, 8.0, 16.0].map(|bits| {
        [8.0, 4.0, 1.0].map(|rows| {
            Pipeline::with_constants(
                ctx,
                source,
                entry,
                &[("ROWS", rows), ("BITS", bits), ("ACCUMULATE", acc)],
            )
        })
    })
}

impl MatmulQ {
    /// Compiles the kernel in the variant suited to the context.
    pub fn new(ctx: &GpuContext) -> Self {
        Self::build(ctx, MatmulQVariant::for_context(ctx))
    }

    /// Compiles `variant` (tests run both); [`MatmulQVariant::Subgroup`] without usable
    /// subgroups is an error.
    #[cfg(test)]
    pub fn with_variant(ctx: &GpuContext, variant: MatmulQVariant) -> Result<Self> {
        if variant == MatmulQVariant::Subgroup && MatmulQVariant::for_context(ctx) != variant {
            return Err(Error::invalid(
                "matmul_q",
                format!(
                    "the subgroup variant needs subgroups of 8 or more invocations: {}",
                    ctx.describe()
                ),
            ));
        }
        Ok(Self::build(ctx, variant))
    }

    fn build(ctx: &GpuContext, variant: MatmulQVariant) -> Self {
        let (source, entry) = match variant {
            MatmulQVariant::Plain => (SOURCE.to_string(), "main"),
            MatmulQVariant::Subgroup => (format!("{SOURCE}\n{SUBGROUP_SOURCE}"), "main_subgroup"),
        };
        Self {
            variant,
            pipelines: compile(ctx, &source, entry, false),
            accumulating: OnceLock::new(),
            source,
            entry,
        }
    }

    /// The variant this instance runs.
    #[cfg(test)]
    pub fn variant(&self) -> MatmulQVariant {
        self.variant
    }

    /// Workgroups for `m` rows of x and `n` output columns: 64 column tiles of 4 along x,
    /// row tiles of `rows` along y (`[ceil(n / 256), ceil(m / rows), 1]`).
    pub fn workgroups(m: usize, n: usize, rows: usize) -> [u32; 3] {
        [n.div_ceil(256) as u32, m.div_ceil(rows) as u32, 1]
    }

    /// `x [m, k] . W^T` into columns `y_offset .. y_offset + n` of `y [m, total]`.
    pub fn run(
        &self,
        ctx: &GpuContext,
        x: &GpuTensor,
        w: &GpuPackedWeight,
        y: &GpuTensor,
        y_offset: usize,
    ) -> Result<()> {
        let meta = &w.meta;
        let (&[m, k], &[m2, total]) = (x.shape.as_slice(), y.shape.as_slice()) else {
            return Err(Error::invalid("matmul", "x and y must be 2-d"));
        };
        if k != meta.k || m != m2 || y_offset + meta.rows > total {
            return Err(Error::invalid(
                "matmul",
                format!(
                    "x {:?} and y {:?} do not fit a {} x {} weight",
                    x.shape, y.shape, meta.rows, meta.k
                ),
            ));
        }
        if m == 0 || meta.rows == 0 {
            return Ok(());
        }
        let bits = match meta.bits {
            4 => 0,
            8 => 1,
            _ => 2,
        };
        let (tile, rows) = match m {
            0..4 => (2, 1),
            4..8 => (1, 4),
            _ => (0, 8),
        };
        // passes of whole groups (k_per_pass is a multiple of 64; groups are 32 or 64)
        if !super::matmul::k_per_pass(ctx).is_multiple_of(meta.group.max(1)) {
            return Err(Error::invalid(
                "matmul",
                format!("group of {} values does not divide a k pass", meta.group),
            ));
        }
        let full = k / meta.group; // groups lying wholly inside k
        for (p, ks) in passes(k, super::matmul::k_per_pass(ctx))
            .into_iter()
            .enumerate()
        {
            let (g_begin, g_end) = (ks.start / meta.group, (ks.end / meta.group).min(full));
            let partial = ks.end == k && full * meta.group < k;
            let dims = [
                m,
                k,
                meta.rows,
                total,
                y_offset,
                meta.padded_k,
                meta.group,
                meta.bits as usize,
                g_begin,
                g_end,
                usize::from(partial),
            ]
            .map(|v| v as u32);
            let pipelines = if p == 0 {
                &self.pipelines
            } else {
                self.accumulating
                    .get_or_init(|| compile(ctx, &self.source, self.entry, true))
            };
            pipelines[bits][tile].dispatch(
                ctx,
                &[&x.buffer, &w.codes, &w.scales, &y.buffer],
                &dims,
                Self::workgroups(m, meta.rows, rows),
            );
        }
        Ok(())
    }
}
