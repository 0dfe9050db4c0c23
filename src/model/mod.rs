//! Model files as formats, whatever the architecture: memory-mapped weight sources
//! (safetensors, sharded or not; GGUF and its metadata), tokenizers, a tensor's name and
//! shape, and a model's fingerprint. `crate::arch::ModelFiles` opens a model path with them.

pub mod chat;
pub mod gguf;
pub mod safetensors;
pub mod split;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

pub use chat::{ChatMessage, ChatTemplate};
pub use split::{RowCut, RowSplit, ShiftedNorms};
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
