//! FlexGen's cost model, generalized to every architecture (a [`ModelShape`]), to fp16 or 4-bit weights and
//! cache, to activations split across tiers, and to CPU attention delegation.
//!
//! Every time term and memory peak is a [`Linear`] form over the nine placement fractions
//! `x = [wg, wc, wn, cg, cc, cn, hg, hc, hn]` (weights, KV cache and activations on GPU, CPU,
//! disk). The same forms are evaluated for a given [`Policy`] ([`CostModel::predict`]) and handed
//! to the LP ([`crate::policy::search()`]), so the formulas exist once.
//!
//! Notation (per decoder layer): `l` layers, `s` prompt length, `n` generated tokens,
//! `bls = gbs * nb` sequences per block, `c = s + n/2` the average decode context,
//! `Bw` weight bytes, `Bkv` KV bytes per token (keys and values), `Bh` activation bytes per token,
//! `Flin` linear-layer FLOPs per token, `Fatt` attention FLOPs per token per context position.
//! The embedding and output head are spread over the layers (`Bw += head/l`, `Flin += 2*V*d/l`),
//! which keeps every term per-layer and linear. Overlapped, a layer costs
//! `max(ctog + dtoc, gtoc + ctod, comp)` (FlexGen's code); without overlap, the sum of the terms.
//! `T = l * Tpre + l * (n - 1) * Tgen`, and throughput is `bls * n / T` generated tokens per second.

use serde::Serialize;

pub use super::forms::{x, Linear};
use super::hardware::{HardwareProfile, GIB};
use super::policy::{Policy, QuantConfig};
pub use super::shape::ModelShape;
use crate::layout::CACHE_MERGE_GAP_BYTES;

/// Prompt and generation lengths of a job.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Workload {
    /// Prompt tokens per sequence (`s`).
    pub prompt_len: usize,
    /// Generated tokens per sequence (`n`).
    pub gen_len: usize,
}

/// Seconds per layer of each term of one phase (prefill or one decode step).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct PhaseTimes {
    /// CPU -> GPU transfers.
    pub ctog: f64,
    /// GPU -> CPU transfers.
    pub gtoc: f64,
    /// Disk -> CPU reads.
    pub dtoc: f64,
    /// CPU -> disk writes.
    pub ctod: f64,
    /// Compute (GPU matrix products, attention on GPU or CPU, dequantization).
    pub comp: f64,
    /// The layer's time: overlapped `max(ctog + dtoc, gtoc + ctod, comp)`, else the sum.
    pub layer: f64,
}

/// The cost model's forms for one phase.
#[derive(Debug, Clone, Copy)]
pub struct PhaseTerms {
    /// CPU -> GPU seconds per layer.
    pub ctog: Linear,
    /// GPU -> CPU seconds per layer.
    pub gtoc: Linear,
    /// Disk -> CPU seconds per layer.
    pub dtoc: Linear,
    /// CPU -> disk seconds per layer.
    pub ctod: Linear,
    /// Compute seconds per layer.
    pub comp: Linear,
}

impl PhaseTerms {
    /// The forms whose maximum is the layer time when I/O overlaps compute.
    pub fn overlapped(&self) -> [Linear; 3] {
        [self.ctog + self.dtoc, self.gtoc + self.ctod, self.comp]
    }

    fn times(&self, x: &[f64; x::COUNT], overlap: bool) -> PhaseTimes {
        let e = |l: &Linear| l.eval(x);
        let (ctog, gtoc, dtoc, ctod, comp) = (
            e(&self.ctog),
            e(&self.gtoc),
            e(&self.dtoc),
            e(&self.ctod),
            e(&self.comp),
        );
        let layer = if overlap {
            (ctog + dtoc).max(gtoc + ctod).max(comp)
        } else {
            ctog + gtoc + dtoc + ctod + comp
        };
        PhaseTimes {
            ctog,
            gtoc,
            dtoc,
            ctod,
            comp,
            layer,
        }
    }
}

/// Everything that does not vary with placement: batch sizes and flags.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batching {
    /// Sequences per GPU batch.
    pub gpu_batch_size: usize,
    /// GPU batches per block.
    pub num_gpu_batches: usize,
    /// Decode attention on the CPU for the CPU/disk part of the cache.
    pub cpu_cache_compute: bool,
    /// 4-bit weights.
    pub compress_weight: bool,
    /// 4-bit KV cache.
    pub compress_cache: bool,
    /// f16 KV cache.
    pub f16_cache: bool,
    /// The 4-bit format.
    pub quant: QuantConfig,
    /// Fraction of attention computed.
    pub attn_sparsity: f64,
    /// Attention and MLP are separate units (each loads its weights apart).
    pub sep_layer: bool,
}

impl Batching {
    /// The batching part of a policy.
    pub fn of(p: &Policy) -> Self {
        Self {
            gpu_batch_size: p.gpu_batch_size,
            num_gpu_batches: p.num_gpu_batches,
            cpu_cache_compute: p.cpu_cache_compute,
            compress_weight: p.compress_weight,
            compress_cache: p.compress_cache,
            f16_cache: p.f16_cache,
            quant: p.quant,
            attn_sparsity: p.attn_sparsity,
            sep_layer: p.sep_layer,
        }
    }
}

/// The bytes, rows and FLOPs per layer that [`CostModel::terms`] builds its forms from (the
/// symbols of the formulas beside each term).
#[derive(Clone, Copy)]
struct Quantities {
    /// Prompt length s and tokens computed per sequence n.
    s: f64,
    n: f64,
    /// Layers l.
    l: f64,
    /// Sequences per GPU batch, GPU batches per block, sequences per block (bls = gbs nb).
    gbs: f64,
    nb: f64,
    bls: f64,
    /// The average decode context c = s + n / 2.
    c: f64,
    /// Bytes per activation value.
    act: f64,
    /// Bytes per weight value, weight values per layer (the head spread over the layers), and
    /// Bw: one layer's weight bytes.
    w_bytes: f64,
    w_values: f64,
    bw_layer: f64,
    /// Cached values per token per layer (keys and values), and Bkv: their bytes.
    kv_values: f64,
    bkv: f64,
    /// Cache rows a disk sequence reads per decode step, and writes in prefill and decode.
    disk_read: f64,
    disk_write: [f64; 2],
    /// Bh: one token's hidden row.
    bh: f64,
    /// FLOPs per token of the linear layers and of attention (per context token).
    flin: f64,
    fatt: f64,
    /// Weight values the device decodes per second.
    dequant_rate: f64,
}

/// The memory peaks of [`Terms`].
struct Peaks {
    gpu: [Linear; 2],
    working_cache: [f64; 2],
    cpu: [Linear; 2],
    disk: Linear,
}

/// All forms for one [`Batching`]: time terms per phase and memory peaks per tier (bytes).
#[derive(Debug, Clone, Copy)]
pub struct Terms {
    /// Prefill, per layer.
    pub prefill: PhaseTerms,
    /// One decode step, per layer.
    pub decode: PhaseTerms,
    /// GPU bytes at the prefill and decode peaks, without [`Terms::working_cache`].
    pub gpu_peak: [Linear; 2],
    /// GPU bytes of the working copies of layer caches at the prefill and decode peaks: held
    /// only when some of the cache lives off the GPU (`cg < 1`), so a constant the LP cannot
    /// express as a share; see [`Terms::gpu_peaks`].
    pub working_cache: [f64; 2],
    /// CPU bytes at the prefill and decode peaks.
    pub cpu_peak: [Linear; 2],
    /// Disk bytes.
    pub disk: Linear,
}

impl Terms {
    /// GPU bytes at the prefill and decode peaks for a placement whose cache is all on the
    /// GPU (`cache_on_gpu`: nothing to copy in and out) or not (the working copies added).
    pub fn gpu_peaks(&self, cache_on_gpu: bool) -> [Linear; 2] {
        if cache_on_gpu {
            self.gpu_peak
        } else {
            [0, 1].map(|i| self.gpu_peak[i] + Linear::constant(self.working_cache[i]))
        }
    }
}

/// A policy's predicted performance, with the per-term breakdown and peak bytes per tier.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// Generated tokens per second over the whole job (`bls * n / T`).
    pub throughput_tok_s: f64,
    /// Total prefill seconds (`l * Tpre`).
    pub prefill_s: f64,
    /// Total decode seconds (`l * (n - 1) * Tgen`).
    pub decode_s: f64,
    /// Per-layer prefill terms.
    pub prefill: PhaseTimes,
    /// Per-layer terms of one decode step.
    pub decode: PhaseTimes,
    /// Peak GPU bytes.
    pub gpu_peak_bytes: f64,
    /// Peak CPU bytes.
    pub cpu_peak_bytes: f64,
    /// Disk bytes.
    pub disk_bytes: f64,
}

/// The cost model of one model on one machine for one workload.
#[derive(Debug, Clone)]
pub struct CostModel {
    /// Model sizes.
    pub shape: ModelShape,
    /// Machine.
    pub hardware: HardwareProfile,
    /// Prompt and generation lengths.
    pub workload: Workload,
    /// Bytes per weight value as the executor holds uncompressed weights (GGUF blocks as
    /// stored, 2 for f16 files, 4 for f32 and bf16); `None` counts FlexGen's fp16.
    pub weight_bytes: Option<f64>,
    /// Bytes per activation value (and uncompressed cache value) as the executor holds them
    /// (4: ferrogen computes in f32); `None` counts FlexGen's fp16.
    pub activation_bytes: Option<f64>,
    /// Rows of a batch the executor computes at once (longer prompts run in row chunks with
    /// online-softmax attention, which holds no score matrix); `None` counts FlexGen's working
    /// set, a whole batch with its `heads x s x s` attention scores.
    pub compute_rows: Option<usize>,
    /// The compute device works in host RAM (the CPU device): its tier and the CPU's are one
    /// memory, so their peaks add up on the device tier, and disk pieces are read straight
    /// into the device's weight slots (no extra layer staged in RAM).
    pub host_device: bool,
    /// The executor's own weights outside the layers, when known: the output projection as
    /// it places it (split over the tiers like the layers) and the embedding table it reads
    /// lookups from (its GPU share held in RAM); `None` counts FlexGen's embeddings at the
    /// weights' bytes per value, spread over the layers.
    pub head_bytes: Option<HeadBytes>,
    /// Bytes of the logits held at once (`rows * logit_width * 4`), beside the working set.
    pub logit_bytes: f64,
    /// Bytes of I/O staging buffers held in RAM whatever the policy.
    pub staging_bytes: f64,
    /// Bytes per value of 4-bit weights as the executor lays them out (each row padded to
    /// whole groups); `None` counts FlexGen's groups of the policy's size.
    pub compressed_weight_bytes: Option<f64>,
    /// Bytes per cached token of one layer as the executor stores the cache in each format;
    /// `None` counts keys and values at the bytes per value of the format.
    pub cache_row_bytes: Option<CacheRowBytes>,
}

/// Bytes per cached token of one layer, keys and values, in each cache format (rows padded
/// to whole words and groups, as the executor stores them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheRowBytes {
    /// f32 keys and values (as the activations).
    pub f32: f64,
    /// f16 keys and values.
    pub f16: f64,
    /// 4-bit groups, codes and scales.
    pub q4: f64,
}

/// The bytes of the weights outside the layers, as the executor holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadBytes {
    /// The output projection (or lm_head) and OPT's `project_in`/`project_out`, placed across
    /// the tiers like a layer.
    pub output: f64,
    /// The embedding table for lookups: its GPU and CPU shares in RAM, the rest on disk.
    pub table: f64,
}

/// Bytes per activation or uncompressed weight/cache value (fp16, as FlexGen runs).
const FP16: f64 = 2.0;

impl CostModel {
    /// A cost model for a model of `shape` (`ModelConfig::shape`) on `hardware` running
    /// `workload`.
    pub fn new(shape: ModelShape, hardware: HardwareProfile, workload: Workload) -> Self {
        Self {
            shape,
            hardware,
            workload,
            weight_bytes: None,
            activation_bytes: None,
            compute_rows: None,
            host_device: false,
            head_bytes: None,
            logit_bytes: 0.0,
            staging_bytes: 0.0,
            compressed_weight_bytes: None,
            cache_row_bytes: None,
        }
    }

    /// The same model with 4-bit weights at `compressed_weight_bytes` per value and cache
    /// rows of `cache_row_bytes` (see [`CostModel::compressed_weight_bytes`] and
    /// [`CostModel::cache_row_bytes`]).
    pub fn with_executor_layouts(
        mut self,
        compressed_weight_bytes: f64,
        cache_row_bytes: CacheRowBytes,
    ) -> Self {
        self.compressed_weight_bytes = Some(compressed_weight_bytes);
        self.cache_row_bytes = Some(cache_row_bytes);
        self
    }

    /// The same model with the executor's output projection and embedding table (see
    /// [`CostModel::head_bytes`]; its norms, biases and position table resident in f32),
    /// `logit_bytes` of logits beside the working set, and `staging_bytes` of I/O staging
    /// buffers in RAM.
    pub fn with_executor_bytes(
        mut self,
        head: HeadBytes,
        logit_bytes: f64,
        staging_bytes: f64,
    ) -> Self {
        self.head_bytes = Some(head);
        self.logit_bytes = logit_bytes;
        self.staging_bytes = staging_bytes;
        self
    }

    /// The same model on a device that computes in host RAM (see
    /// [`CostModel::host_device`]); give it a profile from
    /// [`HardwareProfile::for_host_device`], with all of RAM as its GPU capacity.
    pub fn on_host_device(mut self) -> Self {
        self.host_device = true;
        self
    }

    /// The same model with the executor's working set: at most `rows` rows computed at once
    /// (see [`CostModel::compute_rows`]).
    pub fn with_compute_rows(mut self, rows: usize) -> Self {
        self.compute_rows = Some(rows.max(1));
        self
    }

    /// The same model with activations and uncompressed cache values counted at `bytes` each
    /// (see [`CostModel::activation_bytes`]).
    pub fn with_activation_bytes(mut self, bytes: f64) -> Self {
        self.activation_bytes = Some(bytes);
        self
    }

    /// The same model with uncompressed weights counted at `bytes` per value (see
    /// [`CostModel::weight_bytes`]).
    pub fn with_weight_bytes(mut self, bytes: f64) -> Self {
        self.weight_bytes = Some(bytes);
        self
    }

    /// The linear forms of every term and peak for one batching choice.
    pub fn terms(&self, b: &Batching) -> Terms {
        let q = self.quantities(b);
        let (prefill, decode) = self.phase_terms(b, &q);
        let peaks = self.peaks(b, &q);
        Terms {
            prefill,
            decode,
            gpu_peak: peaks.gpu,
            working_cache: peaks.working_cache,
            cpu_peak: peaks.cpu,
            disk: peaks.disk,
        }
    }

    /// The bytes and FLOPs per layer that every term is built from, for one batching.
    fn quantities(&self, b: &Batching) -> Quantities {
        let m = &self.shape;
        let hw = &self.hardware;
        let (s, n) = (
            self.workload.prompt_len as f64,
            self.workload.gen_len as f64,
        );
        let l = m.layers as f64;
        let (gbs, nb) = (b.gpu_batch_size as f64, b.num_gpu_batches as f64);
        // Bytes: weights and cache in fp16 (or the executor's sizes when given) or 4-bit
        // groups; activations in fp16 (or the executor's size).
        let act = self.activation_bytes.unwrap_or(FP16);
        let value_bytes = |compressed: bool| {
            if compressed {
                b.quant.bytes_per_value()
            } else {
                act
            }
        };
        // Bw: uncompressed weights at the executor's bytes per value when known
        let w_bytes = if b.compress_weight {
            self.compressed_weight_bytes
                .unwrap_or_else(|| b.quant.bytes_per_value())
        } else {
            self.weight_bytes.unwrap_or(FP16)
        };
        // per layer, the output head spread over the layers: Bw = layer + head / l (the
        // executor's output projection when known; its lookup table is counted apart)
        let w_values = m.layer_values + m.head_values / l;
        let bw_layer = match self.head_bytes {
            Some(head) => m.layer_values * w_bytes + head.output / l,
            None => w_values * w_bytes,
        };
        let kv_values = 2.0 * m.kv_width as f64; // keys and values, per token per layer
        let cache_value_bytes = if b.f16_cache && !b.compress_cache {
            FP16
        } else {
            value_bytes(b.compress_cache)
        };
        // Bkv = kv values * bytes per cached value (4-bit groups, f16: 2, else as activations),
        // or the executor's row as it stores it
        let bkv = match self.cache_row_bytes {
            Some(row) if b.compress_cache => row.q4,
            Some(row) if b.f16_cache => row.f16,
            Some(row) => row.f32,
            None => kv_values * cache_value_bytes,
        };
        // Disk rows moved per sequence: the executor reads a disk sequence's cached rows and
        // writes its new ones in one request per run of sequences whose rows between are at
        // most G = CACHE_MERGE_GAP_BYTES per cache segment (about Bkv / 2), and then moves the
        // rows between too (unused capacity), so each sequence moves its whole capacity s + n:
        // read = s + n if (s + n - c) Bkv / 2 <= G else c (at the average decode step),
        // write = s + n if (s + n - w) Bkv / 2 <= G else w, w = new rows (s prefill, 1 decode)
        let c = s + n / 2.0; // average decode context
        let merged = |gap_rows: f64| gap_rows * bkv / 2.0 <= CACHE_MERGE_GAP_BYTES as f64;
        let disk_rows = |rows: f64| if merged(s + n - rows) { s + n } else { rows };
        Quantities {
            s,
            n,
            l,
            gbs,
            nb,
            bls: gbs * nb,
            c,
            act,
            w_bytes,
            w_values,
            bw_layer,
            kv_values,
            bkv,
            disk_read: disk_rows(c),
            disk_write: [disk_rows(s), disk_rows(1.0)],
            bh: m.hidden as f64 * act, // Bh
            // Flin = 2 * matrix values (+ the output head spread over layers); Fatt = 4 * q_width
            flin: 2.0 * m.layer_values + 2.0 * m.head_macs / l,
            fatt: 4.0 * m.q_width as f64 * b.attn_sparsity,
            dequant_rate: hw.gpu_dequant_gvalues_s * 1e9,
        }
    }

    /// Seconds of one phase's linear layers, `tokens` rows per sequence, at `tflops`.
    fn matmul_seconds(&self, b: &Batching, q: &Quantities, tokens: f64, tflops: f64) -> f64 {
        let hw = &self.hardware;
        let (gbs, nb) = (q.gbs, q.nb);
        // Weight dequantization runs once per GPU batch per layer: nb * values / rate (4-bit
        // groups, and GGUF blocks, which the kernels decode the same way).
        let dequant_w = if b.compress_weight || q.w_bytes < FP16 {
            nb * q.w_values / q.dequant_rate
        } else {
            0.0
        };
        if !self.host_device {
            // Linear layers of one phase: each of the nb GPU batches multiplies `tokens` rows per
            // sequence, and reads the layer's weights from GPU memory at least once:
            // nb * max(gbs * tokens * Flin / mm, Bw / bw_gpu) + dequant
            return nb
                * (gbs * tokens * q.flin / (tflops * 1e12))
                    .max(q.bw_layer / (hw.gpu_memory_gib_s * GIB))
                + dequant_w;
        }
        // On the CPU device a GPU batch's gbs * tokens rows run in calls of at most R rows
        // (compute_rows), and every call of a layer's kernels also costs a fixed overhead (the
        // dozen calls' dispatch, measured with almost no data): nb * ceil(gbs tokens / R) *
        // overhead on top of the calls' own time
        let rows = gbs * tokens;
        let per_call = self.compute_rows.map_or(rows, |r| (r as f64).min(rows));
        let full = (rows / per_call).floor();
        let calls = nb
            * (full * self.host_call(q, per_call, tflops)
                + self.host_call(q, rows - full * per_call, tflops));
        calls + nb * (rows / per_call.max(1.0)).ceil() * hw.cpu_layer_overhead_s
    }

    /// Seconds of one call of `r` rows through a layer's linear weights on the CPU device. It
    /// either decodes every weight value into panels and runs the GEMM, values / dequant +
    /// r Flin / mm (r at least the device's GEMM threshold: 6 rows for f32, 24 for packed
    /// formats), or streams the weight once per 4 rows of x through the fused kernel,
    /// ceil(r / 4) Bw / bw_decode (fewer rows).
    fn host_call(&self, q: &Quantities, r: f64, tflops: f64) -> f64 {
        use super::hardware::{FUSED_X_ROWS, GEMM_MIN_ROWS, PACKED_GEMM_MIN_ROWS};
        let packed = q.w_bytes < 4.0;
        let gemm_from = if packed {
            PACKED_GEMM_MIN_ROWS
        } else {
            GEMM_MIN_ROWS
        } as f64;
        if r <= 0.0 {
            return 0.0;
        }
        if r >= gemm_from {
            let panels = if packed {
                q.w_values / q.dequant_rate
            } else {
                0.0
            };
            return panels + r * q.flin / (tflops * 1e12);
        }
        // The few-rows path as calibrated for this format: a fixed cost per linear call (the
        // layer's calls, and the output head's spread over the layers) and the rows of x one
        // pass serves (the kernel's 4 when not measured):
        // calls * call_s + passes * Bw / bw_decode, passes = ceil(r / 4), or
        // max(1, r / rows_per_pass) when calibrated
        let measured = self.hardware.cpu_linear_for(q.w_bytes);
        let call_s = measured.map_or(0.0, |c| c.call_s);
        let rows_per_pass = measured.map_or(0.0, |c| c.rows_per_pass);
        let calls = self.shape.linear_calls as f64 + 1.0 / q.l;
        let passes = if rows_per_pass > 0.0 {
            (r / rows_per_pass).max(1.0)
        } else {
            (r / FUSED_X_ROWS as f64).ceil()
        };
        calls * call_s + passes * q.bw_layer / (self.hardware.gpu_memory_gib_s * GIB)
    }

    /// The I/O and compute terms of the prefill and of one decode step, per layer.
    fn phase_terms(&self, b: &Batching, q: &Quantities) -> (PhaseTerms, PhaseTerms) {
        use x::*;
        let hw = &self.hardware;
        let Quantities {
            s,
            c,
            bls,
            bw_layer,
            bkv,
            bh,
            fatt,
            kv_values,
            disk_read,
            disk_write,
            ..
        } = *q;
        let bw = |gib_s: f64| gib_s * GIB; // bytes per second
        let (ctog_bw, gtoc_bw, gtoc_cache_bw) = (
            bw(hw.cpu_to_gpu_gib_s),
            bw(hw.gpu_to_cpu_gib_s),
            bw(hw.gpu_to_cpu_cache_gib_s),
        );
        let (dtoc_bw, ctod_bw, ctod_cache_bw) = (
            bw(hw.disk_to_cpu_gib_s()),
            bw(hw.cpu_to_disk_gib_s),
            bw(hw.cpu_to_disk_cache_gib_s),
        );
        // Weights load from disk a unit at a time (attention and MLP apart with sep_layer): a
        // burst of one unit's bytes, Bw_unit = layer values * bytes per value / units, read at
        // the profile's rate for bursts of that size (the stream rate when not measured)
        let units = if b.sep_layer { 2.0 } else { 1.0 };
        let dtoc_w_bw = bw(hw.disk_burst_gib_s(self.shape.layer_values * q.w_bytes / units));
        let ccc = b.cpu_cache_compute;
        // The cache part attended on the GPU: all of it without delegation, else cg only.
        let gpu_cache: &[usize] = if ccc { &[CG] } else { &[CG, CC, CN] };
        let dequant_kv_per_value = if b.compress_cache {
            1.0 / q.dequant_rate
        } else {
            0.0
        };
        let prefill = PhaseTerms {
            // ctog = (Bw (wc + wn) + Bh s bls (hc + hn)) / bw_ctog
            ctog: Linear::of(bw_layer / ctog_bw, &[WC, WN])
                + Linear::of(bh * s * bls / ctog_bw, &[HC, HN]),
            // gtoc = Bkv s bls (cc + cn) / bw_gtoc_cache + Bh s bls (hc + hn) / bw_gtoc
            gtoc: Linear::of(bkv * s * bls / gtoc_cache_bw, &[CC, CN])
                + Linear::of(bh * s * bls / gtoc_bw, &[HC, HN]),
            // dtoc = Bw wn / bw_dtoc_w + Bh s bls hn / bw_dtoc (bw_dtoc_w: the weights' bursts)
            dtoc: Linear::of(bw_layer / dtoc_w_bw, &[WN])
                + Linear::of(bh * s * bls / dtoc_bw, &[HN]),
            // ctod = Bkv s' bls cn / bw_ctod_cache + Bh s bls hn / bw_ctod (s': disk rows
            // written per sequence, s or s + n)
            ctod: Linear::of(bkv * disk_write[0] * bls / ctod_cache_bw, &[CN])
                + Linear::of(bh * s * bls / ctod_bw, &[HN]),
            // comp = matmul(s) + bls s^2 Fatt / bmm_p
            // (FlexGen counts the full s x s attention square, and its fitted bmm rate assumes it)
            comp: Linear::constant(
                self.matmul_seconds(b, q, s, hw.gpu_matmul_tflops_prefill)
                    + bls * s * s * fatt / (hw.gpu_attention_tflops_prefill * 1e12),
            ),
        };
        let attn_gpu = bls * c * fatt / (hw.gpu_attention_tflops_decode * 1e12);
        let attn_cpu = bls * c * fatt / (hw.cpu_attention_tflops * 1e12);
        let decode = PhaseTerms {
            // ctog = (Bw (wc + wn) + Bh bls (hc + hn)) / bw_ctog
            //        [+ Bkv c bls (cc + cn) / bw_ctog without CPU attention: the cache moves]
            ctog: Linear::of(bw_layer / ctog_bw, &[WC, WN])
                + Linear::of(bh * bls / ctog_bw, &[HC, HN])
                + Linear::of(if ccc { 0.0 } else { bkv * c * bls / ctog_bw }, &[CC, CN]),
            // gtoc = Bh bls (hc + hn) / bw_gtoc + Bkv bls (cc + cn) / bw_gtoc_cache (new entries)
            gtoc: Linear::of(bh * bls / gtoc_bw, &[HC, HN])
                + Linear::of(bkv * bls / gtoc_cache_bw, &[CC, CN]),
            // dtoc = (Bkv c' bls cn + Bh bls hn) / bw_dtoc + Bw wn / bw_dtoc_w (c': disk rows
            // read per sequence, c or s + n)
            dtoc: Linear::of(bkv * disk_read * bls / dtoc_bw, &[CN])
                + Linear::of(bh * bls / dtoc_bw, &[HN])
                + Linear::of(bw_layer / dtoc_w_bw, &[WN]),
            // ctod = (Bkv w' bls cn + Bh bls hn) / bw_ctod (w': disk rows written per
            // sequence, 1 or s + n)
            ctod: Linear::of(bkv * disk_write[1] * bls / ctod_bw, &[CN])
                + Linear::of(bh * bls / ctod_bw, &[HN]),
            // comp = matmul(1) + bls c Fatt / bmm_g (GPU part of cache)
            //        + bls c Fatt / cpu (CPU part, with delegation) + cache dequantization
            comp: Linear::constant(self.matmul_seconds(b, q, 1.0, hw.gpu_matmul_tflops_decode))
                + Linear::of(attn_gpu, gpu_cache)
                + Linear::of(if ccc { attn_cpu } else { 0.0 }, &[CC, CN])
                + Linear::of(bls * c * kv_values * dequant_kv_per_value, gpu_cache),
        };
        (prefill, decode)
    }

    /// The memory peaks: GPU (prefill, decode), the working cache copies, CPU and disk.
    fn peaks(&self, b: &Batching, q: &Quantities) -> Peaks {
        use x::*;
        let m = &self.shape;
        let Quantities {
            s,
            n,
            l,
            gbs,
            nb,
            bls,
            act,
            bw_layer,
            bkv,
            bh,
            ..
        } = *q;
        let ccc = b.cpu_cache_compute;
        // Working set of one GPU batch (FlexGen, fp16): attention stage (input, q, k, v, scores)
        // or FFN stage (input, live FFN activations), whichever is larger.
        let (h, qw, kvw) = (m.hidden as f64, m.q_width as f64, m.kv_width as f64);
        let heads = m.heads as f64;
        let ffn_live = (m.ffn * m.ffn_live) as f64;
        let (work_prefill, work_decode) = match self.compute_rows {
            // ferrogen: rows computed at once, R = min(rows, max(chunk, gbs with CPU attention)),
            // each holding its input and output copies, the normalized input, q, k, v, the
            // attention output and projection, and the two FFN intermediates:
            // work = act * R * (8 h + 2 kv + 2 ffn)
            Some(chunk) => {
                let most = (chunk as f64).max(if ccc { gbs } else { 0.0 });
                let per_row = 8.0 * h + 2.0 * kvw + 2.0 * m.ffn as f64;
                (
                    act * (gbs * s).min(most) * per_row,
                    act * gbs.min(most) * per_row,
                )
            }
            None => (
                act * gbs * (s * (h + qw + 2.0 * kvw) + heads * s * s).max(s * (h + ffn_live)),
                act * gbs * (h + qw + 2.0 * kvw + heads * (s + n) + ffn_live),
            ),
        };
        let total_w = bw_layer * l;
        let cache_all = bkv * (s + n) * bls * l;
        // the lookup table: its GPU and CPU shares in RAM, its disk share on disk
        let table = self.head_bytes.map_or(0.0, |h| h.table);
        // the executor's resident small tensors (f32) and staging buffers
        let fixed_gpu = self.head_bytes.map_or(0.0, |_| 4.0 * m.resident_values);
        let fixed_cpu = self.staging_bytes;
        let streamed_w = Linear::of(2.0 * bw_layer, &[WC, WN]); // two layers in flight

        let gpu_prefill = Linear::of(total_w, &[WG])
            + Linear::of(bh * s * bls, &[HG])
            + Linear::of(cache_all, &[CG])
            + streamed_w
            + Linear::of(bh * s * gbs, &[HC, HN])
            + Linear::constant(work_prefill + self.logit_bytes + fixed_gpu);
        let gpu_decode = Linear::of(total_w, &[WG])
            + Linear::of(bh * bls, &[HG])
            + Linear::of(cache_all, &[CG])
            + streamed_w
            + Linear::of(bh * gbs, &[HC, HN])
            + Linear::constant(work_decode + self.logit_bytes + fixed_gpu);
        // When some of the cache is off the GPU, the executor computes a GPU batch's layer
        // against a working copy of its whole layer cache on the GPU, c = Bkv (s + n) gbs.
        // While one batch computes, the previous cache cell's copy is still being stored and
        // (decode) the next one's loaded, so at once: k c with k = 1 when scoring (one token:
        // nothing stored or loaded), else k = min(2, run) in prefill and min(3, run) in
        // decode, run = cache cells in a row in the schedule (nb with sep_layer, where MLP
        // cells come between layers; every layer without); k = 0 in decode with delegation.
        let working = bkv * (s + n) * gbs;
        let run = if b.sep_layer { nb } else { f64::INFINITY };
        let (k_prefill, k_decode) = if self.workload.gen_len <= 1 {
            (1.0, 0.0)
        } else {
            (run.min(2.0), if ccc { 0.0 } else { run.min(3.0) })
        };
        // disk weights staged through RAM on their way to the GPU (a host device reads them
        // straight into its weight slots)
        let staged_w = if self.host_device { 0.0 } else { bw_layer };
        let cpu_prefill = Linear::of(total_w, &[WC])
            + Linear::of(table, &[WG, WC])
            + Linear::constant(fixed_cpu)
            + Linear::of(bh * s * bls, &[HC])
            + Linear::of(cache_all, &[CC])
            + Linear::of(staged_w, &[WN])
            + Linear::of(bkv * s * gbs, &[CN])
            + Linear::of(bh * s * gbs, &[HN]);
        let cpu_decode = Linear::of(total_w, &[WC])
            + Linear::of(table, &[WG, WC])
            + Linear::constant(fixed_cpu)
            + Linear::of(bh * bls, &[HC])
            + Linear::of(cache_all, &[CC])
            + Linear::of(staged_w, &[WN])
            + Linear::of(bkv * (s + n) * gbs, &[CN])
            + Linear::of(bh * gbs, &[HN])
            // CPU attention scores of one batch, f32
            + Linear::constant(if ccc { 4.0 * gbs * heads * (s + n) } else { 0.0 });
        let disk = Linear::of(total_w, &[WN])
            + Linear::of(table, &[WN])
            + Linear::of(cache_all, &[CN])
            + Linear::of(bh * s * bls, &[HN]);
        let (gpu, cpu) = if self.host_device {
            // one memory: everything on the device tier, nothing left for a separate CPU tier
            let none = Linear::constant(0.0);
            (
                [gpu_prefill + cpu_prefill, gpu_decode + cpu_decode],
                [none, none],
            )
        } else {
            ([gpu_prefill, gpu_decode], [cpu_prefill, cpu_decode])
        };
        Peaks {
            gpu,
            working_cache: [k_prefill * working, k_decode * working],
            cpu,
            disk,
        }
    }

    /// Total seconds `T = l * Tpre + l * (n - 1) * Tgen` from per-layer times.
    pub fn total_seconds(&self, t_prefill: f64, t_decode: f64) -> (f64, f64) {
        let l = self.shape.layers as f64;
        let steps = self.workload.gen_len.saturating_sub(1) as f64;
        (l * t_prefill, l * steps * t_decode)
    }

    /// The prediction for a policy (whether or not it fits the profile's memory).
    pub fn predict(&self, policy: &Policy) -> Prediction {
        let (w, c, a) = (policy.weights(), policy.cache(), policy.activations());
        let xs = [
            w.gpu, w.cpu, w.disk, c.gpu, c.cpu, c.disk, a.gpu, a.cpu, a.disk,
        ];
        self.predict_at(&Batching::of(policy), &xs, policy.overlap)
    }

    /// The prediction at placement `xs` for one batching choice.
    pub fn predict_at(&self, b: &Batching, xs: &[f64; x::COUNT], overlap: bool) -> Prediction {
        let terms = self.terms(b);
        let prefill = terms.prefill.times(xs, overlap);
        let decode = terms.decode.times(xs, overlap);
        let (prefill_s, decode_s) = self.total_seconds(prefill.layer, decode.layer);
        let bls = (b.gpu_batch_size * b.num_gpu_batches) as f64;
        let peak = |p: &[Linear; 2]| p[0].eval(xs).max(p[1].eval(xs));
        Prediction {
            throughput_tok_s: bls * self.workload.gen_len as f64 / (prefill_s + decode_s),
            prefill_s,
            decode_s,
            prefill,
            decode,
            gpu_peak_bytes: peak(&terms.gpu_peaks(xs[x::CG] >= 1.0 - 1e-9)),
            cpu_peak_bytes: peak(&terms.cpu_peak),
            disk_bytes: terms.disk.eval(xs),
        }
    }
}

impl Prediction {
    /// A human-readable breakdown: totals, per-layer terms of both phases, peaks per tier.
    pub fn table(&self, hardware: &HardwareProfile) -> String {
        let gib = |b: f64| b / GIB;
        let row = |name: &str, t: &PhaseTimes| {
            format!(
                "{name:<8} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>10.4}\n",
                t.ctog, t.gtoc, t.dtoc, t.ctod, t.comp, t.layer
            )
        };
        let mut out = format!(
            "predicted throughput: {:.3} tokens/s (prefill {:.2} s + decode {:.2} s)\n\
             per layer, seconds:   ctog       gtoc       dtoc       ctod       comp      layer\n",
            self.throughput_tok_s, self.prefill_s, self.decode_s
        );
        out += &row("prefill", &self.prefill);
        out += &row("decode", &self.decode);
        out += &format!(
            "peak memory: GPU {:.2} / {:.2} GiB, CPU {:.2} / {:.2} GiB, disk {:.2} / {:.2} GiB\n",
            gib(self.gpu_peak_bytes),
            gib(hardware.gpu_memory.0 as f64),
            gib(self.cpu_peak_bytes),
            gib(hardware.cpu_memory.0 as f64),
            gib(self.disk_bytes),
            gib(hardware.disk_space.0 as f64),
        );
        out
    }
}
