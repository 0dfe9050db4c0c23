//! Seeded random weights of a model's real shapes (FlexGen benchmarks with dummy weights too):
//! for benchmarks and tests of models that are not on this machine. Rows are generated on
//! demand, so a multi-gigabyte model costs no memory until its rows are read.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::f16;

use super::{ModelConfig, ModelFiles};
use crate::error::{Error, Result};
use crate::model::{DType, TensorInfo, TensorSpec, WeightSource};

/// Every tensor of `config` (named as transformers saves them).
pub fn tensor_specs(config: &ModelConfig) -> Vec<TensorSpec> {
    config.parts(None).tensors()
}

/// f16 weights drawn uniformly from `[-a, a]` with `a = 1 / sqrt(fan_in)` (norm weights near
/// 1), each row from its own stream seeded by `(seed, tensor, row)`.
pub struct RandomWeights {
    path: PathBuf,
    seed: u64,
    tensors: BTreeMap<String, Vec<usize>>,
}

impl RandomWeights {
    /// Random weights for every tensor of `config`.
    pub fn new(config: &ModelConfig, seed: u64) -> Self {
        Self {
            path: PathBuf::from(format!("random-weights-seed-{seed}")),
            seed,
            tensors: tensor_specs(config)
                .into_iter()
                .map(|t| (t.name, t.shape))
                .collect(),
        }
    }

    /// A [`ModelFiles`] of random weights for `config`, without a tokenizer.
    pub fn model_files(config: &ModelConfig, seed: u64) -> ModelFiles {
        let weights = Self::new(config, seed);
        ModelFiles {
            path: weights.path.clone(),
            config: config.clone(),
            weights: Box::new(weights),
            tokenizer: Err("random weights have no tokenizer; give records as tokens".into()),
            chat_template: Err("random weights have no chat template".into()),
        }
    }

    fn rows(&self, name: &str, shape: &[usize], rows: std::ops::Range<usize>) -> Vec<u8> {
        let per_row: usize = shape.iter().skip(1).product();
        let fan_in = if shape.len() > 1 { per_row } else { 1 };
        let is_norm_weight = shape.len() == 1 && name.contains("norm") && name.ends_with("weight");
        let a = 1.0 / (fan_in as f32).sqrt();
        let tensor_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut out = Vec::with_capacity(rows.len() * per_row.max(1) * 2);
        for r in rows {
            // splitmix64 stream per row
            let mut state =
                self.seed ^ tensor_hash ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for _ in 0..per_row.max(1) {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                let u = (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0; // [-1, 1)
                let v = if is_norm_weight { 1.0 + 0.1 * u } else { a * u };
                out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        out
    }

    fn shape(&self, name: &str) -> Result<&Vec<usize>> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }
}

impl WeightSource for RandomWeights {
    fn path(&self) -> &Path {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.tensors.get(name).map(|shape| TensorInfo {
            dtype: DType::F16,
            shape: shape.clone(),
        })
    }
    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let shape = self.shape(name)?;
        let rows = shape.first().copied().unwrap_or(1);
        Ok(Cow::Owned(self.rows(name, shape, 0..rows)))
    }
    fn row_bytes(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Cow<'_, [u8]>> {
        let shape = self.shape(name)?;
        if rows.end > shape.first().copied().unwrap_or(1) || rows.start > rows.end {
            return Err(Error::invalid(name, format!("rows {rows:?} out of range")));
        }
        Ok(Cow::Owned(self.rows(name, shape, rows)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::builtin::builtin_config;

    #[test]
    fn rows_agree_with_whole_tensors_and_are_seeded() {
        let config = builtin_config("opt-1.3b").unwrap();
        let w = RandomWeights::new(&config, 7);
        let name = "model.decoder.layers.3.fc1.weight";
        assert_eq!(w.info(name).unwrap().shape, vec![8192, 2048]);
        let part = w.row_bytes(name, 100..102).unwrap();
        let again = RandomWeights::new(&config, 7)
            .row_bytes(name, 101..102)
            .unwrap()
            .into_owned();
        assert_eq!(&part[2048 * 2..], &again[..]);
        let other = RandomWeights::new(&config, 8)
            .row_bytes(name, 101..102)
            .unwrap()
            .into_owned();
        assert_ne!(&again[..], &other[..]);
        let v = crate::model::weights::decode_to_f32(DType::F16, &part, 2 * 2048).unwrap();
        let bound = 1.0 / (2048f32).sqrt() + 1e-3;
        assert!(v.iter().all(|x| x.abs() <= bound));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.01);
        // a 1.3B model's tensors, none generated yet
        assert!(tensor_specs(&config).len() > 190);
    }
}
