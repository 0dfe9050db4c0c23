//! [`Policy`]: where weights, KV cache and activations live, and how batches are formed
//! (FlexGen's Policy, field for field; percentages 0-100 per tier, disk gets the rest).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tier::TierSplit;

/// FlexGen's 4-bit group quantization settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantConfig {
    /// Bits per value (4).
    pub bits: u32,
    /// Values per group sharing one (scale, min) pair (64).
    pub group_size: u32,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            bits: 4,
            group_size: 64,
        }
    }
}

impl QuantConfig {
    /// Stored bytes per value: `bits / 8` plus an f16 scale and an f16 minimum per group.
    pub fn bytes_per_value(&self) -> f64 {
        f64::from(self.bits) / 8.0 + 4.0 / f64::from(self.group_size)
    }
}

/// A placement and batching policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Sequences per GPU batch (`gbs`).
    pub gpu_batch_size: usize,
    /// GPU batches per block (`nb`); a block is `gbs * nb` sequences.
    pub num_gpu_batches: usize,
    /// Percent of weights on the GPU.
    pub w_gpu_percent: f64,
    /// Percent of weights in CPU RAM (disk holds the rest).
    pub w_cpu_percent: f64,
    /// Percent of the KV cache on the GPU.
    pub cache_gpu_percent: f64,
    /// Percent of the KV cache in CPU RAM (disk holds the rest).
    pub cache_cpu_percent: f64,
    /// Percent of activations on the GPU.
    pub act_gpu_percent: f64,
    /// Percent of activations in CPU RAM (disk holds the rest).
    pub act_cpu_percent: f64,
    /// Overlap I/O with compute.
    #[serde(default = "yes")]
    pub overlap: bool,
    /// Schedule attention and MLP as separate layers.
    #[serde(default = "yes")]
    pub sep_layer: bool,
    /// Pin CPU weight buffers.
    #[serde(default = "yes")]
    pub pin_weight: bool,
    /// Decode attention runs on the CPU where the KV cache lives.
    #[serde(default)]
    pub cpu_cache_compute: bool,
    /// Fraction of attention kept (1.0 = dense).
    #[serde(default = "one")]
    pub attn_sparsity: f64,
    /// Weights in 4-bit groups.
    #[serde(default)]
    pub compress_weight: bool,
    /// KV cache in 4-bit groups.
    #[serde(default)]
    pub compress_cache: bool,
    /// KV cache in f16 (half the bytes of f32, values rounded to 11 significant bits; not
    /// with `compress_cache`).
    #[serde(default)]
    pub f16_cache: bool,
    /// The quantization format of both.
    #[serde(default)]
    pub quant: QuantConfig,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}

impl Policy {
    /// The policy on a device whose memory is host RAM: the GPU and CPU tiers are one, so
    /// the CPU shares of weights, cache and activations join the device's, and attention on
    /// the CPU is simply the device's attention.
    pub fn on_host(mut self) -> Self {
        self.w_gpu_percent += std::mem::take(&mut self.w_cpu_percent);
        self.cache_gpu_percent += std::mem::take(&mut self.cache_cpu_percent);
        self.act_gpu_percent += std::mem::take(&mut self.act_cpu_percent);
        self.cpu_cache_compute = false;
        self
    }

    /// The policy with its cache and activation splits as the executor places a block of
    /// `sequences` sequences: whole sequences per tier ([`TierSplit::whole`]).
    pub fn placed_for(mut self, sequences: usize) -> Self {
        let cache = self.cache().rounded_to(sequences);
        (self.cache_gpu_percent, self.cache_cpu_percent) = (cache.gpu * 100.0, cache.cpu * 100.0);
        let act = self.activations().rounded_to(sequences);
        (self.act_gpu_percent, self.act_cpu_percent) = (act.gpu * 100.0, act.cpu * 100.0);
        self
    }

    /// Everything on the GPU, one batch of `gpu_batch_size` sequences per block.
    pub fn all_on_gpu(gpu_batch_size: usize) -> Self {
        Self {
            gpu_batch_size,
            num_gpu_batches: 1,
            w_gpu_percent: 100.0,
            w_cpu_percent: 0.0,
            cache_gpu_percent: 100.0,
            cache_cpu_percent: 0.0,
            act_gpu_percent: 100.0,
            act_cpu_percent: 0.0,
            overlap: true,
            sep_layer: true,
            pin_weight: true,
            cpu_cache_compute: false,
            attn_sparsity: 1.0,
            compress_weight: false,
            compress_cache: false,
            f16_cache: false,
            quant: QuantConfig::default(),
        }
    }

    /// Sequences per block: `gpu_batch_size * num_gpu_batches`.
    pub fn block_size(&self) -> usize {
        self.gpu_batch_size * self.num_gpu_batches
    }

    /// Weight fractions per tier.
    pub fn weights(&self) -> TierSplit {
        TierSplit::from_percent(self.w_gpu_percent, self.w_cpu_percent)
    }

    /// KV-cache fractions per tier.
    pub fn cache(&self) -> TierSplit {
        TierSplit::from_percent(self.cache_gpu_percent, self.cache_cpu_percent)
    }

    /// Activation fractions per tier.
    pub fn activations(&self) -> TierSplit {
        TierSplit::from_percent(self.act_gpu_percent, self.act_cpu_percent)
    }

    /// Checks ranges and consistency; `source` names the file or flag in messages.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |reason: String| Err(Error::invalid(source, reason));
        for (kind, gpu, cpu) in [
            ("w", self.w_gpu_percent, self.w_cpu_percent),
            ("cache", self.cache_gpu_percent, self.cache_cpu_percent),
            ("act", self.act_gpu_percent, self.act_cpu_percent),
        ] {
            for (tier, v) in [("gpu", gpu), ("cpu", cpu)] {
                if !(0.0..=100.0).contains(&v) {
                    return bad(format!("{kind}_{tier}_percent = {v} is outside 0-100"));
                }
            }
            if gpu + cpu > 100.0 + 1e-9 {
                return bad(format!(
                    "{kind}_gpu_percent + {kind}_cpu_percent = {} exceeds 100",
                    gpu + cpu
                ));
            }
        }
        if self.gpu_batch_size == 0 || self.num_gpu_batches == 0 {
            return bad("gpu_batch_size and num_gpu_batches must be at least 1".into());
        }
        if !(self.attn_sparsity > 0.0 && self.attn_sparsity <= 1.0) {
            return bad(format!(
                "attn_sparsity = {} is outside (0, 1]",
                self.attn_sparsity
            ));
        }
        if self.quant.bits != 4 || self.quant.group_size == 0 {
            return bad("quant supports bits = 4 with a positive group_size".into());
        }
        if self.cpu_cache_compute && (self.compress_cache || self.f16_cache) {
            return bad(
                "cpu_cache_compute with compress_cache or f16_cache: CPU attention beside the \
                 device reads an f32 cache (FlexGen has the same limit); turn one of them off"
                    .into(),
            );
        }
        if self.compress_cache && self.f16_cache {
            return bad(
                "compress_cache and f16_cache both set: a KV cache has one format (4-bit groups \
                 or f16); turn one of them off"
                    .into(),
            );
        }
        if self.attn_sparsity < 1.0 {
            return Err(Error::NotBuilt {
                what: "sparse attention (attn_sparsity < 1)".into(),
            });
        }
        if self.cpu_cache_compute && self.cache_gpu_percent >= 100.0 {
            return bad(
                "cpu_cache_compute is set but the whole KV cache is on the GPU: \
                 move some of it to the CPU or unset the flag"
                    .into(),
            );
        }
        Ok(())
    }

    /// Reads and validates a policy TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let policy: Policy =
            toml::from_str(&text).map_err(|e| Error::config(path, format!("bad policy: {e}")))?;
        policy.validate(&path.display().to_string())?;
        Ok(policy)
    }

    /// The policy as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a policy always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn flexgen_opt30b() -> Policy {
        Policy {
            gpu_batch_size: 48,
            num_gpu_batches: 3,
            w_gpu_percent: 20.0,
            w_cpu_percent: 80.0,
            cache_gpu_percent: 0.0,
            cache_cpu_percent: 100.0,
            act_gpu_percent: 0.0,
            act_cpu_percent: 100.0,
            overlap: true,
            sep_layer: true,
            pin_weight: true,
            cpu_cache_compute: true,
            attn_sparsity: 1.0,
            compress_weight: false,
            compress_cache: false,
            f16_cache: false,
            quant: QuantConfig::default(),
        }
    }

    #[test]
    fn toml_and_json_round_trip() {
        let p = flexgen_opt30b();
        let back: Policy = toml::from_str(&p.to_toml()).unwrap();
        assert_eq!(back, p);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), p);
        assert_eq!(p.block_size(), 144);
        assert_eq!(p.weights().disk, 0.0);
        assert!((QuantConfig::default().bytes_per_value() - 0.5625).abs() < 1e-12);
    }

    #[test]
    fn validation_names_the_problem() {
        let mut p = flexgen_opt30b();
        p.w_cpu_percent = 90.0;
        let e = p.validate("p.toml").unwrap_err().to_string();
        assert!(e.contains("p.toml") && e.contains("exceeds 100"), "{e}");
        let mut p = flexgen_opt30b();
        p.cache_gpu_percent = -1.0;
        assert!(p.validate("x").is_err());
        let mut p = flexgen_opt30b();
        p.num_gpu_batches = 0;
        assert!(p.validate("x").is_err());
        let mut p = flexgen_opt30b();
        p.cache_gpu_percent = 100.0;
        p.cache_cpu_percent = 0.0;
        assert!(p
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("cpu_cache_compute"));
        assert!(toml::from_str::<Policy>("gpu_batch_size = 1\nbogus = 2").is_err());
    }
}
