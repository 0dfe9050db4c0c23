//! Llama and the families built the same way (Mistral, Qwen2/2.5, Qwen3): RMSNorm, rotary
//! positions, grouped-query attention, a SwiGLU MLP.
//!
//! ```text
//! x = embed(ids)
//! per layer:  x = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1)))   with n1 = rmsnorm1(x)
//!             x = x + down(silu(gate(n2)) * up(n2))                with n2 = rmsnorm2(x)
//! logits = lm_head(rmsnorm(x))     (lm_head = embed when tied; GQA: kv head = q head / group)
//! ```
//!
//! The families differ only in flags ([`LlamaFamily`]): Qwen2 adds biases to q, k and v;
//! Phi-3 stores q/k/v and gate/up fused (cut into their parts at load, [`fused_cuts`]);
//! Qwen3 normalizes each head of q and k (RMSNorm over `head_dim`, before RoPE); Mistral (and
//! Qwen with `use_sliding_window`) lets a query see only the last `sliding_window` keys;
//! Llama 3 scales RoPE's long wavelengths (`rope_scaling` type `llama3`; in GGUF the
//! per-frequency factors of `rope_freqs.weight`).
//!
//! Here, in order: its `config.json` and GGUF metadata, its tensors (Hugging Face names; GGUF
//! names mapped to them), how they form the schedule's units (`parts`), its attention heads,
//! its sizes for the cost model, and its forward pass over the [`Device`] seam, one function
//! per part.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::common::{
    malformed, ArchKeys, DecoderSizes, ModelParts, PartSpec, PartWeights, RowBatch, Runner,
};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::layout::HeadLayout;
use crate::model::gguf::{GgufFile, GgufValue};
use crate::model::TensorSpec;
use crate::policy::cost::ModelShape;

/// Which member of the Llama-shaped family a configuration describes (its `model_type`, or
/// GGUF's `general.architecture`): it sets which optional tensors exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlamaFamily {
    /// Llama 2/3, SmolLM, TinyLlama...
    #[default]
    Llama,
    /// Mistral (optionally a sliding window on every layer).
    Mistral,
    /// Qwen2 and Qwen2.5: biases on q, k and v.
    Qwen2,
    /// Qwen3: per-head RMSNorm of q and k.
    Qwen3,
    /// Phi-3: q, k and v in one `qkv_proj`, gate and up in one `gate_up_proj` (cut into their
    /// parts at load), a sliding window on every layer.
    Phi3,
}

impl LlamaFamily {
    /// The family of a `model_type` (or GGUF architecture) name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }
}

/// A Llama-family `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which family (from `model_type`).
    #[serde(default)]
    pub family: LlamaFamily,
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
    /// Per-head width; defaults to `hidden_size / num_attention_heads` (128 for Qwen3).
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
    /// RoPE scaling: absent/`null`/`default`, `linear` (`factor`) or `llama3` (`factor`,
    /// `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// RoPE's per-frequency divisors as a GGUF file stores them (`rope_freqs.weight`, written
    /// for Llama 3's scaling): `inv_freq_i / factor_i`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_freq_factors: Option<Vec<f64>>,
    /// The share of each head's dimensions RoPE rotates; only 1 (all) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Whether the output projection shares the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v and o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// MLP activation; only `silu` is supported.
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Keys a query sees (its own and the ones before), where the model limits them.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen: whether `sliding_window` applies (to the layers from `max_window_layers` on).
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Qwen: the first layer with a sliding window (when `use_sliding_window`).
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers 5: `full_attention` or `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
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
    for key in ["rope_theta", "partial_rotary_factor"] {
        if let Some(v) = params.get(key) {
            obj.entry(key).or_insert_with(|| v.clone());
        }
    }
    let kind = params.get("rope_type").and_then(|t| t.as_str());
    if kind.is_some_and(|t| t != "default") {
        obj.entry("rope_scaling").or_insert(params);
    }
}

/// Records the family a `model_type` names in `config.json`'s value, with its defaults
/// that differ from Llama's (Qwen3's head width is 128 unless given).
pub(super) fn set_family(value: &mut serde_json::Value, model_type: &str) {
    let Some(obj) = value.as_object_mut() else {
        return;
    };
    obj.insert("family".into(), model_type.into());
    if model_type == "qwen3" && obj.get("head_dim").is_none_or(|v| v.is_null()) {
        obj.insert("head_dim".into(), 128.into());
    }
}

/// Accepts `2`, `[2, 3]` or `null` for a token id.
pub(super) fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
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
    /// A plain Llama of these sizes with transformers' defaults for everything else (no
    /// biases, no window, RoPE base 10000, untied, context 2048).
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
    ) -> Self {
        Self {
            family: LlamaFamily::Llama,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: None,
            head_dim: None,
            max_position_embeddings: default_llama_context(),
            rms_norm_eps: default_rms_eps(),
            rope_theta: default_rope_theta(),
            rope_scaling: None,
            rope_freq_factors: None,
            partial_rotary_factor: None,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: silu(),
            sliding_window: None,
            use_sliding_window: None,
            max_window_layers: None,
            layer_types: None,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// Whether q, k and v have biases (Qwen2 always; the others with `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.family == LlamaFamily::Qwen2 || self.attention_bias
    }
    /// Whether each head of q and k is RMS-normalized before RoPE (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.family == LlamaFamily::Qwen3
    }

    /// The sliding window of each layer (`None`: the layer sees every earlier key), as
    /// transformers decides it: `layer_types` when given; else, for Qwen, `sliding_window`
    /// from layer `max_window_layers` on when `use_sliding_window`; else `sliding_window` on
    /// every layer.
    pub fn layer_windows(&self) -> Vec<Option<usize>> {
        let n = self.num_hidden_layers;
        let window = self.sliding_window;
        if let Some(types) = &self.layer_types {
            return types
                .iter()
                .map(|t| window.filter(|_| t == "sliding_attention"))
                .collect();
        }
        match self.family {
            LlamaFamily::Qwen2 | LlamaFamily::Qwen3 => {
                let on = self.use_sliding_window == Some(true);
                let from = self.max_window_layers.unwrap_or(0);
                (0..n).map(|l| window.filter(|_| on && l >= from)).collect()
            }
            LlamaFamily::Llama | LlamaFamily::Mistral | LlamaFamily::Phi3 => vec![window; n],
        }
    }

    /// The one sliding window of all layers (`None`: none has one).
    pub fn attention_window(&self) -> Option<usize> {
        self.layer_windows().first().copied().flatten()
    }

    /// RoPE's inverse frequencies `inv_freq_i = theta^(-2i/d)`, scaled as the model says:
    /// GGUF's factors divide them; `linear` divides all by `factor`; `llama3` (with
    /// `wavelen = 2 pi / inv_freq`, `lo = original / low_freq_factor`,
    /// `hi = original / high_freq_factor`) divides those with `wavelen > lo` by `factor`,
    /// keeps those with `wavelen < hi`, and blends between:
    /// `s = (original / wavelen - low) / (high - low)`, `inv = (1 - s) inv / factor + s inv`.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let base = crate::device::rope_inv_freq(self.head_dim(), self.rope_theta);
        if let Some(factors) = &self.rope_freq_factors {
            return base.iter().zip(factors).map(|(f, d)| f / d).collect();
        }
        let Ok(scaling) = self.rope_scaling() else {
            return base; // validation refuses these
        };
        match scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original,
            } => base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < original / high {
                        f
                    } else if wavelen > original / low {
                        f / factor
                    } else {
                        let s = (original / wavelen - low) / (high - low);
                        (1.0 - s) * f / factor + s * f
                    }
                })
                .collect(),
        }
    }

    /// `rope_scaling` parsed, or what is wrong with it.
    fn rope_scaling(&self) -> std::result::Result<RopeScaling, String> {
        let Some(v) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
            return Ok(RopeScaling::None);
        };
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let number = |key: &str| -> std::result::Result<f64, String> {
            v.get(key)
                .and_then(|x| x.as_f64())
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("rope_scaling `{kind}` needs a positive `{key}`"))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: number("factor")?,
            }),
            "llama3" => {
                let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                if high <= low {
                    return Err("rope_scaling llama3: high_freq_factor <= low_freq_factor".into());
                }
                Ok(RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original: number("original_max_position_embeddings")?,
                })
            }
            other => Err(format!(
                "rope_scaling type `{other}` is not supported (default, linear, llama3)"
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
            head_dim: c.head_dim(),
            max_position_embeddings: c.max_position_embeddings,
        }
        .check(path)?;
        if c.head_dim.is_none() && !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::config(
                path,
                "hidden_size is not divisible by num_attention_heads and no head_dim is given",
            ));
        }
        let unsupported = |what: String| Err(Error::Unsupported { what });
        if c.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            return unsupported(format!(
                "{}: partial RoPE (partial_rotary_factor {:?})",
                path.display(),
                c.partial_rotary_factor
            ));
        }
        if let Err(why) = c.rope_scaling() {
            return unsupported(format!("{}: {why}", path.display()));
        }
        if let Some(f) = &c.rope_freq_factors {
            if f.len() != c.head_dim() / 2 || f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(Error::config(
                    path,
                    format!(
                        "{} RoPE frequency factors for a head of {} (want {} positive ones)",
                        f.len(),
                        c.head_dim(),
                        c.head_dim() / 2
                    ),
                ));
            }
        }
        let windows = c.layer_windows();
        if windows.len() != c.num_hidden_layers {
            return Err(Error::config(
                path,
                format!(
                    "`layer_types` lists {} layers, not num_hidden_layers {}",
                    windows.len(),
                    c.num_hidden_layers
                ),
            ));
        }
        if windows.iter().any(|w| *w != windows[0]) {
            return unsupported(format!(
                "{}: a sliding window on some layers only",
                path.display()
            ));
        }
        if windows[0] == Some(0) {
            return Err(Error::config(path, "`sliding_window` must be positive"));
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

/// RoPE scaling as `rope_scaling` gives it.
enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original: f64,
    },
}

/// The configuration a GGUF file of this family describes (`<arch>.*` keys, `arch` being
/// `general.architecture`: llama, qwen2 or qwen3), checked against its embedding table.
pub(super) fn from_gguf(file: &GgufFile, arch: &str) -> Result<LlamaConfig> {
    let family = LlamaFamily::from_name(arch).ok_or_else(|| Error::Unsupported {
        what: format!("{}: GGUF architecture `{arch}`", file.path().display()),
    })?;
    let keys = ArchKeys { file, arch };
    let rope_scaling = match file
        .get(&keys.key("rope.scaling.type"))
        .and_then(GgufValue::as_str)
    {
        None | Some("none") => None,
        Some("linear") => {
            let factor = keys.float("rope.scaling.factor")?.ok_or_else(|| {
                Error::config(file.path(), "linear RoPE scaling without a factor")
            })?;
            Some(serde_json::json!({"rope_type": "linear", "factor": factor}))
        }
        Some(kind) => {
            return Err(Error::Unsupported {
                what: format!("{}: RoPE scaling `{kind}`", file.path().display()),
            })
        }
    };
    let rope_freq_factors = file
        .tensor_f32("rope_freqs.weight")?
        .map(|f| f.into_iter().map(f64::from).collect());
    let heads = keys.count("attention.head_count")?;
    let head_dim = keys.optional("attention.key_length")?;
    let hidden = keys.count("embedding_length")?;
    if heads == 0 {
        return Err(Error::config(
            file.path(),
            format!("`{arch}.attention.head_count` is 0"),
        ));
    }
    if head_dim.is_none() && !hidden.is_multiple_of(heads) {
        return Err(Error::config(
            file.path(),
            format!(
                "`{arch}.embedding_length` {hidden} is not a multiple of \
                 `{arch}.attention.head_count` {heads} (and no `{arch}.attention.key_length` \
                 gives the head width)"
            ),
        ));
    }
    let vocab_size = keys.vocabulary(hidden)?;
    let rotated = keys.optional("rope.dimension_count")?;
    let width = head_dim.unwrap_or(hidden / heads);
    if let Some(rot) = rotated.filter(|&r| r != width) {
        return Err(Error::Unsupported {
            what: format!(
                "{}: partial RoPE ({rot} of {width} dimensions)",
                file.path().display()
            ),
        });
    }
    Ok(LlamaConfig {
        family,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: keys.count("feed_forward_length")?,
        num_hidden_layers: keys.count("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: keys.optional("attention.head_count_kv")?,
        head_dim,
        max_position_embeddings: keys.count("context_length")?,
        rms_norm_eps: keys
            .float("attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-6),
        rope_theta: keys.float("rope.freq_base")?.unwrap_or(10000.0),
        rope_scaling,
        rope_freq_factors,
        partial_rotary_factor: None,
        tie_word_embeddings: file.tensor_shape("output.weight").is_none(),
        attention_bias: file.tensor_shape("blk.0.attn_output.bias").is_some(),
        mlp_bias: file.tensor_shape("blk.0.ffn_down.bias").is_some(),
        hidden_act: "silu".into(),
        // Phi-3's window as transformers applies it (llama.cpp leaves it out); the other
        // families' files carry none
        sliding_window: match family {
            LlamaFamily::Phi3 => keys
                .optional("attention.sliding_window")?
                .filter(|&w| w > 0),
            _ => None,
        },
        use_sliding_window: None,
        max_window_layers: None,
        layer_types: None,
        bos_token_id: keys.token_id("bos"),
        eos_token_id: keys.token_id("eos"),
    })
}

/// Maps a GGUF tensor name of this family to its Hugging Face name (other names are kept as
/// they are), with the head count whose permutation must be undone: llama.cpp interleaves the
/// rows of Llama's (not Qwen's) Q and K, biases included.
pub(super) fn gguf_tensor_name(gguf: &str, c: &LlamaConfig) -> (String, Option<usize>) {
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
    let permuted = matches!(c.family, LlamaFamily::Llama | LlamaFamily::Mistral);
    let (heads, kv_heads) = if permuted {
        (Some(c.num_attention_heads), Some(c.kv_heads()))
    } else {
        (None, None)
    };
    let Some((module, kind)) = part.rsplit_once('.') else {
        return (gguf.to_string(), None);
    };
    let phi3 = c.family == LlamaFamily::Phi3;
    let (hf_module, unpermute) = match module {
        "attn_qkv" if phi3 => ("self_attn.qkv_proj", None),
        "ffn_up" if phi3 => ("mlp.gate_up_proj", None),
        "attn_norm" => ("input_layernorm", None),
        "attn_q" => ("self_attn.q_proj", heads),
        "attn_k" => ("self_attn.k_proj", kv_heads),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "attn_q_norm" => ("self_attn.q_norm", None),
        "attn_k_norm" => ("self_attn.k_norm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return (gguf.to_string(), None),
    };
    (
        format!("model.layers.{layer}.{hf_module}.{kind}"),
        unpermute,
    )
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
    /// Qwen3: RMSNorm of each query head `[head_dim]`.
    pub q_norm: Option<TensorSpec>,
    /// Qwen3: RMSNorm of each key head `[head_dim]`.
    pub k_norm: Option<TensorSpec>,
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
                    q_norm: c
                        .qk_norm()
                        .then(|| t(format!("{l}self_attn.q_norm.weight"), &[c.head_dim()])),
                    k_norm: c
                        .qk_norm()
                        .then(|| t(format!("{l}self_attn.k_norm.weight"), &[c.head_dim()])),
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

/// The bias `[out]` beside a linear weight `[out, in]` (`....weight` -> `....bias`).
pub fn bias_of(weight: &TensorSpec) -> TensorSpec {
    let name = weight.name.strip_suffix(".weight").unwrap_or(&weight.name);
    TensorSpec::new(format!("{name}.bias"), &weight.shape[..1])
}

/// The fused tensors a Phi-3 checkpoint stores and the parts the recipe reads: per layer
/// `qkv_proj` -> q, k, v and `gate_up_proj` -> gate, up (none for the other families).
pub(super) fn fused_cuts(c: &LlamaConfig) -> Vec<crate::model::RowCut> {
    if c.family != LlamaFamily::Phi3 {
        return Vec::new();
    }
    let (q, kv, i) = (
        c.num_attention_heads * c.head_dim(),
        c.kv_heads() * c.head_dim(),
        c.intermediate_size,
    );
    (0..c.num_hidden_layers)
        .flat_map(|n| {
            let l = format!("model.layers.{n}.");
            let w = |m: &str| format!("{l}{m}.weight");
            [
                (
                    w("self_attn.qkv_proj"),
                    vec![
                        (w("self_attn.q_proj"), q),
                        (w("self_attn.k_proj"), kv),
                        (w("self_attn.v_proj"), kv),
                    ],
                ),
                (
                    w("mlp.gate_up_proj"),
                    vec![(w("mlp.gate_proj"), i), (w("mlp.up_proj"), i)],
                ),
            ]
        })
        .collect()
}

/// The units' tensors. Attention: vectors `[input_layernorm, q_norm, k_norm]` (the head norms
/// `None` but for Qwen3), linears `[q, k, v, o]`; MLP: `[post_attention_layernorm]`,
/// `[gate, up, down]`; head: `[norm]`; no input weights. Linears carry their biases where the
/// model has them.
pub(super) fn parts(c: &LlamaConfig) -> ModelParts {
    let s = LlamaSpec::new(c);
    let lin = |t: &TensorSpec, bias: bool| Some((t.clone(), bias.then(|| bias_of(t))));
    let (qkv, o, mlp) = (c.qkv_bias(), c.attention_bias, c.mlp_bias);
    // a window is on every layer or on none (validation refuses the rest)
    let sliding = c.attention_window().is_some();
    let layers = s
        .layers
        .iter()
        .map(|l| {
            [
                PartSpec {
                    sliding,
                    vectors: vec![
                        Some(l.input_layernorm.clone()),
                        l.q_norm.clone(),
                        l.k_norm.clone(),
                    ],
                    linears: vec![
                        lin(&l.q_proj, qkv),
                        lin(&l.k_proj, qkv),
                        lin(&l.v_proj, qkv),
                        lin(&l.o_proj, o),
                    ],
                },
                PartSpec {
                    sliding: false,
                    vectors: vec![Some(l.post_attention_layernorm.clone())],
                    linears: vec![
                        lin(&l.gate_proj, mlp),
                        lin(&l.up_proj, mlp),
                        lin(&l.down_proj, mlp),
                    ],
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
        // two RMSNorms per layer and the final one, the head norms and the biases
        resident_values: (2 * c.num_hidden_layers + 1) as f64 * h
            + c.num_hidden_layers as f64 * resident_extras(c),
    }
}

/// Values per layer kept resident beside the RMSNorms: q/k head norms and biases.
fn resident_extras(c: &LlamaConfig) -> f64 {
    let (qw, kvw) = (
        c.num_attention_heads * c.head_dim(),
        c.kv_heads() * c.head_dim(),
    );
    let mut n = 0;
    if c.qk_norm() {
        n += 2 * c.head_dim();
    }
    if c.qkv_bias() {
        n += qw + 2 * kvw;
    }
    if c.attention_bias {
        n += c.hidden_size;
    }
    if c.mlp_bias {
        n += 2 * c.intermediate_size + c.hidden_size;
    }
    n as f64
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
    let ([Some(norm), q_norm, k_norm], [Some(q), Some(k), Some(v), Some(o)]) =
        (&w.vectors[..], &w.linears[..])
    else {
        return Err(malformed("Llama attention"));
    };
    let eps = c.rms_norm_eps as f32;
    let n = r.dev.rms_norm(&x, norm, eps)?;
    let (mut qt, mut kt, vt) = (r.linear(&n, q)?, r.linear(&n, k)?, r.linear(&n, v)?);
    let head_dim = r.head_layout().head_dim;
    if let (Some(qn), Some(kn)) = (q_norm, k_norm) {
        qt = r.head_norm(&qt, qn, eps)?;
        kt = r.head_norm(&kt, kn, eps)?;
    }
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

    fn config(text: &str) -> LlamaConfig {
        match ModelConfig::from_json_str(text, Path::new("c.json")) {
            Ok(ModelConfig::Llama(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_map_to_hugging_face() {
        let llama = LlamaConfig {
            num_key_value_heads: Some(3),
            ..LlamaConfig::new(100, 72, 100, 13, 9)
        };
        assert_eq!(
            gguf_tensor_name("blk.12.attn_k.weight", &llama),
            (
                "model.layers.12.self_attn.k_proj.weight".to_string(),
                Some(3)
            )
        );
        assert_eq!(
            gguf_tensor_name("blk.12.attn_q.bias", &llama),
            ("model.layers.12.self_attn.q_proj.bias".to_string(), Some(9))
        );
        assert_eq!(
            gguf_tensor_name("blk.0.ffn_down.weight", &llama).0,
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            gguf_tensor_name("rope_freqs.weight", &llama).0,
            "rope_freqs.weight"
        );
        // Qwen's rows are stored as transformers has them
        let qwen = LlamaConfig {
            family: LlamaFamily::Qwen3,
            ..llama
        };
        assert_eq!(
            gguf_tensor_name("blk.1.attn_k.weight", &qwen),
            ("model.layers.1.self_attn.k_proj.weight".to_string(), None)
        );
        assert_eq!(
            gguf_tensor_name("blk.1.attn_k_norm.weight", &qwen).0,
            "model.layers.1.self_attn.k_norm.weight"
        );
    }

    /// Llama 3.1's own scaling (factor 8, 1, 4, 8192; head 128, base 500000) against
    /// transformers' `_compute_llama3_parameters` (printed in float64).
    #[test]
    fn llama3_rope_scaling_follows_transformers() {
        let c = config(
            r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 4096,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 32,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}"#,
        );
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        // high frequencies kept, low ones divided by 8, the middle blended
        let base = crate::device::rope_inv_freq(128, 500000.0);
        assert_eq!(f[0], base[0]);
        assert!((f[63] - base[63] / 8.0).abs() < 1e-18);
        let want_40 = 3.428_102_354_519_069e-5; // transformers: inv_freq[40] after scaling
        assert!((f[40] / want_40 - 1.0).abs() < 1e-6, "{}", f[40]);
        let bad = config(
            r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}"#,
        );
        assert_eq!(
            bad.rope_inv_freq(),
            crate::device::rope_inv_freq(16, 10000.0)
        );
    }

    #[test]
    fn families_set_their_flags() {
        let base = r#""vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4"#;
        let qwen2 = config(&format!(
            r#"{{"model_type": "qwen2", {base},
            "sliding_window": 32768, "use_sliding_window": false}}"#
        ));
        assert!(qwen2.qkv_bias() && !qwen2.qk_norm());
        assert_eq!(qwen2.attention_window(), None);
        let qwen3 = config(&format!(r#"{{"model_type": "qwen3", {base}}}"#));
        assert!(qwen3.qk_norm() && !qwen3.qkv_bias());
        assert_eq!(qwen3.head_dim(), 128);
        let mistral = config(&format!(
            r#"{{"model_type": "mistral", {base}, "sliding_window": 5}}"#
        ));
        assert_eq!(mistral.attention_window(), Some(5));
        // a window on some layers only is refused, not ignored
        let mixed = ModelConfig::from_json_str(
            &format!(
                r#"{{"model_type": "qwen2", {base}, "sliding_window": 8,
                "use_sliding_window": true, "max_window_layers": 1}}"#
            ),
            Path::new("c.json"),
        );
        assert!(matches!(mixed, Err(Error::Unsupported { .. })), "{mixed:?}");
        let yarn = ModelConfig::from_json_str(
            &format!(
                r#"{{"model_type": "qwen2", {base},
                "rope_scaling": {{"type": "yarn", "factor": 4.0}}}}"#
            ),
            Path::new("c.json"),
        );
        assert!(matches!(yarn, Err(Error::Unsupported { .. })), "{yarn:?}");
    }
}
