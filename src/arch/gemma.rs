//! Gemma 2 and Gemma 3 (text): RMSNorm with `(1 + w)` weights, norms after attention and after
//! the MLP as well as before, a GeGLU MLP (tanh GELU), an embedding scaled by `sqrt(hidden)`,
//! attention scaled by `query_pre_attn_scalar^-1/2`, and sliding-window layers between global
//! ones. Gemma 2 soft-caps attention scores and the final logits; Gemma 3 normalizes each q and
//! k head and gives its local layers their own RoPE base.
//!
//! ```text
//! x = embed(ids) * sqrt(hidden)
//! per layer:  x = x + post_attn(o(attn(rope(q(n1)), rope(k(n1)), v(n1))))   n1 = in_norm(x)
//!             x = x + post_ffn(down(gelu_tanh(gate(n2)) * up(n2)))           n2 = pre_ffn(x)
//! logits = embed^T norm(x)   (Gemma 2: cap * tanh(logits / cap))
//! ```
//!
//! Gemma's RMSNorm multiplies by `1 + w`. The GGUF converter stores `1 + w`; a Hugging Face
//! checkpoint stores `w`, and its norms are read through [`crate::model::ShiftedNorms`], so that
//! every device and the reference multiply by the stored weight as for Llama. Layers alternate
//! (Gemma 2: local, global, ...; Gemma 3: five local, one global): a local layer's query sees
//! its own key and the `sliding_window - 1` before it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::common::{
    malformed, ArchKeys, DecoderSizes, ModelParts, PartSpec, PartWeights, RowBatch, Runner,
};
use super::llama::lift_rope_parameters;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::layout::HeadLayout;
use crate::model::gguf::{GgufFile, GgufValue};
use crate::model::TensorSpec;
use crate::policy::cost::ModelShape;

/// Which Gemma.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmaGeneration {
    /// Gemma 2: soft-capping, local and global layers in turn.
    #[default]
    Gemma2,
    /// Gemma 3: q/k norms, five local layers to one global, a local RoPE base.
    Gemma3,
}

/// A Gemma 2 or Gemma 3 text `config.json` (`model_type` `gemma2` or `gemma3_text`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmaConfig {
    /// Gemma 2 or 3 (from `model_type`).
    #[serde(default)]
    pub generation: GemmaGeneration,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the GeGLU hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width.
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// Context window.
    #[serde(default = "default_context")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base of the global layers.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling of the global layers (absent, `linear`; Gemma 3's larger models use 8).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Gemma 3: RoPE base of the local layers (10000).
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    #[serde(default = "default_query_scalar")]
    pub query_pre_attn_scalar: f64,
    /// Keys a local layer's query sees, its own included.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Gemma 3: every `n`-th layer is global (6).
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// `full_attention` or `sliding_attention` per layer (transformers 5).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 2: final logits soft-capped at this (30).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2: attention scores soft-capped at this (50).
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// The MLP's activation (`gelu_pytorch_tanh`).
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// Older configs' name for it.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Whether the output projection is the embedding (always, for released Gemmas).
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v, o (unsupported when true).
    #[serde(default)]
    pub attention_bias: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token (a list in some configs: the first is used).
    #[serde(default, deserialize_with = "super::llama::one_or_many")]
    pub eos_token_id: Option<u32>,
}

fn default_head_dim() -> usize {
    256
}
fn default_context() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_query_scalar() -> f64 {
    256.0
}
fn yes() -> bool {
    true
}

/// Maps transformers 5's per-layer-type `rope_parameters` (`{"full_attention": {...},
/// "sliding_attention": {...}}`) onto `rope_theta`, `rope_scaling` (the global layers') and
/// `rope_local_base_freq`; a single `rope_parameters` as Llama's.
pub(super) fn lift_gemma_rope(value: &mut serde_json::Value, model_type: &str) {
    let Some(obj) = value.as_object_mut() else {
        return;
    };
    let generation = if model_type == "gemma2" {
        "gemma2"
    } else {
        "gemma3"
    };
    obj.insert("generation".into(), generation.into());
    let params = obj.get("rope_parameters").cloned();
    let per_type = params.as_ref().and_then(|p| {
        Some((
            p.get("full_attention")?.clone(),
            p.get("sliding_attention").cloned(),
        ))
    });
    match per_type {
        Some((full, sliding)) => {
            if let Some(theta) = full.get("rope_theta") {
                obj.entry("rope_theta").or_insert_with(|| theta.clone());
            }
            let kind = full.get("rope_type").and_then(|t| t.as_str());
            if kind.is_some_and(|t| t != "default") {
                obj.entry("rope_scaling").or_insert(full.clone());
            }
            if let Some(theta) = sliding.as_ref().and_then(|s| s.get("rope_theta")) {
                obj.entry("rope_local_base_freq")
                    .or_insert_with(|| theta.clone());
            }
        }
        None => lift_rope_parameters(value),
    }
}

impl GemmaConfig {
    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Whether layer `l` is a local (sliding-window) one, as transformers decides it:
    /// `layer_types` when given; else Gemma 2's even layers, Gemma 3's all but every
    /// `sliding_window_pattern`-th; none without a window.
    pub fn is_local(&self, l: usize) -> bool {
        if self.sliding_window.is_none() {
            return false;
        }
        if let Some(types) = &self.layer_types {
            return types.get(l).is_some_and(|t| t == "sliding_attention");
        }
        match self.generation {
            GemmaGeneration::Gemma2 => l.is_multiple_of(2),
            GemmaGeneration::Gemma3 => {
                let pattern = self.sliding_window_pattern.unwrap_or(6).max(1);
                !(l + 1).is_multiple_of(pattern)
            }
        }
    }

    /// The global layers' RoPE inverse frequencies (`linear` scaling divides them).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let base = crate::device::rope_inv_freq(self.head_dim, self.rope_theta);
        match self.linear_factor() {
            Ok(Some(f)) => base.iter().map(|x| x / f).collect(),
            _ => base,
        }
    }

    /// The local layers' RoPE inverse frequencies (Gemma 3's own base; Gemma 2's is the
    /// model's).
    pub fn local_inv_freq(&self) -> Vec<f64> {
        match self.rope_local_base_freq {
            Some(theta) => crate::device::rope_inv_freq(self.head_dim, theta),
            None => crate::device::rope_inv_freq(self.head_dim, self.rope_theta),
        }
    }

    /// The global layers' linear RoPE factor, or what is wrong with `rope_scaling`.
    fn linear_factor(&self) -> std::result::Result<Option<f64>, String> {
        let Some(v) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        match kind {
            "default" => Ok(None),
            "linear" => v
                .get("factor")
                .and_then(|f| f.as_f64())
                .filter(|f| f.is_finite() && *f > 0.0)
                .map(Some)
                .ok_or_else(|| "rope_scaling linear needs a positive factor".into()),
            other => Err(format!(
                "rope_scaling type `{other}` is not supported for Gemma (default, linear)"
            )),
        }
    }

    /// Checks that the configuration describes a model ferrogen can run; `path` names the
    /// file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let c = self;
        DecoderSizes {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.kv_heads(),
            head_dim: c.head_dim,
            max_position_embeddings: c.max_position_embeddings,
        }
        .check(path)?;
        let unsupported = |what: String| Err(Error::Unsupported { what });
        if let Err(why) = c.linear_factor() {
            return unsupported(format!("{}: {why}", path.display()));
        }
        let act = c.hidden_activation.as_ref().or(c.hidden_act.as_ref());
        if act.is_some_and(|a| a != "gelu_pytorch_tanh" && a != "gelu_tanh") {
            return unsupported(format!("{}: Gemma activation {act:?}", path.display()));
        }
        if c.attention_bias {
            return unsupported(format!("{}: Gemma with biases", path.display()));
        }
        let positive_finite = |v: f64| v.is_finite() && v > 0.0;
        let caps = [c.final_logit_softcapping, c.attn_logit_softcapping];
        if !positive_finite(c.rms_norm_eps)
            || !positive_finite(c.rope_theta)
            || !positive_finite(c.query_pre_attn_scalar)
            || caps.iter().flatten().any(|&v| !positive_finite(v))
            || c.sliding_window == Some(0)
        {
            return Err(Error::config(
                path,
                "rms_norm_eps, rope_theta, query_pre_attn_scalar, the soft-caps and \
                 sliding_window must be positive",
            ));
        }
        if c.layer_types
            .as_ref()
            .is_some_and(|t| t.len() != c.num_hidden_layers)
        {
            return Err(Error::config(
                path,
                "`layer_types` does not list every layer",
            ));
        }
        Ok(())
    }
}

/// The configuration a Gemma GGUF file describes (`gemma2.*` / `gemma3.*` keys). llama.cpp
/// keeps no `query_pre_attn_scalar`: it is the head width, but `hidden / heads` for the 27B
/// models (46 layers for Gemma 2, 62 for Gemma 3), as llama.cpp computes it.
pub(super) fn from_gguf(file: &GgufFile, arch: &str) -> Result<GemmaConfig> {
    let generation = match arch {
        "gemma2" => GemmaGeneration::Gemma2,
        _ => GemmaGeneration::Gemma3,
    };
    let keys = ArchKeys { file, arch };
    let hidden = keys.count("embedding_length")?;
    let vocab_size = keys.vocabulary(hidden)?;
    let heads = keys.count("attention.head_count")?;
    let layers = keys.count("block_count")?;
    let head_dim = keys
        .optional("attention.key_length")?
        .unwrap_or(hidden / heads.max(1));
    let is_27b = matches!(
        (generation, layers),
        (GemmaGeneration::Gemma2, 46) | (GemmaGeneration::Gemma3, 62)
    );
    let rope_scaling = match file
        .get(&keys.key("rope.scaling.type"))
        .and_then(GgufValue::as_str)
    {
        Some("linear") => keys
            .float("rope.scaling.factor")?
            .map(|f| serde_json::json!({"rope_type": "linear", "factor": f})),
        None | Some("none") => None,
        Some(other) => {
            return Err(Error::Unsupported {
                what: format!("{}: RoPE scaling `{other}`", file.path().display()),
            })
        }
    };
    Ok(GemmaConfig {
        generation,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: keys.count("feed_forward_length")?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: keys.optional("attention.head_count_kv")?,
        head_dim,
        max_position_embeddings: keys.count("context_length")?,
        rms_norm_eps: keys
            .float("attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-6),
        rope_theta: keys.float("rope.freq_base")?.unwrap_or(10000.0),
        rope_scaling,
        rope_local_base_freq: match generation {
            GemmaGeneration::Gemma3 => Some(keys.float("rope.freq_base_swa")?.unwrap_or(10000.0)),
            GemmaGeneration::Gemma2 => None,
        },
        query_pre_attn_scalar: if is_27b {
            (hidden / heads.max(1)) as f64
        } else {
            head_dim as f64
        },
        sliding_window: keys
            .optional("attention.sliding_window")?
            .filter(|&w| w > 0)
            .or(match generation {
                GemmaGeneration::Gemma2 => Some(4096),
                GemmaGeneration::Gemma3 => None,
            }),
        sliding_window_pattern: keys.optional("attention.sliding_window_pattern")?,
        layer_types: None,
        final_logit_softcapping: keys.float("final_logit_softcapping")?,
        attn_logit_softcapping: keys.float("attn_logit_softcapping")?,
        hidden_activation: None,
        hidden_act: None,
        tie_word_embeddings: file.tensor_shape("output.weight").is_none(),
        attention_bias: false,
        bos_token_id: keys.token_id("bos"),
        eos_token_id: keys.token_id("eos"),
    })
}

/// Maps a Gemma GGUF tensor name to its Hugging Face name (nothing is permuted).
pub(super) fn gguf_tensor_name(gguf: &str) -> (String, Option<usize>) {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return (f.to_string(), None);
    }
    let Some((layer, part)) = gguf.strip_prefix("blk.").and_then(|r| r.split_once('.')) else {
        return (gguf.to_string(), None);
    };
    let Some((module, kind)) = part.rsplit_once('.') else {
        return (gguf.to_string(), None);
    };
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" => "pre_feedforward_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return (gguf.to_string(), None),
    };
    (format!("model.layers.{layer}.{hf}.{kind}"), None)
}

/// The tensors of one Gemma decoder layer.
#[derive(Debug, Clone)]
pub struct GemmaLayerSpec {
    /// RMSNorm before attention `[hidden]`.
    pub input_layernorm: TensorSpec,
    /// `[heads * head_dim, hidden]`.
    pub q_proj: TensorSpec,
    /// `[kv_heads * head_dim, hidden]`.
    pub k_proj: TensorSpec,
    /// `[kv_heads * head_dim, hidden]`.
    pub v_proj: TensorSpec,
    /// `[hidden, heads * head_dim]`.
    pub o_proj: TensorSpec,
    /// Gemma 3: RMSNorm of each query head `[head_dim]`.
    pub q_norm: Option<TensorSpec>,
    /// Gemma 3: RMSNorm of each key head `[head_dim]`.
    pub k_norm: Option<TensorSpec>,
    /// RMSNorm of the attention's output `[hidden]`.
    pub post_attention_layernorm: TensorSpec,
    /// RMSNorm before the MLP `[hidden]`.
    pub pre_feedforward_layernorm: TensorSpec,
    /// RMSNorm of the MLP's output `[hidden]`.
    pub post_feedforward_layernorm: TensorSpec,
    /// `[intermediate, hidden]`.
    pub gate_proj: TensorSpec,
    /// `[intermediate, hidden]`.
    pub up_proj: TensorSpec,
    /// `[hidden, intermediate]`.
    pub down_proj: TensorSpec,
}

/// All of a Gemma model's tensors.
#[derive(Debug, Clone)]
pub struct GemmaSpec {
    /// `[vocab, hidden]`.
    pub embed_tokens: TensorSpec,
    /// The decoder layers.
    pub layers: Vec<GemmaLayerSpec>,
    /// Final RMSNorm `[hidden]`.
    pub norm: TensorSpec,
    /// `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<TensorSpec>,
}

impl GemmaSpec {
    /// The tensors of `c` under transformers' names.
    pub fn new(c: &GemmaConfig) -> Self {
        let (h, i, q, kv, d) = (
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads * c.head_dim,
            c.kv_heads() * c.head_dim,
            c.head_dim,
        );
        let t = |name: String, shape: &[usize]| TensorSpec::new(name, shape);
        let head_norms = c.generation == GemmaGeneration::Gemma3;
        let layers = (0..c.num_hidden_layers)
            .map(|n| {
                let l = format!("model.layers.{n}.");
                GemmaLayerSpec {
                    input_layernorm: t(format!("{l}input_layernorm.weight"), &[h]),
                    q_proj: t(format!("{l}self_attn.q_proj.weight"), &[q, h]),
                    k_proj: t(format!("{l}self_attn.k_proj.weight"), &[kv, h]),
                    v_proj: t(format!("{l}self_attn.v_proj.weight"), &[kv, h]),
                    o_proj: t(format!("{l}self_attn.o_proj.weight"), &[h, q]),
                    q_norm: head_norms.then(|| t(format!("{l}self_attn.q_norm.weight"), &[d])),
                    k_norm: head_norms.then(|| t(format!("{l}self_attn.k_norm.weight"), &[d])),
                    post_attention_layernorm: t(
                        format!("{l}post_attention_layernorm.weight"),
                        &[h],
                    ),
                    pre_feedforward_layernorm: t(
                        format!("{l}pre_feedforward_layernorm.weight"),
                        &[h],
                    ),
                    post_feedforward_layernorm: t(
                        format!("{l}post_feedforward_layernorm.weight"),
                        &[h],
                    ),
                    gate_proj: t(format!("{l}mlp.gate_proj.weight"), &[i, h]),
                    up_proj: t(format!("{l}mlp.up_proj.weight"), &[i, h]),
                    down_proj: t(format!("{l}mlp.down_proj.weight"), &[h, i]),
                }
            })
            .collect();
        Self {
            embed_tokens: t("model.embed_tokens.weight".into(), &[c.vocab_size, h]),
            layers,
            norm: t("model.norm.weight".into(), &[h]),
            lm_head: (!c.tie_word_embeddings)
                .then(|| t("lm_head.weight".into(), &[c.vocab_size, h])),
        }
    }

    /// Every RMSNorm weight (Gemma's `1 + w` ones), by name.
    pub fn norms(&self) -> Vec<String> {
        let mut out = vec![self.norm.name.clone()];
        for l in &self.layers {
            out.extend(
                [
                    Some(&l.input_layernorm),
                    l.q_norm.as_ref(),
                    l.k_norm.as_ref(),
                    Some(&l.post_attention_layernorm),
                    Some(&l.pre_feedforward_layernorm),
                    Some(&l.post_feedforward_layernorm),
                ]
                .into_iter()
                .flatten()
                .map(|t| t.name.clone()),
            );
        }
        out
    }
}

/// The units' tensors. Attention (local layers marked sliding): vectors `[input_layernorm,
/// q_norm, k_norm, post_attention_layernorm]` (the head norms `None` for Gemma 2), linears
/// `[q, k, v, o]`; MLP: `[pre_feedforward_layernorm, post_feedforward_layernorm]`,
/// `[gate, up, down]`; head: `[norm]`; no input weights.
pub(super) fn parts(c: &GemmaConfig) -> ModelParts {
    let s = GemmaSpec::new(c);
    let lin = |t: &TensorSpec| Some((t.clone(), None));
    let layers = s
        .layers
        .iter()
        .enumerate()
        .map(|(n, l)| {
            [
                PartSpec {
                    sliding: c.is_local(n),
                    vectors: vec![
                        Some(l.input_layernorm.clone()),
                        l.q_norm.clone(),
                        l.k_norm.clone(),
                        Some(l.post_attention_layernorm.clone()),
                    ],
                    linears: vec![
                        lin(&l.q_proj),
                        lin(&l.k_proj),
                        lin(&l.v_proj),
                        lin(&l.o_proj),
                    ],
                },
                PartSpec {
                    sliding: false,
                    vectors: vec![
                        Some(l.pre_feedforward_layernorm.clone()),
                        Some(l.post_feedforward_layernorm.clone()),
                    ],
                    linears: vec![lin(&l.gate_proj), lin(&l.up_proj), lin(&l.down_proj)],
                },
            ]
        })
        .collect();
    ModelParts {
        input: PartSpec::default(),
        layers,
        head: PartSpec {
            sliding: false,
            vectors: vec![Some(s.norm.clone())],
            linears: Vec::new(),
        },
        output: s.lm_head.unwrap_or_else(|| s.embed_tokens.clone()),
        embedding: s.embed_tokens,
    }
}

/// Query heads, key/value heads and their width.
pub(super) fn head_layout(c: &GemmaConfig) -> HeadLayout {
    HeadLayout {
        heads: c.num_attention_heads,
        kv_heads: c.kv_heads(),
        head_dim: c.head_dim,
    }
}

/// Sizes for the cost model.
pub(super) fn shape(c: &GemmaConfig) -> ModelShape {
    let h = c.hidden_size as f64;
    let (qw, kvw) = (
        (c.num_attention_heads * c.head_dim) as f64,
        (c.kv_heads() * c.head_dim) as f64,
    );
    let f = c.intermediate_size as f64;
    // q, k, v, o, gate, up, down, four RMSNorms
    let layer = h * qw + 2.0 * h * kvw + qw * h + 3.0 * h * f + 4.0 * h;
    let tables = if c.tie_word_embeddings { 1.0 } else { 2.0 };
    let head_norms = if c.generation == GemmaGeneration::Gemma3 {
        2.0 * c.head_dim as f64
    } else {
        0.0
    };
    ModelShape {
        layers: c.num_hidden_layers,
        hidden: c.hidden_size,
        heads: c.num_attention_heads,
        q_width: qw as usize,
        kv_width: kvw as usize,
        ffn: c.intermediate_size,
        ffn_live: 2,
        linear_calls: 7,
        layer_values: layer,
        head_values: tables * c.vocab_size as f64 * h + h,
        head_macs: c.vocab_size as f64 * h,
        // four RMSNorms (and Gemma 3's head norms) per layer, and the final one
        resident_values: c.num_hidden_layers as f64 * (4.0 * h + head_norms) + h,
    }
}

/// Embedded tokens scaled by `sqrt(hidden)`.
pub(super) fn input<D: Device>(r: &Runner<D>, c: &GemmaConfig, e: D::Tensor) -> Result<D::Tensor> {
    r.dev.scale(&e, (c.hidden_size as f32).sqrt())?;
    Ok(e)
}

/// `x + post_norm(o(attend(q, k, v)))` with q, k, v of `in_norm(x)`, q and k head-normed
/// (Gemma 3) and rotated, q scaled by `sqrt(head_dim / query_pre_attn_scalar)` (the
/// attention's own `1 / sqrt(head_dim)` then gives `query_pre_attn_scalar^-1/2`).
pub(super) fn attention<D: Device>(
    r: &Runner<D>,
    c: &GemmaConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
    rb: &RowBatch<D>,
    attend: impl FnOnce(&D::Tensor, &D::Tensor, &D::Tensor) -> Result<D::Tensor>,
) -> Result<D::Tensor> {
    let ([Some(norm), q_norm, k_norm, Some(post)], [Some(q), Some(k), Some(v), Some(o)]) =
        (&w.vectors[..], &w.linears[..])
    else {
        return Err(malformed("Gemma attention"));
    };
    let eps = c.rms_norm_eps as f32;
    let n = r.dev.rms_norm(&x, norm, eps)?;
    let (mut qt, mut kt, vt) = (r.linear(&n, q)?, r.linear(&n, k)?, r.linear(&n, v)?);
    if let (Some(qn), Some(kn)) = (q_norm, k_norm) {
        qt = r.head_norm(&qt, qn, eps)?;
        kt = r.head_norm(&kt, kn, eps)?;
    }
    r.dev.rope(&qt, &rb.dev, c.head_dim)?;
    r.dev.rope(&kt, &rb.dev, c.head_dim)?;
    r.dev.scale(
        &qt,
        (c.head_dim as f64 / c.query_pre_attn_scalar).sqrt() as f32,
    )?;
    let a = attend(&qt, &kt, &vt)?;
    let y = r.linear(&a, o)?;
    let y = r.dev.rms_norm(&y, post, eps)?;
    r.dev.add(&x, &y)?;
    Ok(x)
}

/// `x + post_norm(down(gelu_tanh(gate(n)) * up(n)))` with `n = pre_norm(x)`.
pub(super) fn mlp<D: Device>(
    r: &Runner<D>,
    c: &GemmaConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
) -> Result<D::Tensor> {
    let ([Some(pre), Some(post)], [Some(gate), Some(up), Some(down)]) =
        (&w.vectors[..], &w.linears[..])
    else {
        return Err(malformed("Gemma MLP"));
    };
    let eps = c.rms_norm_eps as f32;
    let n = r.dev.rms_norm(&x, pre, eps)?;
    let (g, u) = (r.linear(&n, gate)?, r.linear(&n, up)?);
    r.dev.gelu_tanh_mul(&g, &u)?;
    let d = r.linear(&g, down)?;
    let d = r.dev.rms_norm(&d, post, eps)?;
    r.dev.add(&x, &d)?;
    Ok(x)
}

/// The final RMSNorm.
pub(super) fn head<D: Device>(
    r: &Runner<D>,
    c: &GemmaConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
) -> Result<D::Tensor> {
    let [Some(norm)] = &w.vectors[..] else {
        return Err(malformed("Gemma head"));
    };
    r.dev.rms_norm(&x, norm, c.rms_norm_eps as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ModelConfig;

    fn gemma(text: &str) -> GemmaConfig {
        match ModelConfig::from_json_str(text, Path::new("c.json")) {
            Ok(ModelConfig::Gemma(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn layers_alternate_as_transformers_says() {
        let base = r#""vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 7, "num_attention_heads": 4, "sliding_window": 16"#;
        let g2 = gemma(&format!(r#"{{"model_type": "gemma2", {base}}}"#));
        let local: Vec<bool> = (0..7).map(|l| g2.is_local(l)).collect();
        assert_eq!(local, [true, false, true, false, true, false, true]);
        let g3 = gemma(&format!(
            r#"{{"model_type": "gemma3_text", {base},
            "rope_parameters": {{"full_attention": {{"rope_type": "linear", "factor": 8.0,
            "rope_theta": 1000000.0}}, "sliding_attention": {{"rope_type": "default",
            "rope_theta": 10000.0}}}}}}"#
        ));
        let local: Vec<bool> = (0..7).map(|l| g3.is_local(l)).collect();
        assert_eq!(local, [true, true, true, true, true, false, true]);
        assert_eq!(g3.rope_theta, 1e6);
        assert_eq!(g3.rope_local_base_freq, Some(1e4));
        let global = g3.rope_inv_freq();
        assert_eq!(global[0], 1.0 / 8.0);
        assert_eq!(g3.local_inv_freq()[0], 1.0);
    }

    #[test]
    fn gguf_names_map_to_hugging_face() {
        assert_eq!(
            gguf_tensor_name("blk.3.post_ffw_norm.weight").0,
            "model.layers.3.post_feedforward_layernorm.weight"
        );
        assert_eq!(
            gguf_tensor_name("blk.0.ffn_norm.weight").0,
            "model.layers.0.pre_feedforward_layernorm.weight"
        );
    }
}
