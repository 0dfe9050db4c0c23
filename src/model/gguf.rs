//! GGUF v2/v3 files: metadata, tensor directory, and a [`WeightSource`] under Hugging Face names.
//!
//! Layout (little-endian): magic `GGUF`, version u32, tensor count u64, metadata count u64;
//! metadata entries (key string, value type u32, value); tensor infos (name, n_dims u32,
//! dims u64 x n_dims with the fastest-varying first, ggml type u32, offset u64); padding to
//! `general.alignment` (default 32); the data section, which tensor offsets index.
//!
//! llama.cpp's converter permutes the rows of Q and K so that RoPE rotates adjacent pairs
//! (GPT-J style). [`GgufWeights`] undoes that permutation on read, so its tensors equal
//! Hugging Face's and the reference uses HF's rotate-half RoPE.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::weights::{DType, TensorInfo, WeightSource};
use crate::error::{Error, Result};
use crate::quant::ggml::BlockFormat;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any integer type, widened.
    Int(i64),
    /// An unsigned 64-bit integer too large for `Int`.
    U64(u64),
    /// f32 or f64, widened.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::Int(i) => u64::try_from(i).ok(),
            GgufValue::U64(u) => Some(u),
            _ => None,
        }
    }
    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::Float(f) => Some(f),
            GgufValue::Int(i) => Some(i as f64),
            GgufValue::U64(u) => Some(u as f64),
            _ => None,
        }
    }
    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor's data lies in the file.
#[derive(Debug, Clone)]
struct TensorEntry {
    /// The element type.
    dtype: DType,
    /// Row-major shape (GGUF's dims reversed).
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    len: usize,
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// All metadata entries by key.
    pub metadata: BTreeMap<String, GgufValue>,
    tensors: BTreeMap<String, TensorEntry>,
}

/// Bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(Error::format(
                self.path,
                format!(
                    "truncated: {what} needs {n} bytes at offset {}, file has {}",
                    self.pos,
                    self.bytes.len()
                ),
            ));
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    /// A count that claims `count` items of at least `min_size` bytes each must fit the file.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let n = self.u64(what)?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_size) <= self.remaining() => Ok(n),
            _ => Err(Error::format(
                self.path,
                format!(
                    "truncated or corrupt: {what} is {n}, more than the {} bytes left can hold",
                    self.remaining()
                ),
            )),
        }
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::format(self.path, format!("{what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::Int(i64::from(self.take(1, "u8")?[0])),
            1 => GgufValue::Int(i64::from(self.take(1, "i8")?[0] as i8)),
            2 => {
                let b = self.take(2, "u16")?;
                GgufValue::Int(i64::from(u16::from_le_bytes([b[0], b[1]])))
            }
            3 => {
                let b = self.take(2, "i16")?;
                GgufValue::Int(i64::from(i16::from_le_bytes([b[0], b[1]])))
            }
            4 => GgufValue::Int(i64::from(self.u32("u32")?)),
            5 => GgufValue::Int(i64::from(self.u32("i32")? as i32)),
            6 => GgufValue::Float(f64::from(f32::from_bits(self.u32("f32")?))),
            7 => GgufValue::Bool(self.take(1, "bool")?[0] != 0),
            8 => GgufValue::String(self.string("string")?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(self.path, "metadata arrays nested too deep"));
                }
                let elem = self.u32("array type")?;
                let n = self.count("array length", 1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => {
                let v = self.u64("u64")?;
                i64::try_from(v).map_or(GgufValue::U64(v), GgufValue::Int)
            }
            11 => GgufValue::Int(self.u64("i64")? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64("f64")?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!("unknown metadata value type {other}"),
                ))
            }
        })
    }
}

/// ggml type ids ferrogen reads, and names for the common ones it does not.
fn ggml_dtype(id: u32) -> std::result::Result<DType, String> {
    if let Some(format) = BlockFormat::from_ggml_type(id) {
        return Ok(DType::Block(format));
    }
    Ok(match id {
        0 => DType::F32,
        1 => DType::F16,
        30 => DType::BF16,
        15 => return Err("Q8_K".into()),
        16 => return Err("IQ2_XXS".into()),
        17 => return Err("IQ2_XS".into()),
        18 => return Err("IQ3_XXS".into()),
        19 => return Err("IQ1_S".into()),
        21 => return Err("IQ3_S".into()),
        22 => return Err("IQ2_S".into()),
        29 => return Err("IQ1_M".into()),
        other => return Err(format!("ggml type {other}")),
    })
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata, and every tensor's byte range.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 24 {
            return Err(Error::format(
                path,
                format!("{len} bytes is too short for a GGUF header"),
            ));
        }
        // SAFETY: read-only mapping; model files are assumed not to change while open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (version, metadata, tensors) = parse(&map, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A required count in the metadata, naming the key when it is missing or bad.
    pub fn require_u64(&self, key: &str) -> Result<usize> {
        self.get(key)
            .and_then(GgufValue::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| Error::config(&self.path, format!("missing or bad metadata `{key}`")))
    }

    /// An optional count in the metadata (bad when present but not a count).
    pub fn optional_u64(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.require_u64(key).map(Some),
        }
    }

    /// The shape of tensor `name` (GGUF's own name), if the file holds it.
    pub fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| &t.shape[..])
    }

    /// A tensor's values as f32 (GGUF's own name; any float or block type), or `None` when
    /// the file has no such tensor. For small tensors read at open (RoPE frequency factors).
    pub fn tensor_f32(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(entry) = self.tensors.get(name) else {
            return Ok(None);
        };
        let numel = entry.shape.iter().product();
        // In bounds: parse() checked every tensor's range against the file.
        let raw = &self.map[entry.start..entry.start + entry.len];
        crate::model::weights::decode_to_f32(entry.dtype, raw, numel)
            .map(Some)
            .ok_or_else(|| Error::format(&self.path, format!("tensor `{name}` is cut short")))
    }

    /// The names of the file's tensors (GGUF's own names).
    pub fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}

type Parsed = (
    u32,
    BTreeMap<String, GgufValue>,
    BTreeMap<String, TensorEntry>,
);

fn parse(bytes: &[u8], path: &Path) -> Result<Parsed> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        path,
    };
    if c.take(4, "magic")? != b"GGUF" {
        return Err(Error::format(path, "not a GGUF file (bad magic)"));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(Error::format(
            path,
            format!("GGUF version {version} (supported: 2, 3)"),
        ));
    }
    // A tensor info takes at least 8 (name) + 4 + 8 + 4 + 8 bytes; a metadata entry 8 + 4 + 1.
    let n_tensors = c.count("tensor count", 32)?;
    let n_kv = c.count("metadata count", 13)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32("metadata type")?;
        let value = c.value(ty, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => return Err(Error::format(path, "bad `general.alignment`")),
        },
    };

    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32("tensor dims")? as usize;
        if !(1..=4).contains(&n_dims) {
            return Err(Error::format(
                path,
                format!("tensor `{name}` has {n_dims} dimensions (1 to 4 allowed)"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = c.u64("tensor dim")?;
            dims.push(usize::try_from(d).map_err(|_| {
                Error::format(path, format!("tensor `{name}` dimension {d} too large"))
            })?);
        }
        let ty = c.u32("tensor type")?;
        let offset = c.u64("tensor offset")?;
        infos.push((name, dims, ty, offset));
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let data_len = bytes.len().saturating_sub(data_start);

    let mut tensors = BTreeMap::new();
    for (name, dims, ty, offset) in infos {
        let shape: Vec<usize> = dims.iter().rev().copied().collect();
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::format(path, format!("tensor `{name}` size overflows")))?;
        let dtype = ggml_dtype(ty).map_err(|type_name| Error::UnsupportedDType {
            path: path.to_path_buf(),
            name: name.clone(),
            dtype: type_name,
        })?;
        // a row (the first dimension in ggml's order) must be whole blocks to be sliced
        let row_len = dims.first().copied().unwrap_or(1);
        let len = match dtype.bytes_for(numel) {
            Some(len) if row_len.is_multiple_of(dtype.block_len()) => len,
            _ if numel.is_multiple_of(dtype.block_len())
                && row_len.is_multiple_of(dtype.block_len()) =>
            {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` has dimensions {dims:?}: {numel} {dtype} elements need \
                         more bytes than any file holds (a damaged tensor table?)"
                    ),
                ))
            }
            _ => {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}`: rows of {row_len} elements are not whole {dtype} \
                         blocks of {}",
                        dtype.block_len()
                    ),
                ))
            }
        };
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        if offset % alignment != 0 {
            return Err(Error::format(
                path,
                format!("tensor `{name}` offset {offset} is not aligned to {alignment}"),
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= data_len => {}
            _ => {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` ({len} bytes at data offset {offset}) runs past the end \
                         of the file (data section is {data_len} bytes): truncated or corrupt"
                    ),
                ))
            }
        }
        if tensors
            .insert(
                name.clone(),
                TensorEntry {
                    dtype,
                    shape,
                    start: data_start + offset,
                    len,
                },
            )
            .is_some()
        {
            return Err(Error::format(path, format!("tensor `{name}` listed twice")));
        }
    }
    refuse_overlaps(&tensors, path)?;
    Ok((version, metadata, tensors))
}

/// Refuses tensors whose byte ranges overlap: a tensor table that lies (a changed type whose
/// bytes run into the next tensor, an offset that points at another tensor).
fn refuse_overlaps(tensors: &BTreeMap<String, TensorEntry>, path: &Path) -> Result<()> {
    let mut ranges: Vec<(&String, usize, usize)> = tensors
        .iter()
        .filter(|(_, t)| t.len > 0)
        .map(|(n, t)| (n, t.start, t.start + t.len))
        .collect();
    ranges.sort_by_key(|r| (r.1, r.2));
    for w in ranges.windows(2) {
        let ((a, _, a_end), (b, b_start, _)) = (w[0], w[1]);
        if b_start < a_end {
            return Err(Error::format(
                path,
                format!(
                    "tensors `{a}` and `{b}` overlap ({} bytes): the tensor table does not \
                     describe the data (a changed type or offset?)",
                    a_end - b_start
                ),
            ));
        }
    }
    Ok(())
}

/// How to turn a GGUF tensor back into its Hugging Face form.
#[derive(Debug, Clone)]
struct HfTensor {
    gguf_name: String,
    /// For Q and K: the number of heads whose rows llama.cpp interleaved.
    unpermute_heads: Option<usize>,
}

/// The tensors of a GGUF file under Hugging Face names, with Q/K rows restored.
pub struct GgufWeights {
    file: GgufFile,
    by_hf_name: BTreeMap<String, HfTensor>,
}

impl GgufWeights {
    /// Wraps an opened file; `hf_name` maps each GGUF tensor name to its Hugging Face name and,
    /// for Q and K rows that llama.cpp interleaved, the heads whose permutation to undo (the
    /// architecture knows both).
    pub fn new(file: GgufFile, hf_name: impl Fn(&str) -> (String, Option<usize>)) -> Self {
        let by_hf_name = file
            .tensors
            .keys()
            .map(|g| {
                let (hf, unpermute_heads) = hf_name(g);
                (
                    hf,
                    HfTensor {
                        gguf_name: g.clone(),
                        unpermute_heads,
                    },
                )
            })
            .collect();
        Self { file, by_hf_name }
    }

    /// The underlying file (metadata, tokenizer tables).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

/// Undoes llama.cpp's Q/K row permutation. Within each head of `head_dim` rows, HF row
/// `j * head_dim/2 + i` (j in 0..2, i in 0..head_dim/2) was stored at GGUF row `2 * i + j`.
/// Rows are moved whole, so this works for block-quantized rows too.
pub fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Option<Vec<u8>> {
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || !bytes.len().is_multiple_of(rows)
    {
        return None;
    }
    let row_bytes = bytes.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for r in 0..head_dim {
            let (j, i) = (r / half, r % half);
            let src = h * head_dim + 2 * i + j;
            let dst = h * head_dim + r;
            out[dst * row_bytes..(dst + 1) * row_bytes]
                .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
        }
    }
    Some(out)
}

impl WeightSource for GgufWeights {
    fn path(&self) -> &Path {
        &self.file.path
    }

    fn names(&self) -> Vec<String> {
        self.by_hf_name.keys().cloned().collect()
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        let entry = &self.file.tensors[&self.by_hf_name.get(name)?.gguf_name];
        Some(TensorInfo {
            dtype: entry.dtype,
            shape: entry.shape.clone(),
        })
    }

    fn release(&self, name: &str) {
        if let Some(hf) = self.by_hf_name.get(name) {
            let entry = &self.file.tensors[&hf.gguf_name];
            crate::model::weights::drop_pages(&self.file.map, entry.start, entry.len);
        }
    }

    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let hf = self
            .by_hf_name
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.file.path.clone(),
                name: name.to_string(),
            })?;
        let entry = &self.file.tensors[&hf.gguf_name];
        // In bounds: parse() checked every tensor's range against the file.
        let raw = &self.file.map[entry.start..entry.start + entry.len];
        match hf.unpermute_heads {
            None => Ok(Cow::Borrowed(raw)),
            Some(heads) => {
                let rows = entry.shape.first().copied().unwrap_or(0);
                unpermute_rows(raw, rows, heads)
                    .map(Cow::Owned)
                    .ok_or_else(|| {
                        Error::format(
                            &self.file.path,
                            format!(
                                "tensor `{}` has {rows} rows, not {heads} heads of an even width",
                                hf.gguf_name
                            ),
                        )
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, hd, cols) = (3, 8, 2);
        let rows = heads * hd;
        let hf: Vec<u8> = (0..rows * cols).map(|v| v as u8).collect();
        let mut gguf = vec![0u8; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + j * hd / 2 + i; // HF row (h, j, i)
                    let dst = h * hd + i * 2 + j; // after swapaxes: (h, i, j)
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, heads).unwrap(), hf);
        assert!(unpermute_rows(&gguf, rows, 5).is_none());
    }
}
