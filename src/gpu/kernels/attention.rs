//! Causal attention of a ragged batch against KV caches, with GQA (`shaders/attention.wgsl`).

use super::expect_len;
use crate::error::{Error, Result};
use crate::gpu::{grid, GpuContext, GpuIndices, GpuTensor, Pipeline};
use crate::layout::passes;
use crate::layout::HeadLayout;

/// WGSL source: the f32 cache prelude, then the body shared with the f16 cache's kernel.
pub const SOURCE: &str = concat!(
    include_str!("../../../shaders/attention_cache_f32.wgsl"),
    include_str!("../../../shaders/attention.wgsl")
);

/// Largest head width the kernel's private accumulator holds.
pub const MAX_HEAD_DIM: usize = 256;

pub use crate::device::RowInfo;

/// Row infos on the device (`[first, visible, skip_from, skip_to]` per row), with the most keys
/// any row sees
/// (which sets how many key passes attention runs).
pub struct RowInfos {
    /// The packed infos.
    pub indices: GpuIndices,
    /// Rows described.
    pub rows: usize,
    /// The largest `visible` of any row.
    pub max_visible: usize,
    /// Scores become `cap * tanh(s / cap)` before the softmax (Gemma 2), when given.
    pub softcap: Option<f32>,
}

impl RowInfos {
    /// Packs and uploads `rows`.
    pub fn upload(ctx: &GpuContext, rows: &[RowInfo]) -> Self {
        let flat: Vec<u32> = bytemuck::cast_slice(rows).to_vec();
        Self {
            indices: GpuIndices::upload(ctx, &flat),
            rows: rows.len(),
            max_visible: rows.iter().map(|r| r.visible as usize).max().unwrap_or(0),
            softcap: None,
        }
    }

    /// These rows with their scores soft-capped at `cap` (or not).
    pub fn soft_capped(self, cap: Option<f32>) -> Self {
        Self {
            softcap: cap,
            ..self
        }
    }
}

/// Keys one invocation may walk in a pass, for `per_key` loop iterations per key and `fixed`
/// more per pass (loading and storing the carried state): `keys * per_key + fixed <= budget`.
fn keys_per_pass(ctx: &GpuContext, per_key: usize, fixed: usize) -> usize {
    (ctx.loop_budget().saturating_sub(fixed) / per_key.max(1)).max(1)
}

/// Keys per pass of the 4-bit-cache kernel, which walks a head value by value: `2d + 1`
/// iterations per key, and the state's load and store per pass (`2d`, doubled for margin).
pub fn q4_keys_per_pass(ctx: &GpuContext, head_dim: usize) -> usize {
    keys_per_pass(ctx, 2 * head_dim + 1, 4 * head_dim)
}

/// Keys per pass of the f32 kernel: a head is `c = ceil(d / 4)` chunks, and each key costs
/// `2c + 1` iterations (dot product, accumulator update, the key loop itself); a pass loads q
/// and the state and stores the state, `c + c + 4c` more (a chunk's store is a loop of 4).
pub fn f32_keys_per_pass(ctx: &GpuContext, head_dim: usize) -> usize {
    let c = head_dim.div_ceil(4);
    keys_per_pass(ctx, 2 * c + 1, 6 * c)
}

/// Query rows of `q` for `layout`, checked against the output `o` and the row infos.
pub(crate) fn query_rows(
    q: &GpuTensor,
    o: &GpuTensor,
    info: &RowInfos,
    layout: HeadLayout,
) -> Result<usize> {
    let rows = q.numel() / (layout.heads * layout.head_dim).max(1);
    if info.rows != rows || o.numel() != q.numel() {
        return Err(Error::invalid(
            "attention",
            "queries, output and row info disagree",
        ));
    }
    Ok(rows)
}

/// Dispatches an attention pipeline once per pass of at most `per_pass` keys. Its parameters
/// are rows, heads, kv_heads, head_dim, scale bits, the pass's key range, its FIRST (1) /
/// LAST (2) flags and the soft-cap's bits (0: none), then `extra` words; its last two storage bindings are the output (given
/// last in `buffers`) and the `(m, l)` state between passes (allocated here).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dispatch_passes(
    ctx: &GpuContext,
    pipeline: &Pipeline,
    buffers: &[&wgpu::Buffer],
    rows: usize,
    layout: HeadLayout,
    scale: f32,
    info: &RowInfos,
    per_pass: usize,
    extra: &[u32],
) -> Result<()> {
    let all = passes(info.max_visible, per_pass);
    let state = GpuTensor::zeros(ctx, &[rows * layout.heads, 2])?;
    let mut bound = buffers.to_vec();
    bound.push(&state.buffer);
    for (p, keys) in all.iter().enumerate() {
        let flags = u32::from(p == 0) | (u32::from(p + 1 == all.len()) << 1);
        let mut params = vec![
            rows as u32,
            layout.heads as u32,
            layout.kv_heads as u32,
            layout.head_dim as u32,
            scale.to_bits(),
            keys.start as u32,
            keys.end as u32,
            flags,
            info.softcap.map_or(0, f32::to_bits),
        ];
        params.extend_from_slice(extra);
        pipeline.dispatch(
            ctx,
            &bound,
            &params,
            grid((rows * layout.heads).div_ceil(64)),
        );
    }
    Ok(())
}

/// Compiles an attention kernel for heads of `head_dim` values (a pipeline constant).
pub(crate) fn compile(ctx: &GpuContext, source: &str, head_dim: usize) -> Result<Pipeline> {
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(Error::Unsupported {
            what: format!("attention heads of {head_dim} values (at most {MAX_HEAD_DIM})"),
        });
    }
    Ok(Pipeline::with_constants(
        ctx,
        source,
        "main",
        &[("HEAD_DIM", head_dim as f64)],
    ))
}

/// The attention kernel, compiled for one head width.
pub struct Attention {
    pipeline: Pipeline,
    head_dim: usize,
}

impl Attention {
    /// Compiles the kernel for heads of `head_dim` values (at most [`MAX_HEAD_DIM`]).
    pub fn new(ctx: &GpuContext, head_dim: usize) -> Result<Self> {
        Ok(Self {
            pipeline: compile(ctx, SOURCE, head_dim)?,
            head_dim,
        })
    }

    /// Packs row infos for upload (`[first, visible, skip_from, skip_to]` per row).
    pub fn upload_info(ctx: &GpuContext, rows: &[RowInfo]) -> RowInfos {
        RowInfos::upload(ctx, rows)
    }

    /// `o [rows, heads * d]` from queries `q`, caches `k`, `v` `[cache rows, kv_heads * d]`,
    /// and `info` (from [`Attention::upload_info`], one entry per query row).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        ctx: &GpuContext,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        info: &RowInfos,
        o: &GpuTensor,
        layout: HeadLayout,
        scale: f32,
    ) -> Result<()> {
        let HeadLayout {
            heads,
            kv_heads,
            head_dim,
        } = layout;
        if head_dim != self.head_dim || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(Error::invalid(
                "attention",
                format!(
                    "head layout {layout:?} for a kernel compiled for {}-wide heads",
                    self.head_dim
                ),
            ));
        }
        let rows = q.numel() / (heads * head_dim).max(1);
        expect_len(q, rows * heads * head_dim, "queries")?;
        expect_len(o, rows * heads * head_dim, "attention output")?;
        if k.numel() != v.numel()
            || !k.numel().is_multiple_of(kv_heads * head_dim)
            || info.rows != rows
        {
            return Err(Error::invalid(
                "attention",
                "caches or row info disagree with the queries",
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        dispatch_passes(
            ctx,
            &self.pipeline,
            &[
                &q.buffer,
                &k.buffer,
                &v.buffer,
                &info.indices.buffer,
                &o.buffer,
            ],
            rows,
            layout,
            scale,
            info,
            f32_keys_per_pass(ctx, head_dim),
            &[],
        )
    }
}
