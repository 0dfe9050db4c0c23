//! The 4-bit KV cache: quantizing new rows into it and attending against it
//! (`shaders/kv_quant.wgsl`, `shaders/attention_q4.wgsl`; layout documented there).

use half::f16;

use super::attention::RowInfos;
use crate::error::{Error, Result};
use crate::gpu::tensor::download_words;
use crate::gpu::{grid, GpuContext, GpuTensor, Pipeline};
use crate::layout::{HeadLayout, Q4Layout};

/// WGSL source of the quantizer.
pub const QUANTIZE_SOURCE: &str = include_str!("../../../shaders/kv_quant.wgsl");
/// WGSL source of the attention kernel over a 4-bit cache.
pub const ATTENTION_SOURCE: &str = include_str!("../../../shaders/attention_q4.wgsl");

/// One layer's keys (or values) in 4-bit groups on the device.
pub struct GpuQ4Cache {
    codes: wgpu::Buffer,
    scales: wgpu::Buffer,
    /// Rows of capacity.
    pub rows: usize,
    /// Row layout.
    pub layout: Q4Layout,
}

impl GpuQ4Cache {
    /// A zeroed cache of `rows` rows.
    pub fn new(ctx: &GpuContext, rows: usize, layout: Q4Layout) -> Result<Self> {
        Ok(Self {
            codes: super::cache_buffer(ctx, rows * layout.words_per_row(), "4-bit")?,
            scales: super::cache_buffer(ctx, rows * layout.groups_per_row(), "4-bit")?,
            rows,
            layout,
        })
    }

    /// The code words, `words_per_row` per row.
    pub(crate) fn codes(&self) -> &wgpu::Buffer {
        &self.codes
    }

    /// The packed (step, min) pairs, `groups_per_row` per row.
    pub(crate) fn scales(&self) -> &wgpu::Buffer {
        &self.scales
    }

    /// The cache decoded to f32 `[rows, kv_heads * head_dim]` (for tests and inspection),
    /// with the step of each value's group.
    pub fn download(&self, ctx: &GpuContext) -> Result<(Vec<f32>, Vec<f32>)> {
        let l = self.layout;
        let codes = download_words(ctx, &self.codes, self.rows * l.words_per_row())?;
        let scales = download_words(ctx, &self.scales, self.rows * l.groups_per_row())?;
        let mut values = Vec::with_capacity(self.rows * l.kv_heads * l.head_dim);
        let mut steps = Vec::with_capacity(values.capacity());
        for r in 0..self.rows {
            for h in 0..l.kv_heads {
                for e in 0..l.head_dim {
                    let c = h * l.padded + e;
                    let word = codes[r * l.words_per_row() + c / 8];
                    let s = scales[r * l.groups_per_row() + c / l.group];
                    let (step, min) = (
                        f16::from_bits(s as u16).to_f32(),
                        f16::from_bits((s >> 16) as u16).to_f32(),
                    );
                    values.push(((word >> (4 * (c % 8))) & 15) as f32 * step + min);
                    steps.push(step);
                }
            }
        }
        Ok((values, steps))
    }
}

/// Quantizing into, and attending against, 4-bit caches.
pub struct KvQuant {
    quantize: Pipeline,
    attention: Pipeline,
    head_dim: usize,
}

impl KvQuant {
    /// Compiles both kernels, attention for heads of `head_dim` values.
    pub fn new(ctx: &GpuContext, head_dim: usize) -> Result<Self> {
        Ok(Self {
            quantize: Pipeline::new(ctx, QUANTIZE_SOURCE, "main"),
            attention: super::attention::compile(ctx, ATTENTION_SOURCE, head_dim)?,
            head_dim,
        })
    }

    /// Quantizes the rows of `src [rows, kv_heads * head_dim]` into cache rows
    /// `info[i].first + info[i].visible - 1` (the rows' own positions).
    pub fn store(
        &self,
        ctx: &GpuContext,
        src: &GpuTensor,
        info: &RowInfos,
        cache: &GpuQ4Cache,
    ) -> Result<()> {
        let l = cache.layout;
        let rows = src.numel() / (l.kv_heads * l.head_dim).max(1);
        if rows * l.kv_heads * l.head_dim != src.numel() || info.rows != rows {
            return Err(Error::invalid(
                "KV cache",
                "rows to store disagree with the layout",
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let params = [rows, l.kv_heads, l.head_dim, l.padded, l.group].map(|v| v as u32);
        self.quantize.dispatch(
            ctx,
            &[
                &src.buffer,
                &info.indices.buffer,
                &cache.codes,
                &cache.scales,
            ],
            &params,
            grid((rows * l.groups_per_row()).div_ceil(64)),
        );
        Ok(())
    }

    /// Causal attention of `q` against 4-bit caches `k`, `v` (see [`super::attention`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        ctx: &GpuContext,
        q: &GpuTensor,
        k: &GpuQ4Cache,
        v: &GpuQ4Cache,
        info: &RowInfos,
        o: &GpuTensor,
        layout: HeadLayout,
        scale: f32,
    ) -> Result<()> {
        let l = k.layout;
        if layout.head_dim != self.head_dim
            || layout.kv_heads != l.kv_heads
            || layout.head_dim != l.head_dim
            || v.layout != l
            || !layout.heads.is_multiple_of(layout.kv_heads)
        {
            return Err(Error::invalid(
                "attention",
                format!("layout {layout:?} does not fit the cache {l:?}"),
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
                &k.codes,
                &k.scales,
                &v.codes,
                &v.scales,
                &info.indices.buffer,
                &o.buffer,
            ],
            rows,
            layout,
            scale,
            info,
            super::attention::q4_keys_per_pass(ctx, layout.head_dim),
            &[l.padded as u32, l.group as u32],
        )?;
        Ok(())
    }
}
