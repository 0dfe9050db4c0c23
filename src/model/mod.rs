//! Models on disk: configuration, weight files, tokenizer, and each architecture's tensor list.
//!
//! A model path is either a directory as Hugging Face saves it (`config.json`, `*.safetensors`,
//! optionally `tokenizer.json`) or a single `.gguf` file. [`ModelFiles::open`] reads either.

pub mod builtin;
pub mod config;
pub mod gguf;
pub mod llama;
pub mod opt;
pub mod random;
pub mod safetensors;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{LlamaConfig, ModelConfig, OptConfig};
pub use tokenizer::TextTokenizer;
pub use weights::{DType, TensorInfo, WeightSource};

use crate::error::{Error, Result};

/// A tensor an architecture needs: its name in the weight source and its row-major shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face name.
    pub name: String,
    /// Row-major shape, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A spec from a name and shape.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// Reads this tensor from `source` as f32, checking its shape.
    pub fn load_f32(&self, source: &dyn WeightSource) -> Result<Vec<f32>> {
        source.load_f32(&self.name, &self.shape)
    }
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
        let weights = safetensors::SafetensorsWeights::open_dir(dir)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.exists() {
            TextTokenizer::from_file(&tokenizer_path).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "{} has no tokenizer.json; give records as token ids",
                dir.display()
            ))
        };
        Ok(Self {
            path: dir.to_path_buf(),
            config,
            weights: Box::new(weights),
            tokenizer,
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = gguf::GgufFile::open(path)?;
        let config = file.model_config()?;
        let tokenizer = TextTokenizer::from_gguf(&file).map_err(|e| e.to_string());
        let weights = gguf::GgufWeights::new(file, &config)?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
            weights: Box::new(weights),
            tokenizer,
        })
    }

    /// The tokenizer, or an error saying why text cannot be tokenized.
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().map_err(|reason| Error::Tokenizer {
            reason: reason.clone(),
        })
    }

    /// The name prefix of an OPT checkpoint's tensors: `"model."` (transformers) or `""`.
    pub fn opt_prefix(&self) -> &'static str {
        if self.weights.info("decoder.embed_tokens.weight").is_some() {
            ""
        } else {
            "model."
        }
    }
}
