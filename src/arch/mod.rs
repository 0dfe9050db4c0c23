//! Architectures: one file per model family (`llama.rs`, `opt.rs`) holding what it is: its
//! configuration (`config.json`, GGUF metadata), tensor list, how its tensors form the
//! schedule's units, its attention heads, its sizes for the cost model, and its forward pass
//! over the [`Device`] seam; `common.rs` holds what they share. This file is the switchboard
//! ([`ModelConfig`], [`ModelFiles`]): each method below hands its work to the architecture.
//!
//! A unit's weights reach the forward pass as data ([`PartSpec`] listed by the architecture,
//! filled by the placer into [`PartWeights`]), so the same recipe runs resident models
//! ([`crate::exec::ResidentModel`]) and streamed ones (`crate::exec`) on every device.

pub mod builtin;
mod common;
pub(crate) mod gemma;
pub(crate) mod llama;
pub(crate) mod opt;
pub mod random;

pub use common::{
    CacheSlot, Linear, LocalAttention, ModelParts, PartSpec, PartWeights, RowBatch, Runner,
    UnitWeights,
};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use gemma::GemmaConfig;
pub use llama::LlamaConfig;
pub use opt::OptConfig;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::layout::{HeadLayout, RunOptions, CHUNK_ROWS, LOGIT_ROWS};
use crate::model::gguf::{GgufFile, GgufValue, GgufWeights};
use crate::model::safetensors::SafetensorsWeights;
use crate::model::weights::{check_layer_tensors, decode_to_f32};
use crate::model::{fingerprint, ChatTemplate, TextTokenizer, WeightSource};
use crate::policy::cost::ModelShape;

/// The configuration of a supported model: one variant per architecture family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model_type", rename_all = "lowercase")]
pub enum ModelConfig {
    /// Meta's OPT family (facebook/opt-*).
    Opt(OptConfig),
    /// The Llama family (Llama 2/3, SmolLM, TinyLlama, ...) and those built alike: Mistral,
    /// Qwen2/2.5 and Qwen3 (`LlamaConfig::family`).
    Llama(LlamaConfig),
    /// Gemma 2 and Gemma 3 (text).
    Gemma(GemmaConfig),
}

/// Everything a model path holds: configuration, weights, and (when present) a tokenizer.
pub struct ModelFiles {
    /// Where the model came from.
    pub path: PathBuf,
    /// The architecture and its sizes.
    pub config: ModelConfig,
    /// The tensors, lazily read.
    pub weights: Box<dyn WeightSource>,
    /// The text tokenizer, or why there is none (records may still be given as token ids).
    pub tokenizer: std::result::Result<TextTokenizer, String>,
    /// The chat template, or why there is none (chat records cannot be formatted).
    pub chat_template: std::result::Result<ChatTemplate, String>,
}

impl ModelFiles {
    /// Opens a model directory or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            Self::open_dir(path)
        } else {
            Self::open_gguf(path)
        }
    }

    fn open_dir(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_json_file(&dir.join("config.json"))?;
        let weights = SafetensorsWeights::open_dir(dir)?;
        check_layer_tensors(
            &weights.names(),
            config.num_layers(),
            &dir.join("config.json"),
        )?;
        let weights = config.split_fused(Box::new(weights))?;
        // Gemma's RMSNorms multiply by 1 + w: its checkpoints store w (its GGUFs 1 + w)
        let weights: Box<dyn WeightSource> = match &config {
            ModelConfig::Gemma(c) => Box::new(crate::model::ShiftedNorms::new(
                weights,
                gemma::GemmaSpec::new(c).norms(),
            )),
            _ => weights,
        };
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.exists() {
            TextTokenizer::from_file(&tokenizer_path).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "{} has no tokenizer.json; give records as token ids",
                dir.display()
            ))
        };
        let chat_template = match ChatTemplate::from_dir(dir) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(format!(
                "{} has no chat template (tokenizer_config.json `chat_template` or \
                 chat_template.jinja); give records as a prompt",
                dir.display()
            )),
            Err(e) => Err(e.to_string()),
        };
        Ok(Self {
            path: dir.to_path_buf(),
            config,
            weights,
            tokenizer,
            chat_template,
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let tokenizer = TextTokenizer::from_gguf(&file).map_err(|e| e.to_string());
        let chat_template = gguf_chat_template(&file);
        let weights = config.split_fused(Box::new(config.gguf_weights(file)?))?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
            weights,
            tokenizer,
            chat_template,
        })
    }

    /// The tokenizer, or an error saying why text cannot be tokenized.
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().map_err(|reason| Error::Tokenizer {
            reason: reason.clone(),
        })
    }

    /// The chat template, or an error saying why chat messages cannot be formatted.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.chat_template
            .as_ref()
            .map_err(|reason| Error::Tokenizer {
                reason: reason.clone(),
            })
    }

    /// Reads every tensor once and fails naming the first that holds a NaN or an infinity
    /// (with the element's index): such a model computes non-finite numbers.
    pub fn check_finite(&self) -> Result<()> {
        let source = self.weights.as_ref();
        for name in source.names() {
            let Some(info) = source.info(&name) else {
                continue;
            };
            let rows = info.shape.first().copied().unwrap_or(1).max(1);
            let width = info.numel() / rows;
            // a few MiB of rows at a time
            let chunk = ((4 << 20) / (width * 4).max(1)).max(1);
            let mut first = 0;
            while first < rows {
                let n = chunk.min(rows - first);
                let bytes = source.row_bytes(&name, first..first + n)?;
                let values = decode_to_f32(info.dtype, &bytes, n * width).ok_or_else(|| {
                    Error::format(source.path(), format!("tensor `{name}` is cut short"))
                })?;
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(Error::format(
                        source.path(),
                        format!(
                            "tensor `{name}` holds {} at element {} (row {}): the model \
                             computes non-finite numbers; use an intact copy",
                            values[i],
                            first * width + i,
                            first + i / width.max(1)
                        ),
                    ));
                }
                first += n;
            }
            source.release(&name);
        }
        Ok(())
    }

    /// This model's fingerprint ([`fingerprint`]).
    pub fn fingerprint(&self) -> Result<String> {
        fingerprint(&self.path)
    }

    /// The model's tensors grouped as the schedule's units use them, named as its files
    /// name them.
    pub fn parts(&self) -> ModelParts {
        self.config.parts(Some(self.weights.as_ref()))
    }
}

/// A GGUF file's `tokenizer.chat_template`, with the texts of its BOS and EOS tokens.
fn gguf_chat_template(file: &GgufFile) -> std::result::Result<ChatTemplate, String> {
    let source = file
        .get("tokenizer.chat_template")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| {
            format!(
                "{} has no `tokenizer.chat_template`; give records as a prompt",
                file.path().display()
            )
        })?;
    let token = |key: &str| -> String {
        let tokens = file
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array);
        file.get(key)
            .and_then(GgufValue::as_u64)
            .and_then(|id| tokens?.get(usize::try_from(id).ok()?)?.as_str())
            .unwrap_or_default()
            .to_string()
    };
    ChatTemplate::new(
        source.to_string(),
        token("tokenizer.ggml.bos_token_id"),
        token("tokenizer.ggml.eos_token_id"),
        file.path(),
    )
    .map_err(|e| e.to_string())
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`, naming the file and field in any error.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json` (its `model_type` names the architecture); `path`
    /// is used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let mut value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::config(path, "missing field `model_type`"))?
            .to_string();
        let config = match model_type.as_str() {
            "opt" => serde_json::from_value(value).map(ModelConfig::Opt),
            "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" => {
                llama::lift_rope_parameters(&mut value);
                llama::set_family(&mut value, &model_type);
                serde_json::from_value(value).map(ModelConfig::Llama)
            }
            "gemma2" | "gemma3_text" => {
                gemma::lift_gemma_rope(&mut value, &model_type);
                serde_json::from_value(value).map(ModelConfig::Gemma)
            }
            "gemma3" => {
                return Err(Error::Unsupported {
                    what: format!(
                        "{}: the multimodal Gemma 3 checkpoint (use its text model, \
                         `gemma3_text`, or its GGUF)",
                        path.display()
                    ),
                })
            }
            other => {
                return Err(Error::Unsupported {
                    what: format!(
                        "{}: model_type `{other}` (supported: opt, llama, mistral, qwen2, qwen3, \
                         phi3, gemma2, gemma3_text)",
                        path.display()
                    ),
                })
            }
        }
        .map_err(|e| Error::config(path, e.to_string()))?;
        config.validate(path)?;
        Ok(config)
    }

    /// The configuration a GGUF file's metadata describes (`general.architecture` names the
    /// architecture), checked against the file's tensors.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path();
        let arch = file
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| Error::config(path, "missing `general.architecture`"))?;
        let config = match arch {
            "llama" | "qwen2" | "qwen3" | "phi3" => {
                ModelConfig::Llama(llama::from_gguf(file, arch)?)
            }
            "gemma2" | "gemma3" => ModelConfig::Gemma(gemma::from_gguf(file, arch)?),
            other => {
                return Err(Error::Unsupported {
                    what: format!("{}: GGUF architecture `{other}`", path.display()),
                })
            }
        };
        config.validate(path)?;
        check_layer_tensors(&file.tensor_names(), config.num_layers(), path)?;
        // the embedding's rows are the vocabulary: every token of the tokenizer needs one
        // (rows past the tokens, padding, are never looked up)
        let tokens = file
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array);
        if let Some(tokens) = tokens.filter(|t| t.len() > config.vocab_size()) {
            return Err(Error::config(
                path,
                format!(
                    "`token_embd.weight` has {} rows but the tokenizer has {} tokens: the \
                     vocabulary and the embedding disagree (a damaged or mismatched file)",
                    config.vocab_size(),
                    tokens.len()
                ),
            ));
        }
        Ok(config)
    }

    /// A GGUF file's tensors under this architecture's Hugging Face names.
    pub fn gguf_weights(&self, file: GgufFile) -> Result<GgufWeights> {
        match self {
            ModelConfig::Llama(c) => Ok(GgufWeights::new(file, |g| llama::gguf_tensor_name(g, c))),
            ModelConfig::Gemma(_) => Ok(GgufWeights::new(file, gemma::gguf_tensor_name)),
            ModelConfig::Opt(_) => Err(Error::Unsupported {
                what: format!("{}: GGUF for a non-llama model", file.path().display()),
            }),
        }
    }

    /// `weights` with the tensors this architecture stores fused (Phi-3's) seen as their
    /// parts, as the recipe names them.
    pub fn split_fused(&self, weights: Box<dyn WeightSource>) -> Result<Box<dyn WeightSource>> {
        let cuts = match self {
            ModelConfig::Llama(c) => llama::fused_cuts(c),
            ModelConfig::Opt(_) | ModelConfig::Gemma(_) => Vec::new(),
        };
        if cuts.is_empty() {
            return Ok(weights);
        }
        Ok(Box::new(crate::model::RowSplit::new(weights, cuts)?))
    }

    /// Checks that the configuration describes a model ferrogen can run; `path` names the
    /// file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        match self {
            ModelConfig::Opt(c) => c.validate(path),
            ModelConfig::Gemma(c) => c.validate(path),
            ModelConfig::Llama(c) => c.validate(path),
        }
    }

    /// The model's tensors grouped as the schedule's units use them, named as `source` names
    /// them (`None`: as transformers saves them).
    pub fn parts(&self, source: Option<&dyn WeightSource>) -> ModelParts {
        match self {
            ModelConfig::Llama(c) => llama::parts(c),
            ModelConfig::Opt(c) => opt::parts(c, source.map_or("model.", opt::prefix)),
            ModelConfig::Gemma(c) => gemma::parts(c),
        }
    }

    /// The attention heads of the model's layers.
    pub fn head_layout(&self) -> HeadLayout {
        match self {
            ModelConfig::Llama(c) => llama::head_layout(c),
            ModelConfig::Opt(c) => opt::head_layout(c),
            ModelConfig::Gemma(c) => gemma::head_layout(c),
        }
    }

    /// The model's sizes as the cost model counts them.
    pub fn shape(&self) -> ModelShape {
        match self {
            ModelConfig::Llama(c) => llama::shape(c),
            ModelConfig::Opt(c) => opt::shape(c),
            ModelConfig::Gemma(c) => gemma::shape(c),
        }
    }

    /// The sliding window of every layer, keys a query sees with its own (`None`: all).
    pub fn attention_window(&self) -> Option<usize> {
        match self {
            ModelConfig::Llama(c) => c.attention_window(),
            ModelConfig::Gemma(c) => c
                .sliding_window
                .filter(|_| (0..c.num_hidden_layers).any(|l| c.is_local(l))),
            ModelConfig::Opt(_) => None,
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.vocab_size,
            ModelConfig::Gemma(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    /// Width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.hidden_size,
            ModelConfig::Llama(c) => c.hidden_size,
            ModelConfig::Gemma(c) => c.hidden_size,
        }
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.num_hidden_layers,
            ModelConfig::Gemma(c) => c.num_hidden_layers,
            ModelConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    /// Maximum number of positions a sequence may have.
    pub fn max_context(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.max_position_embeddings,
            ModelConfig::Gemma(c) => c.max_position_embeddings,
            ModelConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    /// Width of the MLP's intermediate layer.
    pub fn intermediate_size(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.ffn_dim,
            ModelConfig::Gemma(c) => c.intermediate_size,
            ModelConfig::Llama(c) => c.intermediate_size,
        }
    }

    /// Width of one cached key (or value) row: heads x head_dim of the K/V projection.
    pub fn kv_width(&self) -> usize {
        match self {
            ModelConfig::Opt(c) => c.hidden_size,
            ModelConfig::Llama(c) => c.kv_heads() * c.head_dim(),
            ModelConfig::Gemma(c) => c.kv_heads() * c.head_dim,
        }
    }

    /// The beginning-of-sequence token, if the configuration names one.
    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Opt(c) => c.bos_token_id,
            ModelConfig::Gemma(c) => c.bos_token_id,
            ModelConfig::Llama(c) => c.bos_token_id,
        }
    }

    /// End-of-sequence token id, if the configuration names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Opt(c) => c.eos_token_id,
            ModelConfig::Gemma(c) => c.eos_token_id,
            ModelConfig::Llama(c) => c.eos_token_id,
        }
    }
}

impl<D: Device> Runner<D> {
    /// The recipe of `config` on `dev`.
    pub fn new(dev: D, config: &ModelConfig, options: RunOptions) -> Self {
        let (rope, local) = match config {
            ModelConfig::Llama(c) => (
                Some(c.rope_inv_freq()),
                c.attention_window().map(|window| LocalAttention {
                    window,
                    inv_freq: None,
                }),
            ),
            ModelConfig::Gemma(c) => (
                Some(c.rope_inv_freq()),
                c.sliding_window.map(|window| LocalAttention {
                    window,
                    inv_freq: Some(c.local_inv_freq()),
                }),
            ),
            ModelConfig::Opt(_) => (None, None),
        };
        let (attn_softcap, logit_softcap) = match config {
            ModelConfig::Gemma(c) => (
                c.attn_logit_softcapping.map(|v| v as f32),
                c.final_logit_softcapping.map(|v| v as f32),
            ),
            _ => (None, None),
        };
        Self {
            dev,
            options,
            config: config.clone(),
            logit_rows: LOGIT_ROWS,
            chunk_rows: CHUNK_ROWS,
            heads: config.head_layout(),
            rope,
            local,
            attn_softcap,
            logit_softcap,
        }
    }

    /// Embedded tokens `e` -> the first layer's input.
    pub fn input(&self, w: &PartWeights<D>, e: D::Tensor, rb: &RowBatch<D>) -> Result<D::Tensor> {
        match &self.config {
            ModelConfig::Llama(_) => Ok(e),
            ModelConfig::Opt(_) => opt::input(self, w, e, rb),
            ModelConfig::Gemma(c) => gemma::input(self, c, e),
        }
    }

    /// A layer's attention half, appending the rows' keys and values to `cache`, in row chunks
    /// (query tiles) taken in order.
    pub fn attention(
        &self,
        w: &PartWeights<D>,
        x: D::Tensor,
        cache: &D::Cache,
        rb: &RowBatch<D>,
    ) -> Result<D::Tensor> {
        self.by_chunks(x, |xc, range| {
            let sub;
            let rows = if range.len() == rb.rows {
                rb
            } else {
                sub = self.chunk(rb, range)?;
                &sub
            };
            self.attention_with(w, xc, rows, |rows, q, k, v| {
                self.dev
                    .attend(cache, &rows.dev, &rows.appends, q, k, v, self.heads)
            })
        })
    }

    /// [`Runner::attention`] on all rows at once, with the attention itself done by
    /// `attend(q, k, v)`, which returns `[rows, heads * head_dim]` (before the output
    /// projection). The executor's split attention uses it for decode steps.
    pub fn attention_with(
        &self,
        w: &PartWeights<D>,
        x: D::Tensor,
        rb: &RowBatch<D>,
        attend: impl FnOnce(&RowBatch<D>, &D::Tensor, &D::Tensor, &D::Tensor) -> Result<D::Tensor>,
    ) -> Result<D::Tensor> {
        let rb = rb.for_part(w);
        let attend = |q: &D::Tensor, k: &D::Tensor, v: &D::Tensor| attend(rb, q, k, v);
        match &self.config {
            ModelConfig::Llama(c) => llama::attention(self, c, w, x, rb, attend),
            ModelConfig::Opt(c) => opt::attention(self, c, w, x, attend),
            ModelConfig::Gemma(c) => gemma::attention(self, c, w, x, rb, attend),
        }
    }

    /// A layer's MLP half, in row chunks.
    pub fn mlp(&self, w: &PartWeights<D>, x: D::Tensor) -> Result<D::Tensor> {
        self.by_chunks(x, |xc, _| match &self.config {
            ModelConfig::Llama(c) => llama::mlp(self, c, w, xc),
            ModelConfig::Opt(c) => opt::mlp(self, c, w, xc),
            ModelConfig::Gemma(c) => gemma::mlp(self, c, w, xc),
        })
    }

    /// The last layer's output -> the rows the output projection reads, in row chunks.
    pub fn head(&self, w: &PartWeights<D>, x: D::Tensor) -> Result<D::Tensor> {
        self.by_chunks(x, |xc, _| match &self.config {
            ModelConfig::Llama(c) => llama::head(self, c, w, xc),
            ModelConfig::Opt(_) => opt::head(self, w, xc),
            ModelConfig::Gemma(c) => gemma::head(self, c, w, xc),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use opt::tests::OPT_350M;

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
