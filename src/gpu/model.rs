//! Whole-model forward on the WebGPU device (all weights resident, f32): the same recipe as the
//! CPU reference (`crate::cpu`), one kernel per step, with per-layer KV caches on the device.
//!
//! A batch of sequences is laid out as in the reference: their new tokens stacked as rows. The
//! caches of a batch hold every sequence's rows back to back (`first` row and `capacity` per
//! sequence), so attention reads one buffer per layer and new keys and values are appended with
//! plain buffer copies.

use super::kernels::attention::{Attention, RowInfo};
use super::kernels::elementwise::{Elementwise, Op};
use super::kernels::embedding::Embedding;
use super::kernels::kv_quant::{GpuQ4Cache, KvQuant, Q4Layout};
use super::kernels::logprob::Logprob;
use super::kernels::matmul::MatmulF32;
use super::kernels::matmul_q::{GpuPackedWeight, MatmulQ, PackedWeight};
use super::kernels::norm::Norm;
use super::kernels::rope::{self, Rope};
use super::{GpuContext, GpuIndices, GpuTensor};
use crate::cpu::ops::HeadLayout;
use crate::error::{Error, Result};
use crate::model::llama::LlamaSpec;
use crate::model::opt::{self, OptSpec, LAYER_NORM_EPS, POSITION_OFFSET};
use crate::model::{DType, ModelConfig, ModelFiles, TensorSpec, WeightSource};
use crate::quant::group4::Group4;

/// Rows of logits computed at once when scoring.
const LOGIT_ROWS: usize = 128;

/// How linear-layer weights are held on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Decoded to f32.
    F32,
    /// As the file stores them: GGUF Q4_0/Q4_1/Q8_0 blocks run natively (repacked losslessly,
    /// never requantized); f32/f16/bf16 tensors decoded to f32.
    #[default]
    Native,
    /// FlexGen's 4-bit groups of 64 along the input dimension (`--compress-weight`).
    Group4,
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
enum WeightPart {
    F32(GpuTensor),
    Packed(GpuPackedWeight),
}

/// A linear layer's weight `[out, in]`, split by rows into bindings the device accepts.
pub struct GpuLinear {
    /// `(rows of W, first output column)` per part.
    parts: Vec<(WeightPart, usize)>,
    bias: Option<GpuTensor>,
    out: usize,
}

impl GpuLinear {
    fn load(
        ctx: &GpuContext,
        format: WeightFormat,
        weight: &TensorSpec,
        bias: Option<&TensorSpec>,
        source: &dyn WeightSource,
    ) -> Result<Self> {
        let (out, inp) = (weight.shape[0], weight.shape[1]);
        let stored = source.info(&weight.name).map(|i| i.dtype);
        let block = match (format, stored) {
            (WeightFormat::Native, Some(DType::Block(b))) => Some(b),
            _ => None,
        };
        // bytes per row on the device, and rows per part: as many as fit one binding
        let row_bytes = match (block, format) {
            (Some(b), _) => b.bytes_for(inp),
            (None, WeightFormat::Group4) => inp.div_ceil(64) * 32,
            _ => 4 * inp,
        };
        let rows_per_part = ((ctx.max_binding_bytes() as usize) / row_bytes.max(1)).max(1);
        let mut parts = Vec::new();
        let raw;
        let data;
        let (raw_bytes, values): (&[u8], &[f32]) = match block {
            Some(_) => {
                let found = source
                    .info(&weight.name)
                    .map(|i| i.shape)
                    .unwrap_or_default();
                if found != weight.shape {
                    return Err(Error::TensorShape {
                        path: source.path().to_path_buf(),
                        name: weight.name.clone(),
                        expected: weight.shape.clone(),
                        found,
                    });
                }
                raw = source.bytes(&weight.name)?;
                (&raw[..], &[])
            }
            None => {
                data = weight.load_f32(source)?;
                (&[], &data[..])
            }
        };
        let mut row = 0;
        while row < out {
            let rows = rows_per_part.min(out - row);
            let part = match (block, format) {
                (Some(b), _) => {
                    let bytes = &raw_bytes[row * b.bytes_for(inp)..(row + rows) * b.bytes_for(inp)];
                    WeightPart::Packed(GpuPackedWeight::upload(
                        ctx,
                        PackedWeight::from_ggml(b, bytes, rows, inp)?,
                    )?)
                }
                (None, WeightFormat::Group4) => {
                    let q = Group4::quantize(
                        &values[row * inp..(row + rows) * inp],
                        &[rows, inp],
                        1,
                        64,
                    )?;
                    WeightPart::Packed(GpuPackedWeight::upload(
                        ctx,
                        PackedWeight::from_group4(&q)?,
                    )?)
                }
                _ => WeightPart::F32(GpuTensor::upload(
                    ctx,
                    &values[row * inp..(row + rows) * inp],
                    &[rows, inp],
                )?),
            };
            parts.push((part, row));
            row += rows;
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

struct LlamaLayer {
    input_layernorm: GpuTensor,
    q: GpuLinear,
    k: GpuLinear,
    v: GpuLinear,
    o: GpuLinear,
    post_attention_layernorm: GpuTensor,
    gate: GpuLinear,
    up: GpuLinear,
    down: GpuLinear,
}

struct OptNorm {
    weight: GpuTensor,
    bias: GpuTensor,
}

struct OptLayer {
    ln1: OptNorm,
    q: GpuLinear,
    k: GpuLinear,
    v: GpuLinear,
    out: GpuLinear,
    ln2: OptNorm,
    fc1: GpuLinear,
    fc2: GpuLinear,
}

#[allow(clippy::large_enum_variant)] // one per model: the size difference costs nothing
enum Arch {
    Llama {
        layers: Vec<LlamaLayer>,
        norm: GpuTensor,
    },
    Opt {
        positions: GpuTensor,
        project_in: Option<GpuLinear>,
        project_out: Option<GpuLinear>,
        final_norm: Option<OptNorm>,
        layers: Vec<OptLayer>,
    },
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

/// What every layer's attention of one forward call shares.
struct AttentionStep<'a> {
    batch: &'a [&'a [u32]],
    slots: &'a [usize],
    info: &'a GpuIndices,
    layout: HeadLayout,
}

/// Keys and values of one layer: f32 rows, or 4-bit groups.
enum LayerCache {
    F32(GpuTensor, GpuTensor),
    Q4(GpuQ4Cache, GpuQ4Cache),
}

/// Per-layer KV caches of one batch on the device.
pub struct GpuKvCache {
    layers: Vec<LayerCache>,
    /// `(first row, capacity, rows filled)` per sequence.
    slots: Vec<(usize, usize, usize)>,
    width: usize,
}

impl GpuKvCache {
    /// Rows cached for each sequence.
    pub fn lens(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.2).collect()
    }
}

/// A model resident on the device.
pub struct GpuModel {
    ctx: GpuContext,
    options: GpuOptions,
    config: ModelConfig,
    kernels: Kernels,
    embed: GpuTensor,
    /// The output projection: the embedding (tied) or lm_head, as a linear layer.
    output: GpuLinear,
    arch: Arch,
}

impl GpuModel {
    /// Uploads every weight of an opened model, linear weights in `format` (norms, biases and
    /// the embedding table used for lookups are f32).
    pub fn load(ctx: GpuContext, files: &ModelFiles, options: GpuOptions) -> Result<Self> {
        let format = options.weights;
        let source = files.weights.as_ref();
        let kernels = Kernels {
            kv_quant: KvQuant::new(&ctx),
            matmul: MatmulF32::new(&ctx),
            matmul_q: MatmulQ::new(&ctx),
            elementwise: Elementwise::new(&ctx)?,
            norm: Norm::new(&ctx),
            embedding: Embedding::new(&ctx),
            rope: Rope::new(&ctx),
            attention: Attention::new(&ctx),
            logprob: Logprob::new(&ctx),
        };
        let lin =
            |w: &TensorSpec, b: Option<&TensorSpec>| GpuLinear::load(&ctx, format, w, b, source);
        let (embed_spec, output_spec, arch) = match &files.config {
            ModelConfig::Llama(c) => {
                if c.head_dim() > super::kernels::attention::MAX_HEAD_DIM {
                    return Err(Error::Unsupported {
                        what: format!("head_dim {} on the wgpu backend", c.head_dim()),
                    });
                }
                let spec = LlamaSpec::new(c);
                let layers = spec
                    .layers
                    .iter()
                    .map(|l| {
                        Ok(LlamaLayer {
                            input_layernorm: vector(&ctx, &l.input_layernorm, source)?,
                            q: lin(&l.q_proj, None)?,
                            k: lin(&l.k_proj, None)?,
                            v: lin(&l.v_proj, None)?,
                            o: lin(&l.o_proj, None)?,
                            post_attention_layernorm: vector(
                                &ctx,
                                &l.post_attention_layernorm,
                                source,
                            )?,
                            gate: lin(&l.gate_proj, None)?,
                            up: lin(&l.up_proj, None)?,
                            down: lin(&l.down_proj, None)?,
                        })
                    })
                    .collect::<Result<_>>()?;
                let output = spec
                    .lm_head
                    .clone()
                    .unwrap_or_else(|| spec.embed_tokens.clone());
                let arch = Arch::Llama {
                    layers,
                    norm: vector(&ctx, &spec.norm, source)?,
                };
                (spec.embed_tokens, output, arch)
            }
            ModelConfig::Opt(c) => {
                let spec = OptSpec::new(c, files.opt_prefix());
                let norm = |n: &opt::LayerNorm| -> Result<OptNorm> {
                    Ok(OptNorm {
                        weight: vector(&ctx, &n.weight, source)?,
                        bias: vector(&ctx, &n.bias, source)?,
                    })
                };
                let olin = |l: &opt::Linear| lin(&l.weight, l.bias.as_ref());
                let layers = spec
                    .layers
                    .iter()
                    .map(|l| {
                        Ok(OptLayer {
                            ln1: norm(&l.self_attn_layer_norm)?,
                            q: olin(&l.q_proj)?,
                            k: olin(&l.k_proj)?,
                            v: olin(&l.v_proj)?,
                            out: olin(&l.out_proj)?,
                            ln2: norm(&l.final_layer_norm)?,
                            fc1: olin(&l.fc1)?,
                            fc2: olin(&l.fc2)?,
                        })
                    })
                    .collect::<Result<_>>()?;
                let arch = Arch::Opt {
                    positions: vector(&ctx, &spec.embed_positions, source)?,
                    project_in: spec.project_in.as_ref().map(|w| lin(w, None)).transpose()?,
                    project_out: spec
                        .project_out
                        .as_ref()
                        .map(|w| lin(w, None))
                        .transpose()?,
                    final_norm: spec.final_layer_norm.as_ref().map(norm).transpose()?,
                    layers,
                };
                (spec.embed_tokens.clone(), spec.embed_tokens, arch)
            }
        };
        let embed = vector(&ctx, &embed_spec, source)?;
        // The output projection keeps the file's precision under --compress-weight: 4-bit
        // logits over a large vocabulary cost far more accuracy than any layer (SmolLM2's GGUF
        // keeps it in Q8_0 for the same reason).
        let output_format = if format == WeightFormat::Group4 {
            WeightFormat::Native
        } else {
            format
        };
        let output = GpuLinear::load(&ctx, output_format, &output_spec, None, source)?;
        Ok(Self {
            options,
            config: files.config.clone(),
            kernels,
            embed,
            output,
            arch,
            ctx,
        })
    }

    /// The device.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Attention heads of the model.
    fn head_layout(&self) -> HeadLayout {
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

    /// An empty cache for sequences that will hold at most `capacities[i]` tokens.
    pub fn new_cache(&self, capacities: &[usize]) -> Result<GpuKvCache> {
        let width = self.config.kv_width();
        let total: usize = capacities.iter().sum();
        let mut slots = Vec::with_capacity(capacities.len());
        let mut first = 0;
        for &cap in capacities {
            slots.push((first, cap, 0));
            first += cap;
        }
        let q4 = Q4Layout::new(
            width / self.head_layout().head_dim,
            self.head_layout().head_dim,
        );
        let layers = (0..self.config.num_layers())
            .map(|_| {
                Ok(if self.options.compress_cache {
                    LayerCache::Q4(
                        GpuQ4Cache::new(&self.ctx, total.max(1), q4)?,
                        GpuQ4Cache::new(&self.ctx, total.max(1), q4)?,
                    )
                } else {
                    LayerCache::F32(
                        GpuTensor::zeros(&self.ctx, &[total.max(1), width])?,
                        GpuTensor::zeros(&self.ctx, &[total.max(1), width])?,
                    )
                })
            })
            .collect::<Result<_>>()?;
        Ok(GpuKvCache {
            layers,
            slots,
            width,
        })
    }

    fn linear(&self, x: &GpuTensor, l: &GpuLinear) -> Result<GpuTensor> {
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
        let ctx = &self.ctx;
        let vocab = self.config.vocab_size();
        if slots.iter().any(|&s| s >= cache.slots.len()) || slots.len() != batch.len() {
            return Err(Error::invalid(
                "cache",
                "batch rows name slots the cache lacks",
            ));
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut infos = Vec::new();
        for (seq, &slot) in batch.iter().zip(slots) {
            let (first, capacity, filled) = cache.slots[slot];
            if seq.is_empty() {
                return Err(Error::SequenceTooShort {
                    len: 0,
                    needed: 1,
                    what: "run the model",
                });
            }
            if filled + seq.len() > capacity.min(self.config.max_context()) {
                return Err(Error::SequenceTooLong {
                    len: filled + seq.len(),
                    max: capacity.min(self.config.max_context()),
                });
            }
            for (i, &t) in seq.iter().enumerate() {
                if t as usize >= vocab {
                    return Err(Error::TokenOutOfRange {
                        token: t,
                        position: filled + i,
                        vocab_size: vocab,
                    });
                }
                ids.push(t);
                positions.push((filled + i) as u32);
                infos.push(RowInfo {
                    first: first as u32,
                    visible: (filled + i + 1) as u32,
                });
            }
        }
        let rows = ids.len();
        let ids = GpuIndices::upload(ctx, &ids);
        let pos = GpuIndices::upload(ctx, &positions);
        let info = Attention::upload_info(ctx, &infos);
        let k = &self.kernels;

        let hidden = match &self.arch {
            Arch::Llama { layers, norm } => {
                let ModelConfig::Llama(c) = &self.config else {
                    unreachable!("arch matches config")
                };
                let eps = c.rms_norm_eps as f32;
                let hd = c.head_dim();
                let layout = HeadLayout {
                    heads: c.num_attention_heads,
                    kv_heads: c.kv_heads(),
                    head_dim: hd,
                };
                let abs_pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
                let (cos, sin) = rope::tables(&abs_pos, hd, c.rope_theta);
                let cos = GpuTensor::upload(ctx, &cos, &[rows, hd / 2])?;
                let sin = GpuTensor::upload(ctx, &sin, &[rows, hd / 2])?;
                let x = GpuTensor::zeros(ctx, &[rows, c.hidden_size])?;
                k.embedding.run(ctx, &self.embed, None, &ids, &pos, &x)?;
                for (li, l) in layers.iter().enumerate() {
                    let h = GpuTensor::zeros(ctx, &x.shape)?;
                    k.norm.rms_norm(ctx, &x, &l.input_layernorm, &h, eps)?;
                    let q = self.linear(&h, &l.q)?;
                    let kn = self.linear(&h, &l.k)?;
                    let vn = self.linear(&h, &l.v)?;
                    k.rope.run(ctx, &q, &cos, &sin, hd)?;
                    k.rope.run(ctx, &kn, &cos, &sin, hd)?;
                    let step = AttentionStep {
                        batch,
                        slots,
                        info: &info,
                        layout,
                    };
                    let o = self.attend(cache, li, &step, [&q, &kn, &vn], &l.o)?;
                    k.elementwise.binary(ctx, Op::Add, &x, &o)?;
                    let h = GpuTensor::zeros(ctx, &x.shape)?;
                    k.norm
                        .rms_norm(ctx, &x, &l.post_attention_layernorm, &h, eps)?;
                    let gate = self.linear(&h, &l.gate)?;
                    let up = self.linear(&h, &l.up)?;
                    k.elementwise.binary(ctx, Op::SiluMul, &gate, &up)?;
                    let d = self.linear(&gate, &l.down)?;
                    k.elementwise.binary(ctx, Op::Add, &x, &d)?;
                }
                let out = GpuTensor::zeros(ctx, &x.shape)?;
                k.norm.rms_norm(ctx, &x, norm, &out, eps)?;
                out
            }
            Arch::Opt {
                positions: pos_table,
                project_in,
                project_out,
                final_norm,
                layers,
            } => {
                let ModelConfig::Opt(c) = &self.config else {
                    unreachable!("arch matches config")
                };
                let hd = c.head_dim();
                let layout = HeadLayout {
                    heads: c.num_attention_heads,
                    kv_heads: c.num_attention_heads,
                    head_dim: hd,
                };
                let e = GpuTensor::zeros(ctx, &[rows, c.embed_dim()])?;
                k.embedding.run(ctx, &self.embed, None, &ids, &pos, &e)?;
                let x = match project_in {
                    Some(p) => self.linear(&e, p)?,
                    None => e,
                };
                // learned positions: gather rows pos + 2 of the position table and add them
                let p = GpuTensor::zeros(ctx, &x.shape)?;
                k.embedding.run(
                    ctx,
                    pos_table,
                    None,
                    &GpuIndices::upload(
                        ctx,
                        &positions
                            .iter()
                            .map(|&q| q + POSITION_OFFSET as u32)
                            .collect::<Vec<_>>(),
                    ),
                    &pos,
                    &p,
                )?;
                k.elementwise.binary(ctx, Op::Add, &x, &p)?;
                let norm = |n: &OptNorm, input: &GpuTensor| -> Result<GpuTensor> {
                    let y = GpuTensor::zeros(ctx, &input.shape)?;
                    k.norm
                        .layer_norm(ctx, input, &n.weight, &n.bias, &y, LAYER_NORM_EPS)?;
                    Ok(y)
                };
                let pre = c.do_layer_norm_before;
                let mut x = x;
                for (li, l) in layers.iter().enumerate() {
                    let h = if pre {
                        norm(&l.ln1, &x)?
                    } else {
                        self.copy(&x)?
                    };
                    let q = self.linear(&h, &l.q)?;
                    let kn = self.linear(&h, &l.k)?;
                    let vn = self.linear(&h, &l.v)?;
                    let step = AttentionStep {
                        batch,
                        slots,
                        info: &info,
                        layout,
                    };
                    let o = self.attend(cache, li, &step, [&q, &kn, &vn], &l.out)?;
                    k.elementwise.binary(ctx, Op::Add, &x, &o)?;
                    if !pre {
                        x = norm(&l.ln1, &x)?;
                    }
                    let h = if pre {
                        norm(&l.ln2, &x)?
                    } else {
                        self.copy(&x)?
                    };
                    let f = self.linear(&h, &l.fc1)?;
                    k.elementwise.unary(ctx, Op::Relu, &f)?;
                    let d = self.linear(&f, &l.fc2)?;
                    k.elementwise.binary(ctx, Op::Add, &x, &d)?;
                    if !pre {
                        x = norm(&l.ln2, &x)?;
                    }
                }
                if let Some(n) = final_norm {
                    x = norm(n, &x)?;
                }
                match project_out {
                    Some(p) => self.linear(&x, p)?,
                    None => x,
                }
            }
        };
        for (&slot, seq) in slots.iter().zip(batch) {
            cache.slots[slot].2 += seq.len();
        }
        Ok(hidden)
    }

    /// Appends the new keys and values to `layer`'s caches, attends with the queries, and
    /// applies the output projection: `out(attention(q, K, V))`.
    fn attend(
        &self,
        cache: &GpuKvCache,
        layer: usize,
        step: &AttentionStep,
        [q, k, v]: [&GpuTensor; 3],
        out: &GpuLinear,
    ) -> Result<GpuTensor> {
        let a = GpuTensor::zeros(&self.ctx, &q.shape)?;
        let scale = 1.0 / (step.layout.head_dim as f32).sqrt();
        match &cache.layers[layer] {
            LayerCache::F32(kc, vc) => {
                self.append(kc, vc, cache, step.batch, step.slots, k, v);
                self.kernels.attention.run(
                    &self.ctx,
                    q,
                    kc,
                    vc,
                    step.info,
                    &a,
                    step.layout,
                    scale,
                )?;
            }
            LayerCache::Q4(kc, vc) => {
                // the rows' info names their own cache positions: quantize them there
                self.kernels.kv_quant.store(&self.ctx, k, step.info, kc)?;
                self.kernels.kv_quant.store(&self.ctx, v, step.info, vc)?;
                self.kernels.kv_quant.attend(
                    &self.ctx,
                    q,
                    kc,
                    vc,
                    step.info,
                    &a,
                    step.layout,
                    scale,
                )?;
            }
        }
        self.linear(&a, out)
    }

    fn copy(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let y = GpuTensor::zeros(&self.ctx, &x.shape)?;
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&x.buffer, 0, &y.buffer, 0, (x.numel() * 4) as u64);
        self.ctx.queue.submit([enc.finish()]);
        Ok(y)
    }

    /// Copies each sequence's new key and value rows into its cache slot in `layer`.
    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        kc: &GpuTensor,
        vc: &GpuTensor,
        cache: &GpuKvCache,
        batch: &[&[u32]],
        slots: &[usize],
        k: &GpuTensor,
        v: &GpuTensor,
    ) {
        let row_bytes = (cache.width * 4) as u64;
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        let mut src_row = 0u64;
        for (seq, &slot) in batch.iter().zip(slots) {
            let (first, _, filled) = cache.slots[slot];
            let dst = (first + filled) as u64 * row_bytes;
            let bytes = seq.len() as u64 * row_bytes;
            enc.copy_buffer_to_buffer(&k.buffer, src_row * row_bytes, &kc.buffer, dst, bytes);
            enc.copy_buffer_to_buffer(&v.buffer, src_row * row_bytes, &vc.buffer, dst, bytes);
            src_row += seq.len() as u64;
        }
        self.ctx.queue.submit([enc.finish()]);
    }

    /// Logits-derived values for hidden rows, a chunk at a time: target logprobs when `targets`
    /// is given, else argmax ids (as f32 bits).
    fn reduce_logits(
        &self,
        hidden: &GpuTensor,
        row_ids: &[usize],
        targets: Option<&[u32]>,
    ) -> Result<Vec<f32>> {
        let ctx = &self.ctx;
        let width = hidden.shape[1];
        let mut out = Vec::with_capacity(row_ids.len());
        let all = hidden.download(ctx)?; // small next to the logits: rows x width
        for (ci, chunk) in row_ids.chunks(LOGIT_ROWS).enumerate() {
            let rows: Vec<f32> = chunk
                .iter()
                .flat_map(|&r| all[r * width..(r + 1) * width].iter().copied())
                .collect();
            let h = GpuTensor::upload(ctx, &rows, &[chunk.len(), width])?;
            let logits = self.linear(&h, &self.output)?;
            let res = GpuTensor::zeros(ctx, &[chunk.len()])?;
            match targets {
                Some(t) => {
                    let t = &t[ci * LOGIT_ROWS..ci * LOGIT_ROWS + chunk.len()];
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

    /// `ln p(targets[i])` under the logits of row `rows[i]` of `hidden` (from
    /// [`GpuModel::forward`]).
    pub fn target_logprobs(
        &self,
        hidden: &GpuTensor,
        rows: &[usize],
        targets: &[u32],
    ) -> Result<Vec<f32>> {
        if rows.len() != targets.len() {
            return Err(Error::invalid("targets", "one target per row"));
        }
        if let Some(&t) = targets
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size())
        {
            return Err(Error::TokenOutOfRange {
                token: t,
                position: 0,
                vocab_size: self.config.vocab_size(),
            });
        }
        self.reduce_logits(hidden, rows, Some(targets))
    }

    /// For each sequence of `n >= 2` tokens, `ln p(t_i | t_<i)` for `i = 1..n`.
    pub fn token_logprobs(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        crate::batch::check_scorable(batch)?;
        let mut cache = self.new_cache(&batch.iter().map(|s| s.len()).collect::<Vec<_>>())?;
        let hidden = self.forward(batch, &mut cache)?;
        let (rows, targets) = crate::batch::scoring_rows(batch);
        let flat = self.reduce_logits(&hidden, &rows, Some(&targets))?;
        let out = crate::batch::split_per_sequence(&flat, batch);
        Ok(out)
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
        let caps: Vec<usize> = prompts
            .iter()
            .map(|p| (p.len() + max_new_tokens).min(self.config.max_context()))
            .collect();
        let mut cache = self.new_cache(&caps)?;
        let hidden = self.forward(prompts, &mut cache)?;
        let last = crate::batch::last_rows(prompts);
        let mut next: Vec<u32> = self
            .reduce_logits(&hidden, &last, None)?
            .iter()
            .map(|v| v.to_bits())
            .collect();
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
            let ids = self.reduce_logits(&hidden, &(0..live.len()).collect::<Vec<_>>(), None)?;
            for (j, &i) in live.iter().enumerate() {
                next[i] = ids[j].to_bits();
            }
        }
        Ok(outputs)
    }
}

impl crate::score::Scorer for GpuModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn token_logprobs(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        GpuModel::token_logprobs(self, batch)
    }
}
