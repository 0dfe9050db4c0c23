//! Compute devices: the seam between the model recipe and the hardware.
//!
//! A [`Device`] holds tensors, linear weights in their run-time layout, and KV caches, and runs
//! the handful of operations a transformer layer is made of. The model recipe
//! (`crate::arch::Runner`: embedding input, attention against a KV cache, MLP, head and
//! logits, per architecture) is written once over this trait, and the executor (`crate::exec`) drives
//! the units of the zig-zag schedule through it, on any device:
//!
//! - [`CpuDevice`]: native, on all cores, weights multiplied in their packed formats;
//! - [`crate::gpu::WgpuDevice`]: WebGPU (Vulkan, Metal, DX12; lavapipe without a GPU).
//!
//! Tensors are 2-d f32 `[rows, width]`; cloning one shares its storage, and operations that
//! say "in place" write through every clone (as a GPU buffer would).

pub mod cpu;

use std::ops::Range;

pub use cpu::CpuDevice;

use crate::error::{Error, Result};
use crate::layout::{HeadLayout, Q4Layout, RowFormat, RunOptions};

/// RoPE tables `[rows, inv_freq.len()]` for the given positions and inverse frequencies, in
/// f64 then rounded (exactly as the CPU reference): `angle_i = p * inv_freq_i`, with
/// `inv_freq_i = base^(-2i/d)` before any scaling (the architecture's [`rope_inv_freq`]).
pub fn rope_tables(positions: &[u32], inv_freq: &[f64]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in inv_freq {
            let angle = p as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// RoPE's unscaled inverse frequencies `inv_freq_i = base^(-2i/d)`, `i < d/2`.
pub fn rope_inv_freq(head_dim: usize, base: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| 1.0 / base.powf(2.0 * i as f64 / head_dim as f64))
        .collect()
}

/// Which device computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// A discrete or integrated GPU through WebGPU when there is one, else the CPU device.
    #[default]
    Auto,
    /// The native CPU device.
    Cpu,
    /// WebGPU, whatever adapter it finds (lavapipe included).
    Wgpu,
}

impl std::str::FromStr for DeviceKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            other => Err(Error::invalid(
                "--device",
                format!("`{other}`: expected auto, cpu or wgpu"),
            )),
        }
    }
}

/// How a KV cache row is stored: f32 or f16 keys and values, or FlexGen's 4-bit groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheFormat {
    /// `width` f32 values per row, keys and values.
    F32 {
        /// Values per row (`kv_heads * head_dim`).
        width: usize,
    },
    /// `width` f16 values per row, keys and values, two to a 32-bit word (a row of odd width
    /// ends with a half word of padding).
    F16 {
        /// Values per row (`kv_heads * head_dim`).
        width: usize,
    },
    /// 4-bit codes and scales per row, keys and values.
    Q4(Q4Layout),
}

impl CacheFormat {
    /// How the cache rows of a model with attention heads `heads` are stored under `options`
    /// (4-bit groups, f16 or f32).
    pub fn new(heads: HeadLayout, options: RunOptions) -> Self {
        let width = heads.kv_heads * heads.head_dim;
        if options.compress_cache {
            Self::Q4(Q4Layout::new(heads.kv_heads, heads.head_dim))
        } else if options.f16_cache {
            Self::F16 { width }
        } else {
            Self::F32 { width }
        }
    }

    /// Halves per row of an f16 cache `width` values wide: whole 32-bit words,
    /// `2 * ceil(width / 2)`.
    pub fn f16_stride(width: usize) -> usize {
        2 * width.div_ceil(2)
    }

    /// Bytes per cached token in each segment, in order: keys then values (codes and scales
    /// separately for 4-bit rows). A row range of a cache is the same range of each segment.
    pub fn segment_bytes(&self) -> Vec<u64> {
        match *self {
            CacheFormat::F32 { width } => vec![4 * width as u64; 2],
            CacheFormat::F16 { width } => vec![2 * Self::f16_stride(width) as u64; 2],
            CacheFormat::Q4(l) => {
                let (c, s) = (
                    (l.words_per_row() * 4) as u64,
                    (l.groups_per_row() * 4) as u64,
                );
                vec![c, s, c, s]
            }
        }
    }

    /// Bytes per cached token.
    pub fn row_bytes(&self) -> u64 {
        self.segment_bytes().iter().sum()
    }
}

/// Per-row data of a forward call, on the host: every new token of the batch, stacked.
#[derive(Debug, Clone, Default)]
pub struct HostRows {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Absolute positions.
    pub positions: Vec<u32>,
    /// Per row: its sequence's first cache row and the keys it sees.
    pub infos: Vec<RowInfo>,
    /// RoPE tables `[rows, head_dim / 2]` (Llama), from [`rope_tables`].
    pub rope: Option<(Vec<f32>, Vec<f32>)>,
    /// Attention scores `s` (already scaled) become `cap * tanh(s / cap)` before the softmax
    /// (Gemma 2's soft-capping); `None`: as they are.
    pub softcap: Option<f32>,
}

/// Where one query row's keys are: its sequence's rows `first + j` of the cache for `j` in
/// `0..visible`, except `skip_from..skip_to` (in a prefix group, the other members' branches:
/// [`crate::PrefixGroup`]). Its own key is row `first + visible - 1`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowInfo {
    /// The sequence's first cache row.
    pub first: u32,
    /// Keys up to and including this row's own: its row in the sequence + 1.
    pub visible: u32,
    /// The first key it does not see (equal to `skip_to` when it sees them all).
    pub skip_from: u32,
    /// The key after the last one it does not see.
    pub skip_to: u32,
}

impl RowInfo {
    /// A row that sees keys `0..visible` of its sequence, all of them.
    pub fn new(first: u32, visible: u32) -> Self {
        Self {
            first,
            visible,
            skip_from: 0,
            skip_to: 0,
        }
    }

    /// Whether the row sees key `j` (`j < visible`) of its sequence.
    pub fn sees(&self, j: u32) -> bool {
        j < self.skip_from || j >= self.skip_to
    }
}

/// One row's logits folded so far, a panel of the vocabulary at a time (an online
/// log-softmax): the running max, `sum_j e^(logit_j - max)` (rescaled when the max grows), the
/// target's logit once its panel is folded, and the argmax (the first of equal values).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitState {
    /// The largest logit so far.
    pub max: f32,
    /// `sum_j e^(logit_j - max)` over the columns folded so far.
    pub sum: f64,
    /// The target's logit (NaN until its column is folded).
    pub target: f32,
    /// `(index, logit)` of the largest logit so far, the first on ties.
    pub best: (u32, f32),
}

impl LogitState {
    /// Nothing folded yet.
    pub const EMPTY: Self = Self {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        target: f32::NAN,
        best: (0, f32::NEG_INFINITY),
    };

    /// Folds in the state of later columns: `max' = max(a, b)`,
    /// `sum' = sum_a e^(max_a - max') + sum_b e^(max_b - max')`; the argmax moves only to a
    /// strictly larger logit, so the first of equal values stays.
    pub fn merge(&mut self, later: &LogitState) {
        // a NaN logit makes the row's logprobs NaN (f32::max would drop it)
        let max = if later.max.is_nan() || later.max > self.max {
            later.max
        } else {
            self.max
        };
        if max.is_nan() {
            self.max = max;
            self.sum = f64::NAN;
        } else if max > f32::NEG_INFINITY {
            let scaled = |m: f32, s: f64| {
                if s == 0.0 {
                    0.0
                } else {
                    s * f64::from(m - max).exp()
                }
            };
            self.sum = scaled(self.max, self.sum) + scaled(later.max, later.sum);
            self.max = max;
        }
        if !later.target.is_nan() {
            self.target = later.target;
        }
        if later.best.1 > self.best.1 {
            self.best = later.best;
        }
    }

    /// Folds in the logits of columns `offset..offset + row.len()` (host code; devices may fold
    /// faster their own way).
    pub fn fold(&mut self, row: &[f32], offset: usize, target: Option<u32>) {
        let mut panel = LogitState::EMPTY;
        for (j, &v) in row.iter().enumerate() {
            if v > panel.best.1 {
                panel.best = ((offset + j) as u32, v);
            }
        }
        panel.max = panel.best.1;
        panel.sum = row.iter().map(|&v| f64::from(v - panel.max).exp()).sum();
        if let Some(t) = target.map(|t| t as usize) {
            if (offset..offset + row.len()).contains(&t) {
                panel.target = row[t - offset];
            }
        }
        self.merge(&panel);
    }

    /// `ln softmax[target] = logit_target - max - ln sum`.
    pub fn target_logprob(&self) -> f32 {
        (f64::from(self.target) - self.log_z()) as f32
    }

    /// The argmax and its logprob.
    pub fn greedy(&self) -> (u32, f32) {
        (self.best.0, (f64::from(self.best.1) - self.log_z()) as f32)
    }

    fn log_z(&self) -> f64 {
        f64::from(self.max) + self.sum.ln()
    }
}

/// A compute device: memory for tensors, weights and caches, and the operations of a layer.
pub trait Device: Clone + Send + Sync + 'static {
    /// A 2-d f32 tensor `[rows, width]` (clones share storage).
    type Tensor: Clone + Send + Sync;
    /// Rows of a linear weight in their run-time layout.
    type Part: Clone + Send + Sync;
    /// Raw device memory that weight bytes are written into.
    type Buffer: Clone + Send + Sync;
    /// One layer's keys and values for a set of sequences.
    type Cache: Send + Sync;
    /// Per-row data of a forward call, as the device reads it.
    type Rows: Send + Sync;

    /// The device in words (adapter, threads).
    fn describe(&self) -> String;
    /// Whether the device computes in host RAM (then GPU and CPU tiers are one memory).
    fn is_host(&self) -> bool;
    /// The largest single buffer (tensor, weight segment, cache segment) in bytes.
    fn max_buffer_bytes(&self) -> u64;

    /// Uploads `data` as `[rows, width]`.
    fn upload(&self, data: &[f32], rows: usize, width: usize) -> Result<Self::Tensor>;
    /// Uploads `data` as `[rows, width]`, taking it: a device in host memory keeps the
    /// vector itself, so a batch's rows are not held twice.
    fn upload_owned(&self, data: Vec<f32>, rows: usize, width: usize) -> Result<Self::Tensor> {
        self.upload(&data, rows, width)
    }
    /// A zeroed `[rows, width]`.
    fn zeros(&self, rows: usize, width: usize) -> Result<Self::Tensor>;
    /// `[rows, width]` of a tensor.
    fn dims(&self, t: &Self::Tensor) -> [usize; 2];
    /// The same storage seen as `[rows, width]` (as many elements), shared like a clone.
    fn reshape(&self, t: &Self::Tensor, rows: usize, width: usize) -> Result<Self::Tensor>;
    /// Rows `rows` of `t`, on the host.
    fn download(&self, t: &Self::Tensor, rows: Range<usize>) -> Result<Vec<f32>>;
    /// Writes host rows `data` into `t` from row `at`.
    fn write_rows(&self, t: &Self::Tensor, at: usize, data: &[f32]) -> Result<()>;
    /// Copies rows `rows` of `src` into `dst` from row `at` (same width).
    fn copy_rows(
        &self,
        src: &Self::Tensor,
        rows: Range<usize>,
        dst: &Self::Tensor,
        at: usize,
    ) -> Result<()>;

    /// `bytes` of device memory for weights.
    fn buffer(&self, bytes: u64) -> Result<Self::Buffer>;
    /// Writes `bytes` at `offset` of `buffer` (from any thread).
    fn write_buffer(&self, buffer: &Self::Buffer, offset: u64, bytes: &[u8]) -> Result<()>;
    /// Where `buffers` lie in host memory: runs `fill` on their bytes in place, each from a
    /// disk-block-aligned address with room up to a whole number of blocks (so one disk read
    /// lands in all of them without a staging copy), and returns true. Otherwise false, `fill`
    /// unrun.
    fn fill_host_buffers(
        &self,
        _buffers: &[&Self::Buffer],
        _fill: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Result<bool> {
        Ok(false)
    }
    /// `rows` rows of `format` held in `segments` (one buffer per segment of the format).
    fn part(
        &self,
        format: RowFormat,
        rows: usize,
        segments: Vec<Self::Buffer>,
    ) -> Result<Self::Part>;

    /// The device side of a forward call's rows.
    fn rows(&self, rows: &HostRows) -> Result<Self::Rows>;

    /// `x W^T` for `W [out, in]` held as row ranges `(part, first output column)`.
    fn linear(
        &self,
        x: &Self::Tensor,
        parts: &[(Self::Part, usize)],
        out: usize,
    ) -> Result<Self::Tensor>;
    /// In place: `y[r] += bias`.
    fn add_bias(&self, y: &Self::Tensor, bias: &Self::Tensor) -> Result<()>;
    /// RMSNorm of each row: `x / sqrt(mean(x^2) + eps) * w`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// LayerNorm of each row: `(x - mean) / sqrt(var + eps) * w + b`.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// In place: `x += y`.
    fn add(&self, x: &Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// In place: `gate = silu(gate) * up`.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<()>;
    /// In place: `gate = gelu_tanh(gate) * up` (GeGLU), with
    /// `gelu_tanh(g) = g / 2 * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 g^3)))`.
    fn gelu_tanh_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<()>;
    /// In place: `x *= s`.
    fn scale(&self, x: &Self::Tensor, s: f32) -> Result<()>;
    /// In place: `x = max(x, 0)`.
    fn relu(&self, x: &Self::Tensor) -> Result<()>;
    /// In place: rotary embedding (rotate-half) of every `head_dim`-wide head of `x`, with the
    /// rows' tables.
    fn rope(&self, x: &Self::Tensor, rows: &Self::Rows, head_dim: usize) -> Result<()>;
    /// Rows `ids` of `table`.
    fn gather(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor>;

    /// Folds the logits `x W^T` of output columns `cols` into one state per row of `x`:
    /// `parts` are row ranges of `W` with their absolute first column, covering exactly
    /// `cols`, and `targets` (absolute ids, one per row) say whose logit to keep; with
    /// `softcap`, each logit `l` counts as `cap * tanh(l / cap)` (Gemma 2). A device may
    /// compute the logits a panel at a time, holding at most [`Device::logit_width`] per row.
    #[allow(clippy::too_many_arguments)]
    fn fold_logits(
        &self,
        x: &Self::Tensor,
        parts: &[(Self::Part, usize)],
        cols: Range<usize>,
        targets: Option<&[u32]>,
        softcap: Option<f32>,
        states: &mut [LogitState],
    ) -> Result<()>;

    /// Logits per row that [`Device::fold_logits`] holds at once for `cols` output columns
    /// (the workspace it needs is `rows * logit_width * 4` bytes).
    fn logit_width(&self, cols: usize) -> usize {
        cols
    }

    /// An empty cache of `rows` rows.
    fn cache(&self, format: CacheFormat, rows: usize) -> Result<Self::Cache>;
    /// Appends new keys and values (`appends`: `(first new row, cache row, rows)`) and returns
    /// causal attention of the queries `q [rows, heads * d]`, each row seeing its infos' keys.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        cache: &Self::Cache,
        rows: &Self::Rows,
        appends: &[(usize, usize, usize)],
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        layout: HeadLayout,
    ) -> Result<Self::Tensor>;
    /// Copies cache rows `(first, count)` of every segment from `src` to the same rows of `dst`.
    fn copy_cache_rows(
        &self,
        src: &Self::Cache,
        dst: &Self::Cache,
        rows: &[(usize, usize)],
    ) -> Result<()>;
    /// Writes `bytes` at byte `offset` of a cache segment.
    fn write_cache(
        &self,
        cache: &Self::Cache,
        segment: usize,
        offset: u64,
        bytes: &[u8],
    ) -> Result<()>;
    /// Byte ranges `(segment, offset, len)` of a cache, on the host.
    fn read_cache(&self, cache: &Self::Cache, ranges: &[(usize, u64, u64)])
        -> Result<Vec<Vec<u8>>>;

    /// Blocks until the work submitted so far has finished.
    fn wait(&self) -> Result<()>;

    /// Runs `f`, the operations of one unit, where they start fastest: the CPU device runs it
    /// on one of its own threads, so that each operation's parallel work starts there instead
    /// of being handed over from the caller's thread and handed back (two thread wake-ups per
    /// operation). Others run it on the caller.
    fn run_unit<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }
}

/// Checks that a tensor op's operands agree, naming the op.
pub(crate) fn expect(ok: bool, op: &str, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(op, what()))
    }
}

#[cfg(test)]
mod tests {
    use super::LogitState;
    use proptest::prelude::*;

    proptest! {
        /// Folding a row a panel at a time, in any panel sizes, gives the whole row's
        /// log-softmax at the target and its first argmax.
        #[test]
        fn panels_fold_to_the_whole_row(
            row in prop::collection::vec(-30.0f32..30.0, 1..400),
            cuts in prop::collection::vec(0usize..400, 0..6),
            target_at in 0usize..400,
        ) {
            let n = row.len();
            let target = (target_at % n) as u32;
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c % n).chain([0, n]).collect();
            bounds.sort_unstable();
            bounds.dedup();
            let mut st = LogitState::EMPTY;
            for w in bounds.windows(2) {
                st.fold(&row[w[0]..w[1]], w[0], Some(target));
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let log_z = f64::from(max)
                + row.iter().map(|&v| f64::from(v - max).exp()).sum::<f64>().ln();
            let want = (f64::from(row[target as usize]) - log_z) as f32;
            prop_assert!((st.target_logprob() - want).abs() < 1e-5, "{} vs {}", st.target_logprob(), want);
            let first = row.iter().position(|&v| v == max).unwrap() as u32;
            prop_assert_eq!(st.greedy().0, first);
            prop_assert!((st.greedy().1 - (f64::from(max) - log_z) as f32).abs() < 1e-5);
        }
    }
}
