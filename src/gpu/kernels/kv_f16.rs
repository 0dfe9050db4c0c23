//! The f16 KV cache: rounding new rows into it and attending against it
//! (`shaders/kv_f16.wgsl`; attention is `shaders/attention.wgsl` with the f16 cache prelude,
//! `shaders/attention_cache_f16.wgsl`). The rows are the CPU device's f16 rows, bit for bit.

use super::attention::RowInfos;
use crate::device::CacheFormat;
use crate::error::{Error, Result};
use crate::gpu::tensor::download_words;
use crate::gpu::{grid, GpuContext, GpuTensor, Pipeline};
use crate::layout::HeadLayout;

/// WGSL source of the store kernel.
pub const STORE_SOURCE: &str = include_str!("../../../shaders/kv_f16.wgsl");
/// WGSL source of attention over f16 caches: the f16 prelude, then the shared body.
pub const ATTENTION_SOURCE: &str = concat!(
    include_str!("../../../shaders/attention_cache_f16.wgsl"),
    include_str!("../../../shaders/attention.wgsl")
);

/// One layer's keys (or values) as f16 rows on the device.
pub struct GpuF16Cache {
    words: wgpu::Buffer,
    /// Rows of capacity.
    pub rows: usize,
    /// Values per row (`kv_heads * head_dim`).
    pub width: usize,
}

impl GpuF16Cache {
    /// A zeroed cache of `rows` rows of `width` values.
    pub fn new(ctx: &GpuContext, rows: usize, width: usize) -> Result<Self> {
        Ok(Self {
            words: super::cache_buffer(ctx, rows * Self::row_words(width), "f16")?,
            rows,
            width,
        })
    }

    /// Words per row: two halves each, the width rounded up to even.
    pub fn row_words(width: usize) -> usize {
        CacheFormat::f16_stride(width) / 2
    }

    /// The buffer of rows, [`GpuF16Cache::row_words`] words each.
    pub(crate) fn words(&self) -> &wgpu::Buffer {
        &self.words
    }

    /// The cache's raw half bits, `[rows, width]` (for tests and inspection).
    pub fn download(&self, ctx: &GpuContext) -> Result<Vec<u16>> {
        let per_row = Self::row_words(self.width);
        let words = download_words(ctx, &self.words, self.rows * per_row)?;
        Ok(words
            .chunks_exact(per_row.max(1))
            .flat_map(|row| (0..self.width).map(move |c| (row[c / 2] >> (16 * (c % 2))) as u16))
            .collect())
    }
}

/// Rounding into, and attending against, f16 caches.
pub struct KvF16 {
    store: Pipeline,
    attention: Pipeline,
    head_dim: usize,
}

impl KvF16 {
    /// Compiles both kernels, attention for heads of `head_dim` values.
    pub fn new(ctx: &GpuContext, head_dim: usize) -> Result<Self> {
        Ok(Self {
            store: Pipeline::new(ctx, STORE_SOURCE, "main"),
            attention: super::attention::compile(ctx, ATTENTION_SOURCE, head_dim)?,
            head_dim,
        })
    }

    /// Rounds the rows of `src [rows, width]` into cache rows `info[i].first +
    /// info[i].visible - 1` (the rows' own positions).
    pub fn store(
        &self,
        ctx: &GpuContext,
        src: &GpuTensor,
        info: &RowInfos,
        cache: &GpuF16Cache,
    ) -> Result<()> {
        let rows = src.numel() / cache.width.max(1);
        if rows * cache.width != src.numel() || info.rows != rows {
            return Err(Error::invalid(
                "KV cache",
                "rows to store disagree with the cache's width",
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        self.store.dispatch(
            ctx,
            &[&src.buffer, &info.indices.buffer, &cache.words],
            &[rows as u32, cache.width as u32],
            grid((rows * GpuF16Cache::row_words(cache.width)).div_ceil(64)),
        );
        Ok(())
    }

    /// Causal attention of `q` against f16 caches `k`, `v` (see [`super::attention`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        ctx: &GpuContext,
        q: &GpuTensor,
        k: &GpuF16Cache,
        v: &GpuF16Cache,
        info: &RowInfos,
        o: &GpuTensor,
        layout: HeadLayout,
        scale: f32,
    ) -> Result<()> {
        let width = layout.kv_heads * layout.head_dim;
        if layout.head_dim != self.head_dim
            || k.width != width
            || v.width != width
            || !layout.heads.is_multiple_of(layout.kv_heads)
        {
            return Err(Error::invalid(
                "attention",
                format!(
                    "layout {layout:?} does not fit f16 caches of {} values a row",
                    k.width
                ),
            ));
        }
        let rows = super::attention::query_rows(q, o, info, layout)?;
        if rows == 0 {
            return Ok(());
        }
        super::attention::dispatch_passes(
            ctx,
            &self.attention,
            &[
                &q.buffer,
                &k.words,
                &v.words,
                &info.indices.buffer,
                &o.buffer,
            ],
            rows,
            layout,
            scale,
            info,
            super::attention::f32_keys_per_pass(ctx, layout.head_dim),
            &[],
        )
    }
}
