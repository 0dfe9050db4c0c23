//! Model configurations: OPT and Llama, read from Hugging Face `config.json` or GGUF metadata.
//!
//! The structs mirror the fields of Hugging Face's `config.json` (same names, same defaults), so a
//! reader who knows transformers knows these.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The configuration of a supported model: one variant per architecture family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model_type", rename_all = "lowercase")]
pub enum ModelConfig {
    /// Meta's OPT family (facebook/opt-*).
    Opt(OptConfig),
    /// The Llama family (Llama 2/3, SmolLM, TinyLlama, ...).
    Llama(LlamaConfig),
}

/// OPT's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Width of the FFN's hidden layer.
    pub ffn_dim: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Context window (learned positions).
    pub max_position_embeddings: usize,
    /// Pre-LN (`true`, most OPTs) or post-LN (`false`, OPT-350m).
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    /// Width of the token embedding; differs from `hidden_size` when project_in/out exist.
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    /// FFN activation; only `relu` is used by OPT.
    #[serde(default = "relu")]
    pub activation_function: String,
    /// Whether linear layers have biases.
    #[serde(default = "yes")]
    pub enable_bias: bool,
    /// Drops the final layer norm even in pre-LN models (a few converted checkpoints).
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Whether the output projection shares the token embedding (always true for OPT).
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

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

fn yes() -> bool {
    true
}
fn relu() -> String {
    "relu".into()
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
fn lift_rope_parameters(value: &mut serde_json::Value) {
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

impl OptConfig {
    /// Width of the token embedding (`word_embed_proj_dim`, or `hidden_size`).
    pub fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }
    /// Whether project_in / project_out exist.
    pub fn has_projections(&self) -> bool {
        self.embed_dim() != self.hidden_size
    }
    /// Whether the decoder ends with a final layer norm (HF: pre-LN and not removed).
    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
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
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`, naming the file and field in any error.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json`; `path` is used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let mut value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        lift_rope_parameters(&mut value);
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::config(path, "missing field `model_type`"))?;
        let config = match model_type {
            "opt" => serde_json::from_value(value.clone()).map(ModelConfig::Opt),
            "llama" => serde_json::from_value(value.clone()).map(ModelConfig::Llama),
            other => {
                return Err(Error::Unsupported {
                    what: format!(
                        "{}: model_type `{other}` (supported: opt, llama)",
                        path.display()
                    ),
                })
            }
        }
        .map_err(|e| Error::config(path, e.to_string()))?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks that the configuration describes a model ferrogen can run.
    pub fn validate(&self, path: &Path) -> Result<()> {
        // every count and size is bounded before anything is sized by it (a lying file must
        // not make the process allocate terabytes)
        let positive = |name: &str, v: usize| {
            let most = match name {
                "num_hidden_layers" | "num_attention_heads" | "num_key_value_heads" => 1 << 14,
                "head_dim" => 1 << 14,
                "hidden_size" | "word_embed_proj_dim" => 1 << 18,
                "intermediate_size" | "ffn_dim" => 1 << 20,
                _ => 1 << 26, // vocab_size, max_position_embeddings
            };
            if v == 0 {
                Err(Error::config(path, format!("`{name}` must be positive")))
            } else if v > most {
                Err(Error::config(
                    path,
                    format!("`{name}` is {v}, more than any model has (at most {most}): a damaged file?"),
                ))
            } else {
                Ok(())
            }
        };
        match self {
            ModelConfig::Opt(c) => {
                positive("vocab_size", c.vocab_size)?;
                positive("hidden_size", c.hidden_size)?;
                positive("num_hidden_layers", c.num_hidden_layers)?;
                positive("ffn_dim", c.ffn_dim)?;
                positive("num_attention_heads", c.num_attention_heads)?;
                positive("max_position_embeddings", c.max_position_embeddings)?;
                positive("word_embed_proj_dim", c.embed_dim())?;
                if c.hidden_size % c.num_attention_heads != 0 {
                    return Err(Error::config(
                        path,
                        format!(
                            "hidden_size {} is not divisible by num_attention_heads {}",
                            c.hidden_size, c.num_attention_heads
                        ),
                    ));
                }
                if c.activation_function != "relu" {
                    return Err(Error::Unsupported {
                        what: format!(
                            "{}: OPT activation `{}` (only relu)",
                            path.display(),
                            c.activation_function
                        ),
                    });
                }
                if !c.tie_word_embeddings {
                    return Err(Error::Unsupported {
                        what: format!("{}: OPT with untied output embedding", path.display()),
                    });
                }
            }
            ModelConfig::Llama(c) => {
                positive("vocab_size", c.vocab_size)?;
                positive("hidden_size", c.hidden_size)?;
                positive("intermediate_size", c.intermediate_size)?;
                positive("num_hidden_layers", c.num_hidden_layers)?;
                positive("num_attention_heads", c.num_attention_heads)?;
                positive("num_key_value_heads", c.kv_heads())?;
                positive("head_dim", c.head_dim())?;
                positive("max_position_embeddings", c.max_position_embeddings)?;
                if c.num_attention_heads % c.kv_heads() != 0 {
                    return Err(Error::config(
                        path,
                        format!(
                            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                            c.num_attention_heads,
                            c.kv_heads()
                        ),
                    ));
                }
                if c.head_dim() % 2 != 0 {
                    return Err(Error::config(path, "head_dim must be even for RoPE"));
                }
                if c.head_dim.is_none() && c.hidden_size % c.num_attention_heads != 0 {
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
            }
        }
        Ok(())
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    /// Width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.hidden_size,
            ModelConfig::Llama(c) => c.hidden_size,
        }
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.num_hidden_layers,
            ModelConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    /// Maximum number of positions a sequence may have.
    pub fn max_context(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.max_position_embeddings,
            ModelConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    /// Width of the MLP's intermediate layer.
    pub fn intermediate_size(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.ffn_dim,
            ModelConfig::Llama(c) => c.intermediate_size,
        }
    }

    /// Width of one cached key (or value) row: heads x head_dim of the K/V projection.
    pub fn kv_width(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.hidden_size,
            ModelConfig::Llama(c) => c.kv_heads() * c.head_dim(),
        }
    }

    /// The beginning-of-sequence token, if the configuration names one.
    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Opt(c) => c.bos_token_id,
            ModelConfig::Llama(c) => c.bos_token_id,
        }
    }

    /// End-of-sequence token id, if the configuration names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Opt(c) => c.eos_token_id,
            ModelConfig::Llama(c) => c.eos_token_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPT_350M: &str = r#"{"model_type": "opt", "vocab_size": 50272, "hidden_size": 1024,
        "num_hidden_layers": 24, "ffn_dim": 4096, "num_attention_heads": 16,
        "max_position_embeddings": 2048, "do_layer_norm_before": false, "word_embed_proj_dim": 512,
        "activation_function": "relu", "eos_token_id": 2}"#;

    #[test]
    fn opt_350m_has_projections_and_no_final_norm() {
        let c = ModelConfig::from_json_str(OPT_350M, Path::new("config.json")).unwrap();
        let ModelConfig::Opt(opt) = c else {
            panic!("not OPT")
        };
        assert!(opt.has_projections());
        assert!(!opt.has_final_layer_norm());
        assert_eq!(opt.embed_dim(), 512);
        assert_eq!(opt.head_dim(), 64);
    }

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
    fn missing_field_is_named_with_the_file() {
        let text = r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 64}"#;
        let err = ModelConfig::from_json_str(text, Path::new("m/config.json")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("m/config.json"), "{msg}");
        assert!(msg.contains("intermediate_size"), "{msg}");
    }

    #[test]
    fn impossible_values_are_rejected() {
        let gqa = r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 3}"#;
        assert!(matches!(
            ModelConfig::from_json_str(gqa, Path::new("c.json")),
            Err(Error::Config { .. })
        ));
        let zero = OPT_350M.replace("\"num_hidden_layers\": 24", "\"num_hidden_layers\": 0");
        assert!(ModelConfig::from_json_str(&zero, Path::new("c.json")).is_err());
        let other = r#"{"model_type": "gpt2"}"#;
        assert!(matches!(
            ModelConfig::from_json_str(other, Path::new("c.json")),
            Err(Error::Unsupported { .. })
        ));
        assert!(ModelConfig::from_json_str("{", Path::new("c.json")).is_err());
    }
}
