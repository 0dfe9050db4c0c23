//! Whole-model forward on the WebGPU device (all weights resident, f32): the same recipe as the
//! CPU reference (`crate::cpu`), one kernel per step, with per-layer KV caches on the device.
//!
//! A batch of sequences is laid out as in the reference: their new tokens stacked as rows. The
//! caches of a batch hold every sequence's rows back to back (`first` row and `capacity` per
//! sequence), so attention reads one buffer per layer and new keys and values are appended with
//! plain buffer copies.

use super::kernels::attention::{Attention, RowInfo, RowInfos};
use super::kernels::elementwise::{Elementwise, Op};
use super::kernels::embedding::Embedding;
use super::kernels::kv_quant::{GpuQ4Cache, KvQuant, Q4Layout};
use super::kernels::logprob::Logprob;
use super::kernels::matmul::MatmulF32;
use super::kernels::matmul_q::{GpuPackedWeight, MatmulQ};
use super::kernels::norm::Norm;
use super::kernels::rope::{self, Rope};
use super::layout::{convert_rows, upload_rows};
use super::{GpuContext, GpuIndices, GpuTensor};
use crate::cpu::ops::HeadLayout;
use crate::error::{Error, Result};
use crate::model::llama::LlamaSpec;
use crate::model::opt::{self, OptSpec, LAYER_NORM_EPS, POSITION_OFFSET};
use crate::model::{ModelConfig, ModelFiles, TensorSpec, WeightSource};

use std::ops::Range;

/// Rows of logits computed at once when scoring, unless told otherwise.
pub(crate) const LOGIT_ROWS: usize = 128;

/// Rows of a batch that one unit computes at once, unless told otherwise (a prompt longer
/// than this runs in chunks: see [`GpuRunner::chunk_rows`]).
pub(crate) const CHUNK_ROWS: usize = 512;

/// How linear-layer weights are held on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Decoded to f32.
    F32,
    /// As the file stores them: GGUF Q4_0/Q4_1/Q8_0 blocks run natively (repacked losslessly,
    /// never requantized), f16 tensors stay f16 (decoded in the kernel); f32 and bf16 tensors
    /// become f32 (bf16 does not always fit f16's range).
    #[default]
    Native,
    /// FlexGen's 4-bit groups of 64 along the input dimension (`--compress-weight`).
    Group4,
    /// GGUF blocks as stored; other weights quantized to Q8_0 (8 bits per value, blocks of
    /// 32; f32 where rows are not whole blocks). The output projection under
    /// `--compress-weight`.
    Q8,
}

/// How a model is held on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuOptions {
    /// Linear-layer weights.
    pub weights: WeightFormat,
    /// Keep the KV cache in FlexGen's 4-bit groups along head_dim (`--compress-cache`).
    pub compress_cache: bool,
}

/// One row range of a linear weight on the device.
#[derive(Clone)]
pub(crate) enum WeightPart {
    F32(GpuTensor),
    Packed(GpuPackedWeight),
}

/// A linear layer's weight `[out, in]`, split by rows into bindings the device accepts.
#[derive(Clone)]
pub struct GpuLinear {
    /// `(rows of W, first output column)` per part.
    pub(crate) parts: Vec<(WeightPart, usize)>,
    pub(crate) bias: Option<GpuTensor>,
    pub(crate) out: usize,
}

impl GpuLinear {
    fn load(
        ctx: &GpuContext,
        format: WeightFormat,
        weight: &TensorSpec,
        bias: Option<&TensorSpec>,
        source: &dyn WeightSource,
    ) -> Result<Self> {
        let out = weight.shape[0];
        // rows per part: as many as keep the codes (the larger segment) within one binding
        let (row, _) = convert_rows(source, weight, format, 0..out.min(1))?;
        let row_bytes = row.segment_row_bytes()[0].max(1);
        let rows_per_part = ((ctx.max_binding_bytes() as usize) / row_bytes).max(1);
        let mut parts = Vec::new();
        let mut first = 0;
        while first < out {
            let rows = rows_per_part.min(out - first);
            let part = upload_rows(ctx, source, weight, format, first..first + rows)?;
            parts.push((part, first));
            first += rows;
        }
        let bias = match bias {
            Some(b) => Some(GpuTensor::upload(ctx, &b.load_f32(source)?, &[out])?),
            None => None,
        };
        Ok(Self { parts, bias, out })
    }

    /// Bytes of weights on the device.
    pub fn device_bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|(p, _)| match p {
                WeightPart::F32(t) => 4 * t.numel(),
                WeightPart::Packed(w) => {
                    (w.meta.rows * w.meta.padded_k * w.meta.bits as usize) / 8
                        + 4 * w.meta.rows * (w.meta.padded_k / w.meta.group)
                }
            })
            .sum()
    }
}

fn vector(ctx: &GpuContext, spec: &TensorSpec, source: &dyn WeightSource) -> Result<GpuTensor> {
    GpuTensor::upload(ctx, &spec.load_f32(source)?, &spec.shape)
}

/// OPT's LayerNorm parameters.
#[derive(Clone)]
pub(crate) struct OptNorm {
    pub weight: GpuTensor,
    pub bias: GpuTensor,
}

impl OptNorm {
    pub(crate) fn load(
        ctx: &GpuContext,
        n: &opt::LayerNorm,
        source: &dyn WeightSource,
    ) -> Result<Self> {
        Ok(Self {
            weight: vector(ctx, &n.weight, source)?,
            bias: vector(ctx, &n.bias, source)?,
        })
    }
}

/// The attention half of a layer: norm, projections.
#[derive(Clone)]
pub(crate) enum AttnWeights {
    Llama {
        norm: GpuTensor,
        q: GpuLinear,
        k: GpuLinear,
        v: GpuLinear,
        o: GpuLinear,
    },
    Opt {
        ln: OptNorm,
        q: GpuLinear,
        k: GpuLinear,
        v: GpuLinear,
        out: GpuLinear,
    },
}

/// The MLP half of a layer.
#[derive(Clone)]
pub(crate) enum MlpWeights {
    Llama {
        norm: GpuTensor,
        gate: GpuLinear,
        up: GpuLinear,
        down: GpuLinear,
    },
    Opt {
        ln: OptNorm,
        fc1: GpuLinear,
        fc2: GpuLinear,
    },
}

/// What turns embedded tokens into the first layer's input.
#[derive(Clone)]
pub(crate) enum InputWeights {
    Llama,
    Opt {
        positions: GpuTensor,
        project_in: Option<GpuLinear>,
    },
}

/// What turns the last layer's output into the rows the output projection reads.
#[derive(Clone)]
pub(crate) enum HeadWeights {
    Llama {
        norm: GpuTensor,
    },
    Opt {
        final_norm: Option<OptNorm>,
        project_out: Option<GpuLinear>,
    },
}

impl AttnWeights {
    /// The linear layers, in a fixed order.
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut GpuLinear> {
        match self {
            AttnWeights::Llama { q, k, v, o, .. } => vec![q, k, v, o],
            AttnWeights::Opt { q, k, v, out, .. } => vec![q, k, v, out],
        }
    }
}

impl MlpWeights {
    /// The linear layers, in a fixed order.
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut GpuLinear> {
        match self {
            MlpWeights::Llama { gate, up, down, .. } => vec![gate, up, down],
            MlpWeights::Opt { fc1, fc2, .. } => vec![fc1, fc2],
        }
    }
}

impl InputWeights {
    /// The linear layers, in a fixed order.
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut GpuLinear> {
        match self {
            InputWeights::Opt {
                project_in: Some(p),
                ..
            } => vec![p],
            _ => Vec::new(),
        }
    }
}

impl HeadWeights {
    /// The linear layers, in a fixed order.
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut GpuLinear> {
        match self {
            HeadWeights::Opt {
                project_out: Some(p),
                ..
            } => vec![p],
            _ => Vec::new(),
        }
    }
}

/// The compiled kernels a model uses.
struct Kernels {
    kv_quant: KvQuant,
    matmul: MatmulF32,
    matmul_q: MatmulQ,
    elementwise: Elementwise,
    norm: Norm,
    embedding: Embedding,
    rope: Rope,
    attention: Attention,
    logprob: Logprob,
}

/// Keys and values of one layer for a set of sequences: f32 rows, or 4-bit groups.
pub(crate) enum LayerCache {
    F32(GpuTensor, GpuTensor),
    Q4(GpuQ4Cache, GpuQ4Cache),
}

impl LayerCache {
    /// The buffers holding the rows, with bytes per row: keys then values (codes and scales
    /// separately for 4-bit caches). A row range of the cache is the same range of each.
    pub(crate) fn segments(&self) -> Vec<(&wgpu::Buffer, u64)> {
        match self {
            LayerCache::F32(k, v) => {
                let w = (k.shape[1] * 4) as u64;
                vec![(&k.buffer, w), (&v.buffer, w)]
            }
            LayerCache::Q4(k, v) => {
                let (c, s) = (
                    (k.layout.words_per_row() * 4) as u64,
                    (k.layout.groups_per_row() * 4) as u64,
                );
                vec![
                    (k.codes(), c),
                    (k.scales(), s),
                    (v.codes(), c),
                    (v.scales(), s),
                ]
            }
        }
    }
}

/// Per-layer KV caches of one batch on the device.
pub struct GpuKvCache {
    layers: Vec<LayerCache>,
    /// `(first row, capacity, rows filled)` per sequence.
    slots: Vec<(usize, usize, usize)>,
}

impl GpuKvCache {
    /// Rows cached for each sequence.
    pub fn lens(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.2).collect()
    }
}

/// The rows of one forward call: new tokens of several sequences, stacked, with where each
/// sequence's keys and values live in the cache.
pub(crate) struct RowBatch {
    pub rows: usize,
    pub ids: Vec<u32>,
    ids_gpu: GpuIndices,
    pos: GpuIndices,
    positions: Vec<u32>,
    info: RowInfos,
    infos: Vec<RowInfo>,
    rope: Option<(GpuTensor, GpuTensor)>,
    /// `(first new row, first cache row, rows)` per sequence.
    appends: Vec<(usize, usize, usize)>,
}

impl RowBatch {
    /// Per row: the first cache row of its sequence and the keys it sees.
    pub(crate) fn infos(&self) -> &[RowInfo] {
        &self.infos
    }

    /// `(first new row, first cache row, rows)` per sequence.
    pub(crate) fn appends(&self) -> &[(usize, usize, usize)] {
        &self.appends
    }
}

/// Where one sequence's new tokens go in a cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheSlot {
    pub first: usize,
    pub capacity: usize,
    pub filled: usize,
}

/// A model's recipe on a device: the configuration, options and compiled kernels, with one
/// method per unit of the forward pass. Weights are passed in, so the same code runs resident
/// models ([`GpuModel`]) and streamed ones (`crate::exec`).
pub(crate) struct GpuRunner {
    pub ctx: GpuContext,
    pub options: GpuOptions,
    pub config: ModelConfig,
    /// Rows of logits computed at once (`rows x vocab` floats of workspace).
    pub logit_rows: usize,
    /// Rows of a batch one unit computes at once: longer prompts run in chunks of this many
    /// rows (query tiles for attention, row chunks for the MLP, input and head), so that the
    /// intermediate tensors are bounded by it whatever the record's length.
    pub chunk_rows: usize,
    kernels: Kernels,
}

impl GpuRunner {
    pub(crate) fn new(ctx: GpuContext, config: &ModelConfig, options: GpuOptions) -> Result<Self> {
        if let ModelConfig::Llama(c) = config {
            if c.head_dim() > super::kernels::attention::MAX_HEAD_DIM {
                return Err(Error::Unsupported {
                    what: format!("head_dim {} on the wgpu backend", c.head_dim()),
                });
            }
        }
        let head_dim = match config {
            ModelConfig::Llama(c) => c.head_dim(),
            ModelConfig::Opt(c) => c.head_dim(),
        };
        let kernels = Kernels {
            kv_quant: KvQuant::new(&ctx, head_dim)?,
            matmul: MatmulF32::new(&ctx),
            matmul_q: MatmulQ::new(&ctx),
            elementwise: Elementwise::new(&ctx)?,
            norm: Norm::new(&ctx),
            embedding: Embedding::new(&ctx),
            rope: Rope::new(&ctx),
            attention: Attention::new(&ctx, head_dim)?,
            logprob: Logprob::new(&ctx),
        };
        Ok(Self {
            ctx,
            options,
            config: config.clone(),
            logit_rows: LOGIT_ROWS,
            chunk_rows: CHUNK_ROWS,
            kernels,
        })
    }

    /// Attention heads of the model.
    pub(crate) fn head_layout(&self) -> HeadLayout {
        match &self.config {
            ModelConfig::Llama(c) => HeadLayout {
                heads: c.num_attention_heads,
                kv_heads: c.kv_heads(),
                head_dim: c.head_dim(),
            },
            ModelConfig::Opt(c) => HeadLayout {
                heads: c.num_attention_heads,
                kv_heads: c.num_attention_heads,
                head_dim: c.head_dim(),
            },
        }
    }

    /// An empty cache of `rows` rows for one layer.
    pub(crate) fn layer_cache(&self, rows: usize) -> Result<LayerCache> {
        let layout = self.head_layout();
        Ok(if self.options.compress_cache {
            let q4 = Q4Layout::new(layout.kv_heads, layout.head_dim);
            LayerCache::Q4(
                GpuQ4Cache::new(&self.ctx, rows.max(1), q4)?,
                GpuQ4Cache::new(&self.ctx, rows.max(1), q4)?,
            )
        } else {
            let width = self.config.kv_width();
            LayerCache::F32(
                GpuTensor::zeros(&self.ctx, &[rows.max(1), width])?,
                GpuTensor::zeros(&self.ctx, &[rows.max(1), width])?,
            )
        })
    }

    /// Bytes per cached token of one layer in each of a [`LayerCache`]'s segments (the order of
    /// [`LayerCache::segments`]): keys and values as f32, or each one's codes and scales.
    pub(crate) fn cache_segment_bytes(&self) -> Vec<u64> {
        let layout = self.head_layout();
        if self.options.compress_cache {
            let q4 = Q4Layout::new(layout.kv_heads, layout.head_dim);
            let (c, s) = (
                (q4.words_per_row() * 4) as u64,
                (q4.groups_per_row() * 4) as u64,
            );
            vec![c, s, c, s]
        } else {
            let w = (self.config.kv_width() * 4) as u64;
            vec![w, w]
        }
    }

    /// Bytes per cached token of one layer.
    pub(crate) fn cache_bytes_per_row(&self) -> u64 {
        self.cache_segment_bytes().iter().sum()
    }

    /// Checks a batch of new tokens against their cache slots and uploads the per-row data.
    pub(crate) fn row_batch(&self, batch: &[&[u32]], slots: &[CacheSlot]) -> Result<RowBatch> {
        let vocab = self.config.vocab_size();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut infos = Vec::new();
        let mut appends = Vec::new();
        for (seq, slot) in batch.iter().zip(slots) {
            if seq.is_empty() {
                return Err(Error::SequenceTooShort {
                    len: 0,
                    needed: 1,
                    what: "run the model",
                });
            }
            if slot.filled + seq.len() > slot.capacity.min(self.config.max_context()) {
                return Err(Error::SequenceTooLong {
                    len: slot.filled + seq.len(),
                    max: slot.capacity.min(self.config.max_context()),
                });
            }
            appends.push((ids.len(), slot.first + slot.filled, seq.len()));
            for (i, &t) in seq.iter().enumerate() {
                if t as usize >= vocab {
                    return Err(Error::TokenOutOfRange {
                        token: t,
                        position: slot.filled + i,
                        vocab_size: vocab,
                    });
                }
                ids.push(t);
                positions.push((slot.filled + i) as u32);
                infos.push(RowInfo {
                    first: slot.first as u32,
                    visible: (slot.filled + i + 1) as u32,
                });
            }
        }
        self.upload_rows(ids, positions, infos, appends)
    }

    /// The device side of a [`RowBatch`] from its host data.
    fn upload_rows(
        &self,
        ids: Vec<u32>,
        positions: Vec<u32>,
        infos: Vec<RowInfo>,
        appends: Vec<(usize, usize, usize)>,
    ) -> Result<RowBatch> {
        let ctx = &self.ctx;
        let rows = ids.len();
        let rope = match &self.config {
            ModelConfig::Llama(c) => {
                let hd = c.head_dim();
                let abs: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
                let (cos, sin) = rope::tables(&abs, hd, c.rope_theta);
                Some((
                    GpuTensor::upload(ctx, &cos, &[rows, hd / 2])?,
                    GpuTensor::upload(ctx, &sin, &[rows, hd / 2])?,
                ))
            }
            ModelConfig::Opt(_) => None,
        };
        Ok(RowBatch {
            rows,
            ids_gpu: GpuIndices::upload(ctx, &ids),
            pos: GpuIndices::upload(ctx, &positions),
            ids,
            positions,
            info: Attention::upload_info(ctx, &infos),
            infos,
            rope,
            appends,
        })
    }

    /// Rows `range` of a batch as a batch of their own: the same tokens, positions and cache
    /// rows, each sequence's appends cut to the rows inside the range.
    fn chunk(&self, rb: &RowBatch, range: Range<usize>) -> Result<RowBatch> {
        let appends = rb
            .appends
            .iter()
            .filter_map(|&(row, at, n)| {
                let (lo, hi) = (row.max(range.start), (row + n).min(range.end));
                (lo < hi).then(|| (lo - range.start, at + (lo - row), hi - lo))
            })
            .collect();
        self.upload_rows(
            rb.ids[range.clone()].to_vec(),
            rb.positions[range.clone()].to_vec(),
            rb.infos[range].to_vec(),
            appends,
        )
    }

    /// Runs `f` on row chunks of at most [`GpuRunner::chunk_rows`] rows of `x` (with their
    /// row range), in order, so that a unit's intermediate tensors are bounded by the
    /// chunk, not by the batch. Chunks go back into `x` when `f` keeps the width, else into a
    /// new tensor. Attention stays causal: a chunk appends its keys and values to the cache
    /// before it attends, and later chunks see them there.
    fn by_chunks(
        &self,
        x: GpuTensor,
        f: impl Fn(GpuTensor, Range<usize>) -> Result<GpuTensor>,
    ) -> Result<GpuTensor> {
        let rows = x.shape[0];
        if rows <= self.chunk_rows.max(1) {
            return f(x, 0..rows);
        }
        let width = x.shape[1];
        let mut out: Option<GpuTensor> = None;
        for range in crate::gpu::passes(rows, self.chunk_rows) {
            let part = copy_rows(&self.ctx, &x, range.clone(), None)?;
            let y = f(part, range.clone())?;
            let dest = match &out {
                Some(t) => t,
                None => out.insert(if y.shape[1] == width {
                    x.clone()
                } else {
                    GpuTensor::zeros(&self.ctx, &[rows, y.shape[1]])?
                }),
            };
            copy_rows(&self.ctx, &y, 0..range.len(), Some((dest, range.start)))?;
        }
        out.ok_or_else(|| Error::invalid("model", "no rows"))
    }

    /// Looks the rows' tokens up in an f32 embedding table on the device.
    pub(crate) fn gather(&self, table: &GpuTensor, rb: &RowBatch) -> Result<GpuTensor> {
        let e = GpuTensor::zeros(&self.ctx, &[rb.rows, table.shape[1]])?;
        self.kernels
            .embedding
            .run(&self.ctx, table, None, &rb.ids_gpu, &rb.pos, &e)?;
        Ok(e)
    }

    /// Embedded tokens `e` -> the first layer's input (OPT: `project_in`, learned positions),
    /// in row chunks.
    pub(crate) fn input(&self, w: &InputWeights, e: GpuTensor, rb: &RowBatch) -> Result<GpuTensor> {
        if matches!(w, InputWeights::Llama) {
            return Ok(e);
        }
        self.by_chunks(e, |ec, range| self.input_rows(w, ec, &rb.positions[range]))
    }

    /// [`GpuRunner::input`] on rows at `row_positions`, unchunked.
    fn input_rows(
        &self,
        w: &InputWeights,
        e: GpuTensor,
        row_positions: &[u32],
    ) -> Result<GpuTensor> {
        let InputWeights::Opt {
            positions,
            project_in,
        } = w
        else {
            return Ok(e);
        };
        let ctx = &self.ctx;
        let x = match project_in {
            Some(p) => self.linear(&e, p)?,
            None => e,
        };
        // learned positions: gather rows pos + 2 of the position table and add them
        let p = GpuTensor::zeros(ctx, &x.shape)?;
        let shifted: Vec<u32> = row_positions
            .iter()
            .map(|&q| q + POSITION_OFFSET as u32)
            .collect();
        let shifted = GpuIndices::upload(ctx, &shifted);
        self.kernels
            .embedding
            .run(ctx, positions, None, &shifted, &shifted, &p)?;
        self.kernels.elementwise.binary(ctx, Op::Add, &x, &p)?;
        Ok(x)
    }

    fn opt_norm(&self, n: &OptNorm, input: &GpuTensor) -> Result<GpuTensor> {
        let y = GpuTensor::zeros(&self.ctx, &input.shape)?;
        self.kernels
            .norm
            .layer_norm(&self.ctx, input, &n.weight, &n.bias, &y, LAYER_NORM_EPS)?;
        Ok(y)
    }

    fn rms_norm(&self, weight: &GpuTensor, input: &GpuTensor) -> Result<GpuTensor> {
        let ModelConfig::Llama(c) = &self.config else {
            return Err(Error::invalid("model", "RMSNorm outside a Llama model"));
        };
        let y = GpuTensor::zeros(&self.ctx, &input.shape)?;
        self.kernels
            .norm
            .rms_norm(&self.ctx, input, weight, &y, c.rms_norm_eps as f32)?;
        Ok(y)
    }

    fn opt_pre_norm(&self) -> bool {
        matches!(&self.config, ModelConfig::Opt(c) if c.do_layer_norm_before)
    }

    /// `x + attention(x)` (OPT post-LN: the norm after the residual), appending the rows' keys
    /// and values to `cache`, in row chunks (query tiles) taken in order.
    pub(crate) fn attention(
        &self,
        w: &AttnWeights,
        x: GpuTensor,
        cache: &LayerCache,
        rb: &RowBatch,
    ) -> Result<GpuTensor> {
        self.by_chunks(x, |xc, range| {
            let sub;
            let rows = if range.len() == rb.rows {
                rb
            } else {
                sub = self.chunk(rb, range)?;
                &sub
            };
            self.attention_with(w, xc, rows, |q, k, v| {
                self.attend_cache(cache, &rows.info, &rows.appends, [q, k, v])
            })
        })
    }

    /// [`GpuRunner::attention`] on all rows at once, with the attention itself done by
    /// `attend(q, k, v)`, which returns `[rows, heads * head_dim]` (before the output
    /// projection). The executor's CPU attention uses it for decode steps (a row per sequence).
    pub(crate) fn attention_with(
        &self,
        w: &AttnWeights,
        x: GpuTensor,
        rb: &RowBatch,
        attend: impl FnOnce(&GpuTensor, &GpuTensor, &GpuTensor) -> Result<GpuTensor>,
    ) -> Result<GpuTensor> {
        let k = &self.kernels;
        let (h, [q, kw, v, out], pre) = match w {
            AttnWeights::Llama { norm, q, k, v, o } => {
                (self.rms_norm(norm, &x)?, [q, k, v, o], true)
            }
            AttnWeights::Opt { ln, q, k, v, out } => {
                let pre = self.opt_pre_norm();
                let h = if pre {
                    self.opt_norm(ln, &x)?
                } else {
                    x.clone()
                };
                (h, [q, k, v, out], pre)
            }
        };
        let (qt, kt, vt) = (
            self.linear(&h, q)?,
            self.linear(&h, kw)?,
            self.linear(&h, v)?,
        );
        if let Some((cos, sin)) = &rb.rope {
            let hd = self.head_layout().head_dim;
            k.rope.run(&self.ctx, &qt, cos, sin, hd)?;
            k.rope.run(&self.ctx, &kt, cos, sin, hd)?;
        }
        let a = attend(&qt, &kt, &vt)?;
        let o = self.linear(&a, out)?;
        k.elementwise.binary(&self.ctx, Op::Add, &x, &o)?;
        match w {
            AttnWeights::Opt { ln, .. } if !pre => self.opt_norm(ln, &x),
            _ => Ok(x),
        }
    }

    /// `x + mlp(x)` (OPT post-LN: the norm after the residual), in row chunks.
    pub(crate) fn mlp(&self, w: &MlpWeights, x: GpuTensor) -> Result<GpuTensor> {
        self.by_chunks(x, |xc, _| self.mlp_rows(w, xc))
    }

    fn mlp_rows(&self, w: &MlpWeights, x: GpuTensor) -> Result<GpuTensor> {
        let (ctx, k) = (&self.ctx, &self.kernels);
        match w {
            MlpWeights::Llama {
                norm,
                gate,
                up,
                down,
            } => {
                let h = self.rms_norm(norm, &x)?;
                let (g, u) = (self.linear(&h, gate)?, self.linear(&h, up)?);
                k.elementwise.binary(ctx, Op::SiluMul, &g, &u)?;
                let d = self.linear(&g, down)?;
                k.elementwise.binary(ctx, Op::Add, &x, &d)?;
                Ok(x)
            }
            MlpWeights::Opt { ln, fc1, fc2 } => {
                let pre = self.opt_pre_norm();
                let h = if pre {
                    self.opt_norm(ln, &x)?
                } else {
                    x.clone()
                };
                let f = self.linear(&h, fc1)?;
                k.elementwise.unary(ctx, Op::Relu, &f)?;
                let d = self.linear(&f, fc2)?;
                k.elementwise.binary(ctx, Op::Add, &x, &d)?;
                if pre {
                    Ok(x)
                } else {
                    self.opt_norm(ln, &x)
                }
            }
        }
    }

    /// The last layer's output -> the rows the output projection reads, in row chunks.
    pub(crate) fn head(&self, w: &HeadWeights, x: GpuTensor) -> Result<GpuTensor> {
        self.by_chunks(x, |xc, _| self.head_rows(w, xc))
    }

    fn head_rows(&self, w: &HeadWeights, x: GpuTensor) -> Result<GpuTensor> {
        match w {
            HeadWeights::Llama { norm } => self.rms_norm(norm, &x),
            HeadWeights::Opt {
                final_norm,
                project_out,
            } => {
                let x = match final_norm {
                    Some(n) => self.opt_norm(n, &x)?,
                    None => x,
                };
                match project_out {
                    Some(p) => self.linear(&x, p),
                    None => Ok(x),
                }
            }
        }
    }

    /// Appends the new keys and values to the cache (rows `appends`: `(first new row, first
    /// cache row, rows)`) and attends with the queries (`info` per row): `attention(q, K, V)`.
    pub(crate) fn attend_cache(
        &self,
        cache: &LayerCache,
        info: &RowInfos,
        appends: &[(usize, usize, usize)],
        [q, k, v]: [&GpuTensor; 3],
    ) -> Result<GpuTensor> {
        let a = GpuTensor::zeros(&self.ctx, &q.shape)?;
        let layout = self.head_layout();
        let scale = 1.0 / (layout.head_dim as f32).sqrt();
        match cache {
            LayerCache::F32(kc, vc) => {
                let row_bytes = (kc.shape[1] * 4) as u64;
                let mut enc = self.ctx.device.create_command_encoder(&Default::default());
                for &(src, dst, n) in appends {
                    let (src, dst, n) = (
                        src as u64 * row_bytes,
                        dst as u64 * row_bytes,
                        n as u64 * row_bytes,
                    );
                    enc.copy_buffer_to_buffer(&k.buffer, src, &kc.buffer, dst, n);
                    enc.copy_buffer_to_buffer(&v.buffer, src, &vc.buffer, dst, n);
                }
                self.ctx.queue.submit([enc.finish()]);
                self.kernels
                    .attention
                    .run(&self.ctx, q, kc, vc, info, &a, layout, scale)?;
            }
            LayerCache::Q4(kc, vc) => {
                // the rows' info names their own cache positions: quantize them there
                self.kernels.kv_quant.store(&self.ctx, k, info, kc)?;
                self.kernels.kv_quant.store(&self.ctx, v, info, vc)?;
                self.kernels
                    .kv_quant
                    .attend(&self.ctx, q, kc, vc, info, &a, layout, scale)?;
            }
        }
        Ok(a)
    }

    pub(crate) fn linear(&self, x: &GpuTensor, l: &GpuLinear) -> Result<GpuTensor> {
        let rows = x.shape[0];
        let y = GpuTensor::zeros(&self.ctx, &[rows, l.out])?;
        for (part, offset) in &l.parts {
            match part {
                WeightPart::F32(w) => self.kernels.matmul.run(&self.ctx, x, w, &y, *offset)?,
                WeightPart::Packed(w) => self.kernels.matmul_q.run(&self.ctx, x, w, &y, *offset)?,
            }
        }
        if let Some(b) = &l.bias {
            self.kernels
                .elementwise
                .binary(&self.ctx, Op::AddBias, &y, b)?;
        }
        Ok(y)
    }

    /// Logits-derived values for hidden rows, a chunk at a time: target logprobs when `targets`
    /// is given, else argmax ids (as f32 bits).
    pub(crate) fn reduce_logits(
        &self,
        output: &GpuLinear,
        hidden: &GpuTensor,
        row_ids: &[usize],
        targets: Option<&[u32]>,
    ) -> Result<Vec<f32>> {
        let ctx = &self.ctx;
        let width = hidden.shape[1];
        if let Some(t) = targets {
            if t.len() != row_ids.len() {
                return Err(Error::invalid("targets", "one target per row"));
            }
            if let Some(&bad) = t.iter().find(|&&t| t as usize >= self.config.vocab_size()) {
                return Err(Error::TokenOutOfRange {
                    token: bad,
                    position: 0,
                    vocab_size: self.config.vocab_size(),
                });
            }
        }
        let mut out = Vec::with_capacity(row_ids.len());
        let all = hidden.download(ctx)?; // small next to the logits: rows x width
        let per = self.logit_rows.max(1);
        for (ci, chunk) in row_ids.chunks(per).enumerate() {
            let rows: Vec<f32> = chunk
                .iter()
                .flat_map(|&r| all[r * width..(r + 1) * width].iter().copied())
                .collect();
            let h = GpuTensor::upload(ctx, &rows, &[chunk.len(), width])?;
            let logits = self.linear(&h, output)?;
            let res = GpuTensor::zeros(ctx, &[chunk.len()])?;
            match targets {
                Some(t) => {
                    let t = &t[ci * per..ci * per + chunk.len()];
                    self.kernels.logprob.target_logprob(
                        ctx,
                        &logits,
                        &GpuIndices::upload(ctx, t),
                        &res,
                    )?
                }
                None => self.kernels.logprob.argmax(ctx, &logits, &res)?,
            }
            out.extend(res.download(ctx)?);
        }
        Ok(out)
    }
}

/// Copies rows `range` of a 2-d tensor into `dest` at row `at`, or into a new tensor.
fn copy_rows(
    ctx: &GpuContext,
    src: &GpuTensor,
    range: Range<usize>,
    dest: Option<(&GpuTensor, usize)>,
) -> Result<GpuTensor> {
    let row_bytes = (src.shape[1] * 4) as u64;
    let (dest, at) = match dest {
        Some((t, at)) => (t.clone(), at),
        None => (GpuTensor::zeros(ctx, &[range.len(), src.shape[1]])?, 0),
    };
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(
        &src.buffer,
        range.start as u64 * row_bytes,
        &dest.buffer,
        at as u64 * row_bytes,
        range.len() as u64 * row_bytes,
    );
    ctx.queue.submit([enc.finish()]);
    Ok(dest)
}

/// One transformer layer's weights.
struct LayerWeights {
    attn: AttnWeights,
    mlp: MlpWeights,
}

/// A model resident on the device.
pub struct GpuModel {
    runner: GpuRunner,
    /// The f32 embedding table for lookups.
    embed: GpuTensor,
    input: InputWeights,
    layers: Vec<LayerWeights>,
    head: HeadWeights,
    /// The output projection: the embedding (tied) or lm_head, as a linear layer.
    output: GpuLinear,
}

impl GpuModel {
    /// Uploads every weight of an opened model, linear weights in `options.weights` (norms,
    /// biases and the embedding table used for lookups are f32).
    pub fn load(ctx: GpuContext, files: &ModelFiles, options: GpuOptions) -> Result<Self> {
        let runner = GpuRunner::new(ctx, &files.config, options)?;
        let ctx = &runner.ctx;
        let format = options.weights;
        let source = files.weights.as_ref();
        let lin =
            |w: &TensorSpec, b: Option<&TensorSpec>| GpuLinear::load(ctx, format, w, b, source);
        let (embed_spec, output_spec, input, layers, head) = match &files.config {
            ModelConfig::Llama(c) => {
                let spec = LlamaSpec::new(c);
                let layers = spec
                    .layers
                    .iter()
                    .map(|l| {
                        Ok(LayerWeights {
                            attn: AttnWeights::Llama {
                                norm: vector(ctx, &l.input_layernorm, source)?,
                                q: lin(&l.q_proj, None)?,
                                k: lin(&l.k_proj, None)?,
                                v: lin(&l.v_proj, None)?,
                                o: lin(&l.o_proj, None)?,
                            },
                            mlp: MlpWeights::Llama {
                                norm: vector(ctx, &l.post_attention_layernorm, source)?,
                                gate: lin(&l.gate_proj, None)?,
                                up: lin(&l.up_proj, None)?,
                                down: lin(&l.down_proj, None)?,
                            },
                        })
                    })
                    .collect::<Result<_>>()?;
                let output = spec
                    .lm_head
                    .clone()
                    .unwrap_or_else(|| spec.embed_tokens.clone());
                let head = HeadWeights::Llama {
                    norm: vector(ctx, &spec.norm, source)?,
                };
                (spec.embed_tokens, output, InputWeights::Llama, layers, head)
            }
            ModelConfig::Opt(c) => {
                let spec = OptSpec::new(c, files.opt_prefix());
                let norm = |n: &opt::LayerNorm| OptNorm::load(ctx, n, source);
                let olin = |l: &opt::Linear| lin(&l.weight, l.bias.as_ref());
                let layers = spec
                    .layers
                    .iter()
                    .map(|l| {
                        Ok(LayerWeights {
                            attn: AttnWeights::Opt {
                                ln: norm(&l.self_attn_layer_norm)?,
                                q: olin(&l.q_proj)?,
                                k: olin(&l.k_proj)?,
                                v: olin(&l.v_proj)?,
                                out: olin(&l.out_proj)?,
                            },
                            mlp: MlpWeights::Opt {
                                ln: norm(&l.final_layer_norm)?,
                                fc1: olin(&l.fc1)?,
                                fc2: olin(&l.fc2)?,
                            },
                        })
                    })
                    .collect::<Result<_>>()?;
                let input = InputWeights::Opt {
                    positions: vector(ctx, &spec.embed_positions, source)?,
                    project_in: spec.project_in.as_ref().map(|w| lin(w, None)).transpose()?,
                };
                let head = HeadWeights::Opt {
                    final_norm: spec.final_layer_norm.as_ref().map(norm).transpose()?,
                    project_out: spec
                        .project_out
                        .as_ref()
                        .map(|w| lin(w, None))
                        .transpose()?,
                };
                (
                    spec.embed_tokens.clone(),
                    spec.embed_tokens,
                    input,
                    layers,
                    head,
                )
            }
        };
        let embed = vector(ctx, &embed_spec, source)?;
        let output = GpuLinear::load(ctx, output_format(format), &output_spec, None, source)?;
        Ok(Self {
            embed,
            input,
            layers,
            head,
            output,
            runner,
        })
    }

    /// The device.
    pub fn context(&self) -> &GpuContext {
        &self.runner.ctx
    }

    /// Computes at most `rows` rows of a batch at once (prompts longer than that run in
    /// chunks; the default is 512). Bounds the intermediate tensors, not the results.
    pub fn set_chunk_rows(&mut self, rows: usize) {
        self.runner.chunk_rows = rows.max(1);
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.runner.config
    }

    /// An empty cache for sequences that will hold at most `capacities[i]` tokens.
    pub fn new_cache(&self, capacities: &[usize]) -> Result<GpuKvCache> {
        let total: usize = capacities.iter().sum();
        let mut slots = Vec::with_capacity(capacities.len());
        let mut first = 0;
        for &cap in capacities {
            slots.push((first, cap, 0));
            first += cap;
        }
        let layers = (0..self.runner.config.num_layers())
            .map(|_| self.runner.layer_cache(total))
            .collect::<Result<_>>()?;
        Ok(GpuKvCache { layers, slots })
    }

    /// Runs each sequence's new tokens (`batch[i]`, appended to sequence `i` of `cache`) and
    /// returns the final hidden states of all new rows, stacked.
    pub fn forward(&self, batch: &[&[u32]], cache: &mut GpuKvCache) -> Result<GpuTensor> {
        if batch.len() != cache.slots.len() {
            return Err(Error::invalid("cache", "one cache slot per sequence"));
        }
        let slots: Vec<usize> = (0..batch.len()).collect();
        self.forward_slots(batch, cache, &slots)
    }

    /// [`GpuModel::forward`] for sequences `slots[i]` of the cache only (`batch[i]` continues
    /// sequence `slots[i]`): the others stay as they are.
    pub fn forward_slots(
        &self,
        batch: &[&[u32]],
        cache: &mut GpuKvCache,
        slots: &[usize],
    ) -> Result<GpuTensor> {
        if slots.iter().any(|&s| s >= cache.slots.len()) || slots.len() != batch.len() {
            return Err(Error::invalid(
                "cache",
                "batch rows name slots the cache lacks",
            ));
        }
        let homes: Vec<CacheSlot> = slots
            .iter()
            .map(|&s| {
                let (first, capacity, filled) = cache.slots[s];
                CacheSlot {
                    first,
                    capacity,
                    filled,
                }
            })
            .collect();
        let r = &self.runner;
        let rb = r.row_batch(batch, &homes)?;
        let mut x = r.input(&self.input, r.gather(&self.embed, &rb)?, &rb)?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = r.attention(&layer.attn, x, &cache.layers[l], &rb)?;
            x = r.mlp(&layer.mlp, x)?;
        }
        let hidden = r.head(&self.head, x)?;
        for (&slot, seq) in slots.iter().zip(batch) {
            cache.slots[slot].2 += seq.len();
        }
        Ok(hidden)
    }

    /// `ln p(targets[i])` under the logits of row `rows[i]` of `hidden` (from
    /// [`GpuModel::forward`]).
    pub fn target_logprobs(
        &self,
        hidden: &GpuTensor,
        rows: &[usize],
        targets: &[u32],
    ) -> Result<Vec<f32>> {
        self.runner
            .reduce_logits(&self.output, hidden, rows, Some(targets))
    }

    fn argmax(&self, hidden: &GpuTensor, rows: &[usize]) -> Result<Vec<u32>> {
        Ok(self
            .runner
            .reduce_logits(&self.output, hidden, rows, None)?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    }

    /// For each sequence of `n >= 2` tokens, `ln p(t_i | t_<i)` for `i = 1..n`.
    pub fn token_logprobs(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        crate::batch::check_scorable(batch)?;
        let mut cache = self.new_cache(&batch.iter().map(|s| s.len()).collect::<Vec<_>>())?;
        let hidden = self.forward(batch, &mut cache)?;
        let (rows, targets) = crate::batch::scoring_rows(batch);
        let flat = self.target_logprobs(&hidden, &rows, &targets)?;
        Ok(crate::batch::split_per_sequence(&flat, batch))
    }

    /// Greedy generation of up to `max_new_tokens` per prompt, stopping a sequence after `stop`.
    pub fn generate_greedy(
        &self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
        stop: Option<u32>,
    ) -> Result<Vec<Vec<u32>>> {
        let mut outputs = vec![Vec::new(); prompts.len()];
        if max_new_tokens == 0 {
            return Ok(outputs);
        }
        let max_context = self.config().max_context();
        let caps: Vec<usize> = prompts
            .iter()
            .map(|p| (p.len() + max_new_tokens).min(max_context))
            .collect();
        let mut cache = self.new_cache(&caps)?;
        let hidden = self.forward(prompts, &mut cache)?;
        let mut next = self.argmax(&hidden, &crate::batch::last_rows(prompts))?;
        let mut done = vec![false; prompts.len()];
        for step in 1..=max_new_tokens {
            for (i, &t) in next.iter().enumerate() {
                if !done[i] {
                    outputs[i].push(t);
                    done[i] = Some(t) == stop
                        || step == max_new_tokens
                        || cache.slots[i].2 >= cache.slots[i].1;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            let live: Vec<usize> = (0..prompts.len()).filter(|&i| !done[i]).collect();
            let tokens: Vec<[u32; 1]> = live.iter().map(|&i| [next[i]]).collect();
            let batch: Vec<&[u32]> = tokens.iter().map(|t| t.as_slice()).collect();
            let hidden = self.forward_slots(&batch, &mut cache, &live)?;
            let ids = self.argmax(&hidden, &(0..live.len()).collect::<Vec<_>>())?;
            for (j, &i) in live.iter().enumerate() {
                next[i] = ids[j];
            }
        }
        Ok(outputs)
    }
}

/// The output projection goes to 8 bits, not 4, under --compress-weight: 4-bit logits over a
/// large vocabulary cost far more accuracy than any layer (SmolLM2's GGUF keeps it in Q8_0 for
/// the same reason), and an f32 head would be the largest thing streamed.
pub(crate) fn output_format(format: WeightFormat) -> WeightFormat {
    if format == WeightFormat::Group4 {
        WeightFormat::Q8
    } else {
        format
    }
}

impl crate::score::Scorer for GpuModel {
    fn config(&self) -> &ModelConfig {
        &self.runner.config
    }
    fn token_logprobs(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        GpuModel::token_logprobs(self, batch)
    }
}
