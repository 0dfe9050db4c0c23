//! Fused tensors seen as their parts: a weight source whose tensors cut along their rows appear
//! under the names of the parts (Phi-3's `qkv_proj` as `q_proj`, `k_proj` and `v_proj`, its
//! `gate_up_proj` as `gate_proj` and `up_proj`). Nothing is copied: a part's rows are the fused
//! tensor's rows at an offset, read when asked for, so the parts are placed, streamed and
//! quantized like any tensor.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use super::weights::{TensorInfo, WeightSource};
use crate::error::{Error, Result};

/// A fused tensor's cut: its name and its parts' names with their row counts, in row order.
pub type RowCut = (String, Vec<(String, usize)>);

/// A weight source with some tensors replaced by their parts.
pub struct RowSplit {
    inner: Box<dyn WeightSource>,
    /// Part name -> (fused name, its rows in the fused tensor).
    parts: BTreeMap<String, (String, Range<usize>)>,
    /// The fused names (hidden from `names`).
    fused: Vec<String>,
}

impl RowSplit {
    /// `inner` with each of `cuts` seen as its parts; fails, naming the file and tensor, when
    /// a fused tensor is missing or its rows are not the parts' rows in all.
    pub fn new(inner: Box<dyn WeightSource>, cuts: Vec<RowCut>) -> Result<Self> {
        let mut parts = BTreeMap::new();
        let mut fused = Vec::new();
        for (name, pieces) in cuts {
            let info = inner.info(&name).ok_or_else(|| Error::MissingTensor {
                path: inner.path().to_path_buf(),
                name: name.clone(),
            })?;
            let rows = info.shape.first().copied().unwrap_or(0);
            let want: usize = pieces.iter().map(|(_, n)| n).sum();
            if rows != want {
                return Err(Error::format(
                    inner.path(),
                    format!(
                        "tensor `{name}` has {rows} rows; its parts ({}) need {want}",
                        pieces
                            .iter()
                            .map(|(p, n)| format!("{p}: {n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            let mut at = 0;
            for (part, n) in pieces {
                parts.insert(part, (name.clone(), at..at + n));
                at += n;
            }
            fused.push(name);
        }
        Ok(Self {
            inner,
            parts,
            fused,
        })
    }
}

impl WeightSource for RowSplit {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .names()
            .into_iter()
            .filter(|n| !self.fused.contains(n))
            .chain(self.parts.keys().cloned())
            .collect();
        names.sort();
        names
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        match self.parts.get(name) {
            Some((fused, rows)) => {
                let mut info = self.inner.info(fused)?;
                info.shape[0] = rows.len();
                Some(info)
            }
            None => self.inner.info(name),
        }
    }

    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        match self.parts.get(name) {
            Some((fused, rows)) => self.inner.row_bytes(fused, rows.clone()),
            None => self.inner.bytes(name),
        }
    }

    fn row_bytes(&self, name: &str, rows: Range<usize>) -> Result<Cow<'_, [u8]>> {
        match self.parts.get(name) {
            Some((fused, own)) => {
                if rows.start > rows.end || rows.end > own.len() {
                    return Err(Error::invalid(
                        name,
                        format!("rows {rows:?} of a tensor with {} rows", own.len()),
                    ));
                }
                let at = own.start;
                self.inner.row_bytes(fused, at + rows.start..at + rows.end)
            }
            None => self.inner.row_bytes(name, rows),
        }
    }

    fn release(&self, name: &str) {
        match self.parts.get(name) {
            Some((fused, _)) => self.inner.release(fused),
            None => self.inner.release(name),
        }
    }
}

/// A weight source whose named 1-D tensors read as `1 + w`, in f32: Gemma's RMSNorm weights
/// as its Hugging Face checkpoints store them (`w`), seen as its GGUF files store them and as
/// the recipe multiplies by them (`1 + w`).
pub struct ShiftedNorms {
    inner: Box<dyn WeightSource>,
    names: std::collections::BTreeSet<String>,
}

impl ShiftedNorms {
    /// `inner` with each of `names` read as one plus its values.
    pub fn new(inner: Box<dyn WeightSource>, names: Vec<String>) -> Self {
        Self {
            inner,
            names: names.into_iter().collect(),
        }
    }
}

impl WeightSource for ShiftedNorms {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn names(&self) -> Vec<String> {
        self.inner.names()
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        let mut info = self.inner.info(name)?;
        if self.names.contains(name) {
            info.dtype = super::DType::F32;
        }
        Some(info)
    }

    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        if !self.names.contains(name) {
            return self.inner.bytes(name);
        }
        let info = self.inner.info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path().to_path_buf(),
            name: name.to_string(),
        })?;
        let raw = self.inner.bytes(name)?;
        let values = super::weights::decode_to_f32(info.dtype, &raw, info.numel())
            .ok_or_else(|| Error::format(self.path(), format!("tensor `{name}` is cut short")))?;
        let shifted: Vec<u8> = values
            .iter()
            .flat_map(|v| (1.0 + v).to_le_bytes())
            .collect();
        Ok(Cow::Owned(shifted))
    }

    fn release(&self, name: &str) {
        self.inner.release(name);
    }
}
