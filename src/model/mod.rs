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
        weights::check_layer_tensors(
            &weights.names(),
            config.num_layers(),
            &dir.join("config.json"),
        )?;
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
                let values =
                    weights::decode_to_f32(info.dtype, &bytes, n * width).ok_or_else(|| {
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

    /// The name prefix of an OPT checkpoint's tensors: `"model."` (transformers) or `""`.
    pub fn opt_prefix(&self) -> &'static str {
        if self.weights.info("decoder.embed_tokens.weight").is_some() {
            ""
        } else {
            "model."
        }
    }
}

/// A fingerprint of the model at `path` (a file, or a directory and the files in it): each
/// file's name, size and the xxh3 hash of its first and last MiB, hashed together. It changes
/// when a file is replaced, resized or rewritten at either end (a GGUF's header and tensor
/// table, a safetensors header), and costs a few reads whatever the model's size.
pub fn fingerprint(path: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    const EDGE: u64 = 1 << 20;
    let mut files = Vec::new();
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
        for entry in entries.flatten() {
            if entry.path().is_file() {
                files.push(entry.path());
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; EDGE as usize];
    for file in &files {
        let mut f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
        let len = f.metadata().map_err(|e| Error::io(file, e))?.len();
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        hasher.update(name.unwrap_or_default().as_bytes());
        hasher.update(&len.to_le_bytes());
        for start in [0, len.saturating_sub(EDGE)] {
            let n = EDGE.min(len) as usize;
            f.seek(SeekFrom::Start(start))
                .map_err(|e| Error::io(file, e))?;
            f.read_exact(&mut buf[..n])
                .map_err(|e| Error::io(file, e))?;
            hasher.update(&buf[..n]);
        }
    }
    Ok(format!("{:016x}", hasher.digest()))
}
