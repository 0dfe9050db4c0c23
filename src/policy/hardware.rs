//! [`HardwareProfile`]: the bandwidths, compute rates and capacities the cost model runs on.
//!
//! Units: bandwidths in GiB/s (2^30 bytes per second, FlexGen's "GB"), compute in TFLOP/s
//! (10^12), capacities as sizes (`"15GiB"` or a byte count).

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bytes::parse_size;
use crate::error::{Error, Result};

// The CPU device's linear-kernel switch points (its few-rows kernels below, a GEMM from
// there on): hardware facts the device follows and the cost model prices.

/// Rows of `x` from which a linear layer of f32 weights runs a GEMM (below, one dot product
/// per weight row and row of `x`).
pub const GEMM_MIN_ROWS: usize = 6;

/// Rows of `x` from which a linear layer of packed weights decodes panels and runs a GEMM
/// (below, the fused kernel decodes each weight row once per 4 rows of `x` and multiplies as
/// it goes: measured faster up to about 24 rows, where the GEMM's share of the work grows).
pub const PACKED_GEMM_MIN_ROWS: usize = 24;

/// Rows of `x` that the fused kernel multiplies per pass over a weight row (more rows take
/// more passes over the same weight rows, which stay in the caches).
pub const FUSED_X_ROWS: usize = 4;

/// A byte count that TOML may give as `"15GiB"` or as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        // Exact: the largest binary unit that divides the count, else plain bytes.
        let v = self.0;
        let text = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")]
            .iter()
            .find(|(shift, _)| v != 0 && v.is_multiple_of(1u64 << shift))
            .map_or_else(
                || v.to_string(),
                |(shift, unit)| format!("{}{unit}", v >> shift),
            );
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(v) => Ok(ByteSize(v)),
            Raw::Text(t) => parse_size(&t, "size")
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Measured disk-to-CPU read bandwidth for one read size and thread count (LLM in a Flash
/// models flash reads this way: throughput grows with chunk size and parallelism).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRead {
    /// Bytes per read request.
    pub chunk_bytes: u64,
    /// Concurrent reader threads.
    pub threads: usize,
    /// Measured GiB/s.
    pub gib_s: f64,
}

/// Disk -> CPU rate of reads issued in bursts of `burst_bytes`, as the executor loads one
/// unit's weights at a time (through staging, reads of the profile's `io_chunk_bytes` over its
/// `io_threads`; or, on the CPU device, the whole burst in one request). Short bursts run below a long stream's rate: the
/// first read's latency is not hidden and the device's read-ahead has nothing to follow.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurstRead {
    /// Bytes per burst.
    pub burst_bytes: u64,
    /// Measured GiB/s over whole bursts.
    pub gib_s: f64,
}

/// What the CPU device's linear kernels reach for one weight format (`calibrate` measures
/// them with the device's own kernels). A product with many rows of `x` decodes the weight
/// into panels once per call, then runs a GEMM: `values / panel rate + 2 rows values / GEMM
/// rate`; one with few rows streams the packed bytes (`bytes / decode bandwidth`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuLinear {
    /// Bytes per weight value in the run-time layout: 4 (f32), 2.06 (f16 codes), 1.125 (Q8_0),
    /// 0.625 (4-bit codes in groups of 32), 0.5625 (FlexGen 4-bit, groups of 64).
    pub bytes_per_value: f64,
    /// The GEMM on decoded panels, TFLOP/s.
    pub gemm_tflops: f64,
    /// Weight values decoded (and packed for the GEMM) per second, in billions, once per call.
    pub panel_gvalues_s: f64,
    /// One row of `x` (decode-and-multiply, bandwidth-bound): weight bytes read per second,
    /// in GiB/s (beyond the call's fixed cost).
    pub decode_gib_s: f64,
    /// The few-rows path's fixed cost per call, in seconds: a call on `B` weight bytes takes
    /// `call_s + passes * B / decode rate` (0: not measured).
    #[serde(default)]
    pub call_s: f64,
    /// Rows of `x` one pass over the weight bytes serves on the few-rows path (0: not
    /// measured; the kernel's 4 rows are assumed).
    #[serde(default)]
    pub rows_per_pass: f64,
}

/// A machine as the cost model sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    /// What the profile describes.
    pub name: String,
    /// CPU -> GPU copy (weights, activations, and the KV cache when attention runs on the GPU).
    pub cpu_to_gpu_gib_s: f64,
    /// GPU -> CPU copy of activations.
    pub gpu_to_cpu_gib_s: f64,
    /// GPU -> CPU copy of KV-cache entries (strided, often slower).
    pub gpu_to_cpu_cache_gib_s: f64,
    /// CPU -> disk writes of activations and decode-time cache.
    pub cpu_to_disk_gib_s: f64,
    /// CPU -> disk writes of the prefill KV cache.
    pub cpu_to_disk_cache_gib_s: f64,
    /// Disk -> CPU read bandwidth by read size and thread count.
    pub disk_read: Vec<DiskRead>,
    /// Disk -> CPU rate of the executor's weight loads by burst size (empty: not measured;
    /// the stream rate [`HardwareProfile::disk_to_cpu_gib_s`] is used).
    #[serde(default)]
    pub disk_burst_read: Vec<BurstRead>,
    /// The same, each burst read in one request straight into its buffers, as the CPU device
    /// loads a unit's weights (empty: not measured; `disk_burst_read` is used).
    #[serde(default)]
    pub disk_direct_burst_read: Vec<BurstRead>,
    /// Read size the executor issues.
    pub io_chunk_bytes: u64,
    /// Reader threads the executor runs.
    pub io_threads: usize,
    /// GPU matrix products at prefill shapes.
    pub gpu_matmul_tflops_prefill: f64,
    /// GPU matrix products at decode shapes.
    pub gpu_matmul_tflops_decode: f64,
    /// GPU attention (batched products) at prefill.
    pub gpu_attention_tflops_prefill: f64,
    /// GPU attention at decode.
    pub gpu_attention_tflops_decode: f64,
    /// CPU attention over a CPU-resident KV cache (FlexGen's `cpu_flops`).
    pub cpu_attention_tflops: f64,
    /// CPU matrix products at prefill shapes (0: not measured).
    #[serde(default)]
    pub cpu_matmul_tflops_prefill: f64,
    /// CPU matrix products at decode shapes (0: not measured).
    #[serde(default)]
    pub cpu_matmul_tflops_decode: f64,
    /// The CPU device's linear kernels per weight format (empty: not measured).
    #[serde(default)]
    pub cpu_linear: Vec<CpuLinear>,
    /// The CPU device's fixed cost of one layer for one GPU batch, in seconds: its kernel
    /// calls with almost no data (0: not measured).
    #[serde(default)]
    pub cpu_layer_overhead_s: f64,
    /// GPU memory bandwidth: a matrix product reads its weights at least once per GPU batch.
    pub gpu_memory_gib_s: f64,
    /// Dequantization of 4-bit groups on the GPU, in billions of values per second.
    pub gpu_dequant_gvalues_s: f64,
    /// GPU memory the run may use.
    pub gpu_memory: ByteSize,
    /// CPU RAM the run may use.
    pub cpu_memory: ByteSize,
    /// Disk space the run may use.
    pub disk_space: ByteSize,
    /// Free-form provenance (how and when the figures were measured, their spread).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Bytes per GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

impl HardwareProfile {
    /// Reads and validates a profile TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let profile: Self = toml::from_str(&text)
            .map_err(|e| Error::config(path, format!("bad hardware profile: {e}")))?;
        profile.validate(path)?;
        Ok(profile)
    }

    /// The profile as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a profile always serializes")
    }

    /// Every rate must be positive and finite; there must be at least one disk-read row.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let rates = [
            ("cpu_to_gpu_gib_s", self.cpu_to_gpu_gib_s),
            ("gpu_to_cpu_gib_s", self.gpu_to_cpu_gib_s),
            ("gpu_to_cpu_cache_gib_s", self.gpu_to_cpu_cache_gib_s),
            ("cpu_to_disk_gib_s", self.cpu_to_disk_gib_s),
            ("cpu_to_disk_cache_gib_s", self.cpu_to_disk_cache_gib_s),
            ("gpu_matmul_tflops_prefill", self.gpu_matmul_tflops_prefill),
            ("gpu_matmul_tflops_decode", self.gpu_matmul_tflops_decode),
            (
                "gpu_attention_tflops_prefill",
                self.gpu_attention_tflops_prefill,
            ),
            (
                "gpu_attention_tflops_decode",
                self.gpu_attention_tflops_decode,
            ),
            ("cpu_attention_tflops", self.cpu_attention_tflops),
            ("gpu_memory_gib_s", self.gpu_memory_gib_s),
            ("gpu_dequant_gvalues_s", self.gpu_dequant_gvalues_s),
        ];
        for (name, v) in rates {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(
                    path,
                    format!("`{name}` = {v} must be positive"),
                ));
            }
        }
        if self.disk_read.is_empty() {
            return Err(Error::config(path, "`disk_read` needs at least one row"));
        }
        if let Some(row) = self
            .disk_read
            .iter()
            .find(|r| !(r.gib_s.is_finite() && r.gib_s > 0.0) || r.threads == 0)
        {
            return Err(Error::config(path, format!("bad disk_read row {row:?}")));
        }
        if let Some(row) = self
            .disk_burst_read
            .iter()
            .chain(&self.disk_direct_burst_read)
            .find(|r| !(r.gib_s.is_finite() && r.gib_s > 0.0) || r.burst_bytes == 0)
        {
            return Err(Error::config(
                path,
                format!("bad disk_burst_read row {row:?}"),
            ));
        }
        Ok(())
    }

    /// Disk -> CPU rate (GiB/s) of a weight load of `bytes` (one unit's streamed weights):
    /// interpolated in log(burst size) between the measured bursts, the nearest one's rate
    /// outside them, and the stream rate when no bursts were measured.
    pub fn disk_burst_gib_s(&self, bytes: f64) -> f64 {
        let mut rows = self.disk_burst_read.clone();
        rows.sort_by_key(|r| r.burst_bytes);
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return self.disk_to_cpu_gib_s();
        };
        if bytes <= first.burst_bytes as f64 {
            return first.gib_s;
        }
        if bytes >= last.burst_bytes as f64 {
            return last.gib_s;
        }
        let at = rows
            .windows(2)
            .find(|w| bytes <= w[1].burst_bytes as f64)
            .map_or((*first, *last), |w| (w[0], w[1]));
        // rate = a + (b - a) * ln(bytes / a_bytes) / ln(b_bytes / a_bytes)
        let (a, b) = at;
        let span = (b.burst_bytes as f64 / a.burst_bytes as f64).ln();
        let t = if span > 0.0 {
            (bytes / a.burst_bytes as f64).ln() / span
        } else {
            0.0
        };
        a.gib_s + (b.gib_s - a.gib_s) * t
    }

    /// Disk -> CPU bandwidth (GiB/s) for the executor's reads: the best measured row whose read
    /// size and thread count do not exceed `io_chunk_bytes` and `io_threads`; if none qualifies,
    /// the row with the smallest read size (the most conservative).
    pub fn disk_to_cpu_gib_s(&self) -> f64 {
        let usable = self
            .disk_read
            .iter()
            .filter(|r| r.chunk_bytes <= self.io_chunk_bytes && r.threads <= self.io_threads)
            .map(|r| r.gib_s)
            .fold(None, |best: Option<f64>, v| {
                Some(best.map_or(v, |b| b.max(v)))
            });
        usable.unwrap_or_else(|| {
            self.disk_read
                .iter()
                .min_by_key(|r| (r.chunk_bytes, r.threads))
                .map_or(f64::MIN_POSITIVE, |r| r.gib_s)
        })
    }

    /// The CPU device's measured rates for weights of `bytes_per_value` bytes per value: the
    /// format measured with the nearest size (`None` when none was measured).
    pub fn cpu_linear_for(&self, bytes_per_value: f64) -> Option<CpuLinear> {
        self.cpu_linear.iter().copied().min_by(|a, b| {
            let d = |r: &CpuLinear| (r.bytes_per_value / bytes_per_value).ln().abs();
            d(a).total_cmp(&d(b))
        })
    }

    /// The machine as the cost model sees it when the compute device is the CPU, for weights
    /// of `bytes_per_value` bytes per value: the device tier is RAM, so nothing is copied
    /// between host and device (the copy rates become effectively free); matrix products run
    /// at the CPU device's measured rates for that format ([`CpuLinear`]: the GEMM rate, the
    /// panel decoding as the dequantization rate, the packed-bytes bandwidth as the memory
    /// floor), and attention at the CPU's attention rate. Rates that were not measured keep
    /// the profile's GPU figures.
    pub fn for_host_device(mut self, bytes_per_value: f64) -> Self {
        const FREE_GIB_S: f64 = 1.0e4;
        self.cpu_to_gpu_gib_s = FREE_GIB_S;
        self.gpu_to_cpu_gib_s = FREE_GIB_S;
        self.gpu_to_cpu_cache_gib_s = FREE_GIB_S;
        // weights load straight from disk into the device's memory, a unit in one request
        if !self.disk_direct_burst_read.is_empty() {
            self.disk_burst_read = std::mem::take(&mut self.disk_direct_burst_read);
        }
        if let Some(rate) = self.cpu_linear_for(bytes_per_value) {
            // a GPU batch's product: panels decoded once per call (the cost model's
            // dequantization term), then the GEMM; few rows: the packed bytes streamed
            self.gpu_matmul_tflops_prefill = rate.gemm_tflops;
            self.gpu_matmul_tflops_decode = rate.gemm_tflops;
            self.gpu_memory_gib_s = rate.decode_gib_s;
            self.gpu_dequant_gvalues_s = rate.panel_gvalues_s;
        } else {
            if self.cpu_matmul_tflops_prefill > 0.0 {
                self.gpu_matmul_tflops_prefill = self.cpu_matmul_tflops_prefill;
            }
            if self.cpu_matmul_tflops_decode > 0.0 {
                self.gpu_matmul_tflops_decode = self.cpu_matmul_tflops_decode;
            }
        }
        self.gpu_attention_tflops_prefill = self.cpu_attention_tflops;
        self.gpu_attention_tflops_decode = self.cpu_attention_tflops;
        self
    }

    /// The same profile with other memory budgets (e.g. `--gpu-mem`, `--cpu-mem`).
    pub fn with_capacities(mut self, gpu: u64, cpu: u64, disk: u64) -> Self {
        self.gpu_memory = ByteSize(gpu);
        self.cpu_memory = ByteSize(cpu);
        self.disk_space = ByteSize(disk);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn t4() -> HardwareProfile {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/t4-flexgen.toml");
        HardwareProfile::from_toml_file(Path::new(path)).unwrap()
    }

    #[test]
    fn t4_profile_reads_and_round_trips() {
        let p = t4();
        assert_eq!(p.gpu_memory, ByteSize(15 << 30));
        assert!((p.disk_to_cpu_gib_s() - 0.473).abs() < 1e-12);
        let back: HardwareProfile = toml::from_str(&p.to_toml()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn sizes_serialize_exactly() {
        for v in [0u64, 1, 1023, 1 << 10, 1500 << 30, (1 << 30) + 1, 3 << 40] {
            let text =
                toml::to_string(&std::collections::BTreeMap::from([("v", ByteSize(v))])).unwrap();
            let back: std::collections::BTreeMap<String, ByteSize> = toml::from_str(&text).unwrap();
            assert_eq!(back["v"], ByteSize(v), "{text}");
        }
    }

    #[test]
    fn burst_rates_interpolate_in_log_size() {
        let mut p = t4();
        // not measured: the stream rate
        assert_eq!(p.disk_burst_gib_s(1e6), p.disk_to_cpu_gib_s());
        p.disk_burst_read = vec![
            BurstRead {
                burst_bytes: 4 << 20,
                gib_s: 1.0,
            },
            BurstRead {
                burst_bytes: 1 << 20,
                gib_s: 0.5,
            },
            BurstRead {
                burst_bytes: 16 << 20,
                gib_s: 1.2,
            },
        ];
        // outside the rows: the nearest one's rate
        assert_eq!(p.disk_burst_gib_s(1000.0), 0.5);
        assert_eq!(p.disk_burst_gib_s(1e9), 1.2);
        // at a row, and halfway in log size between 1 and 4 MiB (2 MiB)
        assert!((p.disk_burst_gib_s((4 << 20) as f64) - 1.0).abs() < 1e-12);
        assert!((p.disk_burst_gib_s((2 << 20) as f64) - 0.75).abs() < 1e-12);
        assert!((p.disk_burst_gib_s((8 << 20) as f64) - 1.1).abs() < 1e-12);
        let back: HardwareProfile = toml::from_str(&p.to_toml()).unwrap();
        assert_eq!(back, p);
        // the CPU device reads a unit in one request: its own rows when measured
        let one_request = BurstRead {
            burst_bytes: 1 << 20,
            gib_s: 1.6,
        };
        let mut direct = p.clone();
        direct.disk_direct_burst_read = vec![one_request];
        assert_eq!(
            direct.clone().for_host_device(0.625).disk_burst_gib_s(1e6),
            1.6
        );
        assert_eq!(p.clone().for_host_device(0.625).disk_burst_gib_s(1e6), 0.5);
        assert_eq!(
            direct.disk_burst_gib_s(1e6),
            0.5,
            "staged loads keep theirs"
        );
        direct.disk_direct_burst_read[0].gib_s = 0.0;
        assert!(direct.validate(Path::new("p.toml")).is_err());
        p.disk_burst_read[0].gib_s = f64::NAN;
        assert!(p.validate(Path::new("p.toml")).is_err());
    }

    #[test]
    fn host_device_rates_follow_the_weight_format() {
        let mut p = t4();
        p.cpu_attention_tflops = 0.02;
        let rate = |b: f64, t: f64, g: f64| CpuLinear {
            bytes_per_value: b,
            gemm_tflops: t,
            panel_gvalues_s: 1.5,
            decode_gib_s: g,
            call_s: 0.0,
            rows_per_pass: 0.0,
        };
        p.cpu_linear = vec![
            rate(4.0, 0.2, 10.0),
            rate(1.125, 0.18, 6.0),
            rate(0.625, 0.17, 4.0),
        ];
        // Q4_1 weights (0.625 B) take the 4-bit row; f16 (2.06 B) the nearest, Q8_0
        let q4 = p.clone().for_host_device(0.625);
        assert_eq!(
            (q4.gpu_matmul_tflops_prefill, q4.gpu_memory_gib_s),
            (0.17, 4.0)
        );
        assert_eq!(q4.gpu_matmul_tflops_decode, 0.17);
        assert_eq!(q4.gpu_attention_tflops_decode, 0.02);
        assert!(q4.cpu_to_gpu_gib_s > 1e3 && q4.gpu_dequant_gvalues_s == 1.5);
        assert_eq!(
            p.cpu_linear_for(2.0625).map(|r| r.bytes_per_value),
            Some(1.125)
        );
        // nothing measured: the ndarray figures, as before
        p.cpu_linear.clear();
        p.cpu_matmul_tflops_prefill = 0.25;
        assert_eq!(p.for_host_device(0.625).gpu_matmul_tflops_prefill, 0.25);
    }

    #[test]
    fn disk_rate_follows_the_executors_read_size() {
        let mut p = t4();
        p.disk_read = vec![
            DiskRead {
                chunk_bytes: 64 << 10,
                threads: 1,
                gib_s: 0.5,
            },
            DiskRead {
                chunk_bytes: 4 << 20,
                threads: 1,
                gib_s: 1.2,
            },
            DiskRead {
                chunk_bytes: 4 << 20,
                threads: 4,
                gib_s: 1.6,
            },
        ];
        p.io_chunk_bytes = 4 << 20;
        p.io_threads = 1;
        assert_eq!(p.disk_to_cpu_gib_s(), 1.2);
        p.io_threads = 8;
        assert_eq!(p.disk_to_cpu_gib_s(), 1.6);
        p.io_chunk_bytes = 4096;
        assert_eq!(p.disk_to_cpu_gib_s(), 0.5);
    }
}
