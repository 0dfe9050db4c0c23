//! Causal attention of a ragged batch against KV caches, with GQA (`shaders/attention.wgsl`).

use super::expect_len;
use crate::cpu::ops::HeadLayout;
use crate::error::{Error, Result};
use crate::gpu::{grid, GpuContext, GpuIndices, GpuTensor, Pipeline};

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/attention.wgsl");

/// Largest head width the kernel's private accumulator holds.
pub const MAX_HEAD_DIM: usize = 256;

/// Per query row: the first cache row of its sequence and how many keys it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowInfo {
    /// Index of the sequence's first row in the cache buffers.
    pub first: u32,
    /// Keys visible: the row's position + 1.
    pub visible: u32,
}

/// The attention kernel.
pub struct Attention {
    pipeline: Pipeline,
}

impl Attention {
    /// Compiles the kernel.
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            pipeline: Pipeline::new(ctx, SOURCE, "main"),
        }
    }

    /// Packs row infos for upload (`[first, visible]` per row).
    pub fn upload_info(ctx: &GpuContext, rows: &[RowInfo]) -> GpuIndices {
        let flat: Vec<u32> = rows.iter().flat_map(|r| [r.first, r.visible]).collect();
        GpuIndices::upload(ctx, &flat)
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
        info: &GpuIndices,
        o: &GpuTensor,
        layout: HeadLayout,
        scale: f32,
    ) -> Result<()> {
        let HeadLayout {
            heads,
            kv_heads,
            head_dim,
        } = layout;
        if head_dim > MAX_HEAD_DIM || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(Error::invalid(
                "attention",
                format!("unsupported head layout {layout:?}"),
            ));
        }
        let rows = q.numel() / (heads * head_dim).max(1);
        expect_len(q, rows * heads * head_dim, "queries")?;
        expect_len(o, rows * heads * head_dim, "attention output")?;
        if k.numel() != v.numel() || k.numel() % (kv_heads * head_dim) != 0 || info.len != 2 * rows
        {
            return Err(Error::invalid(
                "attention",
                "caches or row info disagree with the queries",
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let params = [rows, heads, kv_heads, head_dim].map(|x| x as u32);
        let params = [params[0], params[1], params[2], params[3], scale.to_bits()];
        self.pipeline.dispatch(
            ctx,
            &[&q.buffer, &k.buffer, &v.buffer, &info.buffer, &o.buffer],
            &params,
            grid((rows * heads).div_ceil(64)),
        );
        Ok(())
    }
}
