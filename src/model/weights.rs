//! The [`WeightSource`] trait: named tensors read lazily from memory-mapped model files.
//!
//! Both file formats present tensors under Hugging Face's names and in PyTorch's row-major
//! `[out, in]` order, so architecture code never knows which format it reads.

use std::borrow::Cow;
use std::path::Path;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::quant::ggml::BlockFormat;

/// The element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE single.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// A ggml block format (rows are whole blocks of 32 or 256).
    Block(BlockFormat),
}

impl DType {
    /// Elements per block: 1 for the float types.
    pub fn block_len(self) -> usize {
        match self {
            DType::Block(b) => b.block_len(),
            _ => 1,
        }
    }

    /// Bytes `n` elements take, `None` when `n` is not whole blocks or the size overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        match self {
            DType::F32 => n.checked_mul(4),
            DType::F16 | DType::BF16 => n.checked_mul(2),
            DType::Block(b) => n
                .is_multiple_of(b.block_len())
                .then(|| (n / b.block_len()).checked_mul(b.block_bytes()))
                .flatten(),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DType::F32 => write!(f, "F32"),
            DType::F16 => write!(f, "F16"),
            DType::BF16 => write!(f, "BF16"),
            DType::Block(b) => write!(f, "{}", b.name()),
        }
    }
}

/// What a weight source knows about one tensor without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type as stored.
    pub dtype: DType,
    /// Row-major shape, outermost first (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A set of named tensors backed by model files.
pub trait WeightSource: Send + Sync {
    /// The file or directory the tensors come from (used in messages).
    fn path(&self) -> &Path;

    /// All tensor names, sorted.
    fn names(&self) -> Vec<String>;

    /// Type and shape of `name`, or `None` if absent or of a type ferrogen cannot read.
    fn info(&self, name: &str) -> Option<TensorInfo>;

    /// The stored bytes of `name` in row-major order (borrowed from the mapping when possible).
    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>>;

    /// The stored bytes of rows `rows` of `name` (along its first dimension). The default slices
    /// [`WeightSource::bytes`]; sources that generate or decode tensors override it to produce
    /// only those rows.
    fn row_bytes(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Cow<'_, [u8]>> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path().to_path_buf(),
            name: name.to_string(),
        })?;
        let per_row: usize = info.shape.iter().skip(1).product();
        let row = info.dtype.bytes_for(per_row).ok_or_else(|| {
            Error::format(
                self.path(),
                format!("tensor `{name}` rows are not whole blocks"),
            )
        })?;
        let first = info.shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > first {
            return Err(Error::invalid(
                name,
                format!("rows {rows:?} of a tensor with {first} rows"),
            ));
        }
        let (a, b) = (rows.start * row, rows.end * row);
        Ok(match self.bytes(name)? {
            Cow::Borrowed(all) => Cow::Borrowed(&all[a..b]),
            Cow::Owned(all) => Cow::Owned(all[a..b].to_vec()),
        })
    }

    /// A hint that `name` will not be read again soon: memory-mapped sources drop its pages
    /// from the process's resident set (they are read from the file again if needed).
    fn release(&self, _name: &str) {}

    /// Reads `name` as f32 (decoding exactly), checking that its shape is `expected`.
    fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        // bytes() first: it names a missing tensor or an unsupported type precisely.
        let bytes = self.bytes(name)?;
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path().to_path_buf(),
            name: name.to_string(),
        })?;
        if info.shape != expected {
            return Err(Error::TensorShape {
                path: self.path().to_path_buf(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape,
            });
        }
        decode_to_f32(info.dtype, &bytes, info.numel()).ok_or_else(|| {
            Error::format(
                self.path(),
                format!(
                    "tensor `{name}` holds {} bytes, not what {} elements of {} need",
                    bytes.len(),
                    info.numel(),
                    info.dtype
                ),
            )
        })
    }
}

/// Drops the pages of `map[offset..offset + len]` from the resident set; a later read fetches
/// them from the file again. (On Windows a no-op: the pages stay until memory is short.)
pub(crate) fn drop_pages(map: &memmap2::Mmap, offset: usize, len: usize) {
    // SAFETY: the mapping is a read-only, private file mapping: MADV_DONTNEED only discards
    // clean pages, which later reads fault back in from the file with the same contents.
    #[cfg(unix)]
    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}

/// Decodes `n` elements of `dtype` from little-endian `bytes`; `None` if the sizes disagree.
pub fn decode_to_f32(dtype: DType, bytes: &[u8], n: usize) -> Option<Vec<f32>> {
    if dtype.bytes_for(n)? != bytes.len() {
        return None;
    }
    Some(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::Block(format) => {
            let mut out = vec![0f32; n];
            format.decode(bytes, &mut out);
            out
        }
    })
}

/// Refuses a model whose tensors do not match its layer count: a layer tensor (`blk.N.` in
/// GGUF, `layers.N.` in Hugging Face names) of a layer past the count, or a layer with no
/// tensor at all.
pub(crate) fn check_layer_tensors(names: &[String], layers: usize, path: &Path) -> Result<()> {
    let layer_of = |name: &str| -> Option<usize> {
        let rest = name.strip_prefix("blk.").or_else(|| {
            name.find("layers.")
                .filter(|&i| i == 0 || name.as_bytes()[i - 1] == b'.')
                .map(|i| &name[i + "layers.".len()..])
        })?;
        rest.split('.').next()?.parse().ok()
    };
    let mut seen = vec![false; layers];
    for name in names {
        let Some(layer) = layer_of(name) else {
            continue;
        };
        match seen.get_mut(layer) {
            Some(s) => *s = true,
            None => {
                return Err(Error::config(
                    path,
                    format!(
                        "tensor `{name}` is of layer {layer}, but the model has {layers} layers \
                         (0 to {}): the layer count and the tensors disagree",
                        layers.saturating_sub(1)
                    ),
                ))
            }
        }
    }
    if let Some(missing) = seen.iter().position(|&s| !s) {
        return Err(Error::config(
            path,
            format!(
                "layer {missing} of {layers} has no tensors: the layer count and the tensors \
                 disagree"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_checks_sizes() {
        assert!(decode_to_f32(DType::F32, &[0; 7], 2).is_none());
        assert!(decode_to_f32(DType::Block(BlockFormat::Q8_0), &[0; 34], 31).is_none());
        let v = decode_to_f32(DType::BF16, &bf16::from_f32(1.5).to_le_bytes(), 1).unwrap();
        assert_eq!(v, vec![1.5]);
        let v = decode_to_f32(DType::F16, &f16::from_f32(-2.0).to_le_bytes(), 1).unwrap();
        assert_eq!(v, vec![-2.0]);
    }
}
