//! Safetensors weight source: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, each memory-mapped.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensorError;
use safetensors::SafeTensors;

use super::weights::{DType, TensorInfo, WeightSource};
use crate::error::{Error, Result};

/// One memory-mapped safetensors file with its validated header.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Offset of the data section: 8 + header length.
    data_start: usize,
    metadata: Metadata,
}

/// Tensors from one or more safetensors files.
pub struct SafetensorsWeights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Opens the safetensors weights of a model directory: `model.safetensors.index.json`'s
    /// shards if that file exists, else `model.safetensors`, else the one `*.safetensors` file.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files = if index_path.exists() {
            shard_files_from_index(&index_path)?
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::format(
                    dir,
                    "no model.safetensors, model.safetensors.index.json or *.safetensors file",
                ));
            }
            found
        };
        Self::open_files(dir, &files)
    }

    /// Opens the given safetensors files as one set of tensors.
    pub fn open_files(dir: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let shard = Shard::open(path)?;
            for name in shard.metadata.tensors().keys() {
                if index.insert(name.clone(), shards.len()).is_some() {
                    return Err(Error::format(
                        path,
                        format!("tensor `{name}` appears in more than one shard"),
                    ));
                }
            }
            shards.push(shard);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }
}

/// The distinct shard files named by an index's `weight_map`, in sorted order.
fn shard_files_from_index(index_path: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: Index = serde_json::from_str(&text)
        .map_err(|e| Error::format(index_path, format!("bad shard index: {e}")))?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = index.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            if f.contains("..") || Path::new(&f).is_absolute() {
                Err(Error::format(
                    index_path,
                    format!("shard name `{f}` leaves the model directory"),
                ))
            } else {
                Ok(dir.join(f))
            }
        })
        .collect()
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::format(
                path,
                format!("{len} bytes is too short for a safetensors header"),
            ));
        }
        // SAFETY: the mapping is read-only; ferrogen assumes model files are not modified while
        // open (as every mmap-based loader does).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // read_metadata validates the header: offsets contiguous, sizes = dtype x shape,
        // and header + data = file length.
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            let reason = match e {
                SafeTensorError::MetadataIncompleteBuffer => {
                    "the header's tensors do not cover the file exactly: truncated or corrupt"
                        .to_string()
                }
                other => format!("bad safetensors header: {other}"),
            };
            Error::format(path, reason)
        })?;
        // a type ferrogen cannot read is named with its tensor now, not taken for a gap later
        let mut tensors: Vec<_> = metadata.tensors().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some((name, info)) = tensors.iter().find(|(_, i)| dtype_of(i.dtype).is_none()) {
            return Err(Error::UnsupportedDType {
                path: path.to_path_buf(),
                name: name.clone(),
                dtype: format!("{:?}", info.dtype),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            data_start: 8 + header_len,
            metadata,
        })
    }
}

fn dtype_of(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl WeightSource for SafetensorsWeights {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        let shard = &self.shards[*self.index.get(name)?];
        let info = shard.metadata.info(name)?;
        // A tensor of an unsupported type has no info; reading it names the type.
        Some(TensorInfo {
            dtype: dtype_of(info.dtype)?,
            shape: info.shape.clone(),
        })
    }

    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let missing = || Error::MissingTensor {
            path: self.dir.clone(),
            name: name.to_string(),
        };
        let shard = &self.shards[*self.index.get(name).ok_or_else(missing)?];
        let info = shard.metadata.info(name).ok_or_else(missing)?;
        if dtype_of(info.dtype).is_none() {
            return Err(Error::UnsupportedDType {
                path: shard.path.clone(),
                name: name.to_string(),
                dtype: format!("{:?}", info.dtype),
            });
        }
        let (start, end) = info.data_offsets;
        // In bounds: read_metadata checked that the offsets tile the data section exactly.
        Ok(Cow::Borrowed(
            &shard.map[shard.data_start + start..shard.data_start + end],
        ))
    }

    fn release(&self, name: &str) {
        let Some(shard) = self.index.get(name).map(|&i| &self.shards[i]) else {
            return;
        };
        if let Some(info) = shard.metadata.info(name) {
            let (start, end) = info.data_offsets;
            crate::model::weights::drop_pages(&shard.map, shard.data_start + start, end - start);
        }
    }
}
