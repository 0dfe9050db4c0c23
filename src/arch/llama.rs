//! Llama: RMSNorm, rotary positions, grouped-query attention, a SwiGLU MLP.
//!
//! ```text
//! x = embed(ids)
//! per layer:  x = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1)))   with n1 = rmsnorm1(x)
//!             x = x + down(silu(gate(n2)) * up(n2))                with n2 = rmsnorm2(x)
//! logits = lm_head(rmsnorm(x))     (lm_head = embed when tied; GQA: kv head = q head / group)
//! ```
//!
//! Here, in order: its `config.json` and GGUF metadata, its tensors (Hugging Face names; GGUF
//! names mapped to them), how they form the schedule's units (`parts`), its attention heads,
//! its sizes for the cost model, and its forward pass over the [`Device`] seam, one function
//! per part.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::common::{bounded, malformed, ModelParts, PartSpec, PartWeights, RowBatch, Runner};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::layout::HeadLayout;
use crate::model::gguf::{GgufFile, GgufValue};
use crate::model::TensorSpec;
use crate::policy::cost::ModelShape;

/// Llama's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Context window.
    #[serde(default = "default_llama_context")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE scaling; only absent/`null` is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Whether the output projection shares the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o projections (unsupported when true).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections (unsupported when true).
    #[serde(default)]
    pub mlp_bias: bool,
    /// MLP activation; only `silu` is supported.
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token (a list in some configs: the first is used).
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Option<u32>,
}

fn silu() -> String {
    "silu".into()
}
fn default_llama_context() -> usize {
    2048
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}

/// transformers 5 writes `rope_parameters: {rope_theta, rope_type}` where earlier versions wrote
/// `rope_theta` and `rope_scaling`: map the new form onto the old fields. A `rope_type` other than
/// `default` becomes `rope_scaling`, which validation rejects as unsupported.
pub(super) fn lift_rope_parameters(value: &mut serde_json::Value) {
    let Some(obj) = value.as_object_mut() else {
        return;
    };
    let Some(params) = obj.get("rope_parameters").cloned() else {
        return;
    };
    if let Some(theta) = params.get("rope_theta") {
        obj.entry("rope_theta").or_insert_with(|| theta.clone());
    }
    let kind = params.get("rope_type").and_then(|t| t.as_str());
    if kind.is_some_and(|t| t != "default") {
        obj.entry("rope_scaling").or_insert(params);
    }
}

/// Accepts `2`, `[2, 3]` or `null` for a token id.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(id)) => Some(id),
        Some(OneOrMany::Many(ids)) => ids.first().copied(),
    })
}

impl LlamaConfig {
    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Checks that the configuration describes a model ferrogen can run; `path` names the
    /// file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let c = self;
        let positive = |name: &str, v: usize| bounded(path, name, v);
        positive("vocab_size", c.vocab_size)?;
        positive("hidden_size", c.hidden_size)?;
        positive("intermediate_size", c.intermediate_size)?;
        positive("num_hidden_layers", c.num_hidden_layers)?;
        positive("num_attention_heads", c.num_attention_heads)?;
        positive("num_key_value_heads", c.kv_heads())?;
        positive("head_dim", c.head_dim())?;
        positive("max_position_embeddings", c.max_position_embeddings)?;
        if !c.num_attention_heads.is_multiple_of(c.kv_heads()) {
            return Err(Error::config(
                path,
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    c.num_attention_heads,
                    c.kv_heads()
                ),
            ));
        }
        if !c.head_dim().is_multiple_of(2) {
            return Err(Error::config(path, "head_dim must be even for RoPE"));
        }
        if c.head_dim.is_none() && !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::config(
                path,
                "hidden_size is not divisible by num_attention_heads and no head_dim is given",
            ));
        }
        let unsupported = |what: String| Err(Error::Unsupported { what });
        if c.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported(format!("{}: rope_scaling", path.display()));
        }
        if c.attention_bias || c.mlp_bias {
            return unsupported(format!("{}: Llama with biases", path.display()));
        }
        if c.hidden_act != "silu" {
            return unsupported(format!(
                "{}: Llama activation `{}` (only silu)",
                path.display(),
                c.hidden_act
            ));
        }
        let positive_finite = |v: f64| v.is_finite() && v > 0.0;
        if !positive_finite(c.rms_norm_eps) || !positive_finite(c.rope_theta) {
            return Err(Error::config(
                path,
                "rms_norm_eps and rope_theta must be positive",
            ));
        }
        Ok(())
    }
}

/// The configuration a llama GGUF file's metadata describes (`llama.*` keys), checked against
/// its embedding table and tokenizer.
pub(super) fn from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
    if let Some(kind) = file
        .get("llama.rope.scaling.type")
        .and_then(GgufValue::as_str)
    {
        if kind != "none" {
            return Err(Error::Unsupported {
                what: format!("{}: RoPE scaling `{kind}`", file.path().display()),
            });
        }
    }
    let embed = file
        .tensor_shape("token_embd.weight")
        .ok_or_else(|| Error::MissingTensor {
            path: file.path().to_path_buf(),
            name: "token_embd.weight".into(),
        })?;
    let heads = file.require_u64("llama.attention.head_count")?;
    let head_dim = file.optional_u64("llama.attention.key_length")?;
    let hidden = file.require_u64("llama.embedding_length")?;
    if heads == 0 {
        return Err(Error::config(
            file.path(),
            "`llama.attention.head_count` is 0",
        ));
    }
    if head_dim.is_none() && !hidden.is_multiple_of(heads) {
        return Err(Error::config(
            file.path(),
            format!(
                "`llama.embedding_length` {hidden} is not a multiple of \
                 `llama.attention.head_count` {heads} (and no `llama.attention.key_length` \
                 gives the head width)"
            ),
        ));
    }
    if embed.len() != 2 || embed[1] != hidden {
        return Err(Error::config(
            file.path(),
            format!(
                "`token_embd.weight` has shape {:?}, not [vocabulary, {hidden}]",
                embed
            ),
        ));
    }
    if let (Some(rot), Some(hd)) = (
        file.optional_u64("llama.rope.dimension_count")?,
        head_dim.or_else(|| Some(embed.get(1)? / heads.max(1))),
    ) {
        if rot != hd {
            return Err(Error::Unsupported {
                what: format!(
                    "{}: partial RoPE ({rot} of {hd} dimensions)",
                    file.path().display()
                ),
            });
        }
    }
    let float = |key: &str, default: f64| {
        file.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| Error::config(file.path(), format!("bad metadata `{key}`")))
            })
            .unwrap_or(Ok(default))
    };
    let token_id = |key: &str| {
        file.get(key)
            .and_then(GgufValue::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    };
    Ok(LlamaConfig {
        vocab_size: embed[0],
        hidden_size: hidden,
        intermediate_size: file.require_u64("llama.feed_forward_length")?,
        num_hidden_layers: file.require_u64("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: file.optional_u64("llama.attention.head_count_kv")?,
        head_dim,
        max_position_embeddings: file.require_u64("llama.context_length")?,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-6)?,
        rope_theta: float("llama.rope.freq_base", 10000.0)?,
        rope_scaling: None,
        tie_word_embeddings: file.tensor_shape("output.weight").is_none(),
        attention_bias: false,
        mlp_bias: false,
        hidden_act: "silu".into(),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: token_id("tokenizer.ggml.eos_token_id"),
    })
}

/// Maps a GGUF llama tensor name to its Hugging Face name (other names are kept as they are),
/// with the head count whose permutation must be undone for Q and K.
pub(super) fn gguf_tensor_name(
    gguf: &str,
    heads: usize,
    kv_heads: usize,
) -> (String, Option<usize>) {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return (f.to_string(), None);
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return (gguf.to_string(), None);
    };
    let Some((layer, part)) = rest.split_once('.') else {
        return (gguf.to_string(), None);
    };
    let (hf_part, unpermute) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(kv_heads)),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        _ => return (gguf.to_string(), None),
    };
    (format!("model.layers.{layer}.{hf_part}"), unpermute)
}

/// The tensors of one Llama decoder layer.
#[derive(Debug, Clone)]
pub struct LlamaLayerSpec {
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
    /// RMSNorm before the MLP `[hidden]`.
    pub post_attention_layernorm: TensorSpec,
    /// `[intermediate, hidden]`.
    pub gate_proj: TensorSpec,
    /// `[intermediate, hidden]`.
    pub up_proj: TensorSpec,
    /// `[hidden, intermediate]`.
    pub down_proj: TensorSpec,
}

/// All of a Llama model's tensors.
#[derive(Debug, Clone)]
pub struct LlamaSpec {
    /// `[vocab, hidden]`.
    pub embed_tokens: TensorSpec,
    /// The decoder layers.
    pub layers: Vec<LlamaLayerSpec>,
    /// Final RMSNorm `[hidden]`.
    pub norm: TensorSpec,
    /// `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<TensorSpec>,
}

impl LlamaSpec {
    /// The tensors of `c` under transformers' names.
    pub fn new(c: &LlamaConfig) -> Self {
        let (h, i, q, kv) = (
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads * c.head_dim(),
            c.kv_heads() * c.head_dim(),
        );
        let t = |name: String, shape: &[usize]| TensorSpec::new(name, shape);
        let layers = (0..c.num_hidden_layers)
            .map(|n| {
                let l = format!("model.layers.{n}.");
                LlamaLayerSpec {
                    input_layernorm: t(format!("{l}input_layernorm.weight"), &[h]),
                    q_proj: t(format!("{l}self_attn.q_proj.weight"), &[q, h]),
                    k_proj: t(format!("{l}self_attn.k_proj.weight"), &[kv, h]),
                    v_proj: t(format!("{l}self_attn.v_proj.weight"), &[kv, h]),
                    o_proj: t(format!("{l}self_attn.o_proj.weight"), &[h, q]),
                    post_attention_layernorm: t(
                        format!("{l}post_attention_layernorm.weight"),
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
}

/// The units' tensors. Attention: vectors `[input_layernorm]`, linears `[q, k, v, o]`;
/// MLP: `[post_attention_layernorm]`, `[gate, up, down]`; head: `[norm]`; no input weights.
pub(super) fn parts(c: &LlamaConfig) -> ModelParts {
    let s = LlamaSpec::new(c);
    let lin = |t: &TensorSpec| Some((t.clone(), None));
    let layers = s
        .layers
        .iter()
        .map(|l| {
            [
                PartSpec {
                    vectors: vec![Some(l.input_layernorm.clone())],
                    linears: vec![
                        lin(&l.q_proj),
                        lin(&l.k_proj),
                        lin(&l.v_proj),
                        lin(&l.o_proj),
                    ],
                },
                PartSpec {
                    vectors: vec![Some(l.post_attention_layernorm.clone())],
                    linears: vec![lin(&l.gate_proj), lin(&l.up_proj), lin(&l.down_proj)],
                },
            ]
        })
        .collect();
    ModelParts {
        input: PartSpec::default(),
        layers,
        head: PartSpec {
            vectors: vec![Some(s.norm.clone())],
            linears: Vec::new(),
        },
        output: s.lm_head.unwrap_or_else(|| s.embed_tokens.clone()),
        embedding: s.embed_tokens,
    }
}

/// Query heads, key/value heads (GQA) and their width.
pub(super) fn head_layout(c: &LlamaConfig) -> HeadLayout {
    HeadLayout {
        heads: c.num_attention_heads,
        kv_heads: c.kv_heads(),
        head_dim: c.head_dim(),
    }
}

/// Sizes for the cost model.
pub(super) fn shape(c: &LlamaConfig) -> ModelShape {
    let h = c.hidden_size as f64;
    let (qw, kvw) = (
        (c.num_attention_heads * c.head_dim()) as f64,
        (c.kv_heads() * c.head_dim()) as f64,
    );
    let f = c.intermediate_size as f64;
    // q, k, v, o, gate, up, down, two RMSNorms
    let layer = h * qw + 2.0 * h * kvw + qw * h + 3.0 * h * f + 2.0 * h;
    let tables = if c.tie_word_embeddings { 1.0 } else { 2.0 };
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
        // two RMSNorms per layer and the final one
        resident_values: (2 * c.num_hidden_layers + 1) as f64 * h,
    }
}

/// `x + o(attend(rope(q(n)), rope(k(n)), v(n)))` with `n = rmsnorm(x)`; `attend` returns
/// `[rows, heads * head_dim]`.
pub(super) fn attention<D: Device>(
    r: &Runner<D>,
    c: &LlamaConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
    rb: &RowBatch<D>,
    attend: impl FnOnce(&D::Tensor, &D::Tensor, &D::Tensor) -> Result<D::Tensor>,
) -> Result<D::Tensor> {
    let ([Some(norm)], [Some(q), Some(k), Some(v), Some(o)]) = (&w.vectors[..], &w.linears[..])
    else {
        return Err(malformed("Llama attention"));
    };
    let n = r.dev.rms_norm(&x, norm, c.rms_norm_eps as f32)?;
    let (qt, kt, vt) = (r.linear(&n, q)?, r.linear(&n, k)?, r.linear(&n, v)?);
    let head_dim = r.head_layout().head_dim;
    r.dev.rope(&qt, &rb.dev, head_dim)?;
    r.dev.rope(&kt, &rb.dev, head_dim)?;
    let a = attend(&qt, &kt, &vt)?;
    let y = r.linear(&a, o)?;
    r.dev.add(&x, &y)?;
    Ok(x)
}

/// `x + down(silu(gate(n)) * up(n))` with `n = rmsnorm(x)`.
pub(super) fn mlp<D: Device>(
    r: &Runner<D>,
    c: &LlamaConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
) -> Result<D::Tensor> {
    let ([Some(norm)], [Some(gate), Some(up), Some(down)]) = (&w.vectors[..], &w.linears[..])
    else {
        return Err(malformed("Llama MLP"));
    };
    let n = r.dev.rms_norm(&x, norm, c.rms_norm_eps as f32)?;
    let (g, u) = (r.linear(&n, gate)?, r.linear(&n, up)?);
    r.dev.silu_mul(&g, &u)?;
    let d = r.linear(&g, down)?;
    r.dev.add(&x, &d)?;
    Ok(x)
}

/// The final RMSNorm.
pub(super) fn head<D: Device>(
    r: &Runner<D>,
    c: &LlamaConfig,
    w: &PartWeights<D>,
    x: D::Tensor,
) -> Result<D::Tensor> {
    let [Some(norm)] = &w.vectors[..] else {
        return Err(malformed("Llama head"));
    };
    r.dev.rms_norm(&x, norm, c.rms_norm_eps as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ModelConfig;

    #[test]
    fn llama_defaults_follow_transformers() {
        let text = r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "eos_token_id": [7, 8]}"#;
        let ModelConfig::Llama(c) = ModelConfig::from_json_str(text, Path::new("c.json")).unwrap()
        else {
            panic!("not Llama")
        };
        assert_eq!(c.kv_heads(), 4);
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.eos_token_id, Some(7));
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let base = r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "rope_parameters": {"rope_theta": 500.0, "rope_type": "TYPE"}}"#;
        let c = ModelConfig::from_json_str(&base.replace("TYPE", "default"), Path::new("c"));
        let Ok(ModelConfig::Llama(c)) = c else {
            panic!("{c:?}")
        };
        assert_eq!(c.rope_theta, 500.0);
        let scaled = ModelConfig::from_json_str(&base.replace("TYPE", "llama3"), Path::new("c"));
        assert!(matches!(scaled, Err(Error::Unsupported { .. })));
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            gguf_tensor_name("blk.12.attn_k.weight", 9, 3),
            (
                "model.layers.12.self_attn.k_proj.weight".to_string(),
                Some(3)
            )
        );
        assert_eq!(
            gguf_tensor_name("blk.0.ffn_down.weight", 9, 3).0,
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            gguf_tensor_name("rope_freqs.weight", 9, 3).0,
            "rope_freqs.weight"
        );
    }
}
