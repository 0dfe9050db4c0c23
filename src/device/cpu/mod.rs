//! [`CpuDevice`]: the [`Device`] trait natively on the CPU, on every core.
//!
//! Its memory is host RAM: weights stay in their run-time layout (f32, f16 codes, Q8_0,
//! Q4_0, Q4_1, FlexGen 4-bit) and are multiplied by fused decode-and-multiply kernels
//! (`matmul`); attention runs over (sequence, head, query tile) tasks (`attention`).
//! Compute runs on its own thread pool, so I/O threads sleep on the disk beside it.

/// Defines `fn $name` whose body is compiled three times, for baseline x86-64, AVX2+FMA+F16C
/// and AVX-512, and runs the best one the CPU has (detected at run time, cached by std); other
/// architectures get the baseline build (NEON is baseline on aarch64).
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                unsafe fn avx512($($arg: $ty),*) -> $ret { body($($arg),*) }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2($($arg: $ty),*) -> $ret { body($($arg),*) }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the features were detected on this CPU
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
                {
                    // SAFETY: the features were detected on this CPU
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) mod attention;
pub(crate) mod math;
pub(crate) mod matmul;
mod weight_rows;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_blocks;
#[cfg(target_arch = "x86_64")]
mod x86_gemm;

use std::ops::Range;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rayon::prelude::*;

use self::attention::KvView;
use self::weight_rows::WeightRows;
use crate::device::{expect, CacheFormat, Device, HostRows, LogitState, RowInfo};
use crate::error::{Error, Result};
use crate::layout::kv::quantize_row;
use crate::layout::{HeadLayout, RowFormat};

/// Elements from which element-wise work is spread over the cores.
const PARALLEL_ELEMENTS: usize = 1 << 15;

/// Vocabulary entries whose logits [`CpuDevice`] holds per row at once when it reduces
/// logits ([`Device::logit_width`]).
const LOGIT_PANEL: usize = 4096;

multiversion! {
    /// Folds the logits of vocabulary entries `offset..offset + row.len()` into `st`:
    /// `sum = sum e^(max - max') + sum_j e^(row[j] - max')` with `max' = max(max, max_j row[j])`;
    /// the argmax keeps the first of equal values.
    fn fold_row(st: &mut LogitState, row: &[f32], offset: usize, target: Option<u32>) -> () {
        let panel_max = math::max(row);
        let new_max = math::max_nan(st.max, panel_max);
        st.sum = st.sum * f64::from(st.max - new_max).exp() + math::sum_exp(row, new_max);
        st.max = new_max;
        if panel_max > st.best.1 {
            let at = row.iter().position(|&v| v == panel_max).unwrap_or(0);
            st.best = ((offset + at) as u32, panel_max);
        }
        if let Some(t) = target.map(|t| t as usize) {
            if (offset..offset + row.len()).contains(&t) {
                st.target = row[t - offset];
            }
        }
    }
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// A 2-d f32 tensor in RAM (cloning shares the storage).
#[derive(Clone)]
pub struct CpuTensor {
    data: Arc<RwLock<Vec<f32>>>,
    rows: usize,
    width: usize,
}

impl CpuTensor {
    fn new(data: Vec<f32>, rows: usize, width: usize) -> Self {
        Self {
            data: Arc::new(RwLock::new(data)),
            rows,
            width,
        }
    }

    /// A copy of the values.
    pub fn to_vec(&self) -> Vec<f32> {
        read(&self.data).clone()
    }
}

/// Bytes of weights in RAM, as 32-bit words (so f32 rows and code words are aligned).
#[derive(Clone)]
pub struct CpuBuffer(Arc<RwLock<HostWords>>);

/// Words that start at a disk-block-aligned address, with room up to a whole number of blocks
/// after them, so that a disk read with the page cache bypassed (O_DIRECT) can land in them
/// without a staging copy. Costs up to two blocks (8 KiB) more than the words (no unsafe: a
/// larger Vec, viewed from its first aligned word).
struct HostWords {
    storage: Vec<u32>,
    start: usize,
    len: usize,
    room: usize,
}

impl HostWords {
    /// Zeroed words for `bytes` bytes.
    fn new(bytes: u64) -> Self {
        let block = crate::storage::offload::ALIGN;
        let len = bytes.div_ceil(4) as usize;
        let room = (len * 4).div_ceil(block) * block / 4;
        let storage = vec![0u32; room + block / 4];
        let start = storage.as_ptr().align_offset(block);
        Self {
            storage,
            start,
            len,
            room,
        }
    }

    /// The words.
    fn words(&self) -> &[u32] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The words as bytes, and the room after them up to a whole block.
    fn bytes_with_room(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.storage[self.start..self.start + self.room])
    }
}

/// Rows of a linear weight: the format and one buffer per segment.
#[derive(Clone)]
pub struct CpuPart {
    format: RowFormat,
    segments: Vec<CpuBuffer>,
}

/// One layer's cache rows: one word vector per segment ([`CacheFormat::segment_bytes`]).
pub struct CpuCache {
    format: CacheFormat,
    segments: Vec<RwLock<Vec<u32>>>,
}

/// Per-row data: the host rows as they are.
pub struct CpuRows {
    infos: Vec<RowInfo>,
    rope: Option<(Vec<f32>, Vec<f32>)>,
    softcap: Option<f32>,
}

/// The native CPU device (cloning shares its thread pool).
#[derive(Clone)]
pub struct CpuDevice {
    pool: Arc<rayon::ThreadPool>,
}

impl CpuDevice {
    /// A device computing on `threads` threads (0: one per core).
    pub fn new(threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ferrogen-cpu-{i}"))
            .build()
            .map_err(|e| Error::invalid("CPU device", e.to_string()))?;
        Ok(Self {
            pool: Arc::new(pool),
        })
    }

    /// Threads computing.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn same(&self, a: &CpuTensor, b: &CpuTensor, op: &str) -> Result<()> {
        expect(a.rows * a.width == b.rows * b.width, op, || {
            format!("[{}, {}] and [{}, {}]", a.rows, a.width, b.rows, b.width)
        })?;
        expect(!Arc::ptr_eq(&a.data, &b.data), op, || {
            "a tensor with itself".into()
        })
    }

    /// `f(row index, row)` on every row of `t`, spread over the cores when large.
    fn rows_mut(&self, t: &CpuTensor, f: impl Fn(usize, &mut [f32]) + Sync) {
        let mut guard = write(&t.data);
        let data: &mut [f32] = guard.as_mut_slice();
        let w = t.width.max(1);
        if data.len() >= PARALLEL_ELEMENTS {
            self.pool.install(|| {
                data.par_chunks_mut(w)
                    .enumerate()
                    .for_each(|(r, row)| f(r, row))
            });
        } else {
            data.chunks_mut(w)
                .enumerate()
                .for_each(|(r, row)| f(r, row));
        }
    }

    /// `f(a_row, b_row)` for `a` written, `b` read, row by row.
    fn zip_mut(&self, a: &CpuTensor, b: &CpuTensor, f: impl Fn(&mut [f32], &[f32]) + Sync) {
        let bd = read(&b.data);
        let w = a.width.max(1);
        self.rows_mut(a, |r, row| f(row, &bd[r * w..(r + 1) * w]));
    }

    fn norm(&self, x: &CpuTensor, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Result<CpuTensor> {
        let y = self.zeros(x.rows, x.width)?;
        self.zip_mut(&y, x, |out, row| f(row, out));
        Ok(y)
    }
}

multiversion! {
    /// `a[i] += b[i]`.
    fn add_into(a: &mut [f32], b: &[f32]) -> () {
        for (a, &b) in a.iter_mut().zip(b) {
            *a += b;
        }
    }
}

multiversion! {
    /// `g[i] = silu(g[i]) * u[i]` with `silu(x) = x / (1 + e^-x)`.
    fn silu_mul_into(g: &mut [f32], u: &[f32]) -> () {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + math::exp(-*g)) * u;
        }
    }
}

multiversion! {
    /// `g = gelu_tanh(g) * u` element by element (see `Device::gelu_tanh_mul`).
    fn gelu_tanh_mul_into(g: &mut [f32], u: &[f32]) -> () {
        for (g, &u) in g.iter_mut().zip(u) {
            let t = (0.797_884_6 * (*g + 0.044_715 * *g * *g * *g)).tanh();
            *g = 0.5 * *g * (1.0 + t) * u;
        }
    }
}

multiversion! {
    /// RMSNorm of one row: `out = row / sqrt(mean(row^2) + eps) * w`.
    fn rms_norm_row(row: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> () {
        let inv = 1.0 / (math::dot(row, row) / row.len() as f32 + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
            *o = v * inv * g;
        }
    }
}

multiversion! {
    /// LayerNorm of one row: `out = (row - mean) / sqrt(var + eps) * w + b`.
    fn layer_norm_row(row: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) -> () {
        let n = row.len() as f32;
        let mean = math::sum(row) / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, &v), &g), &c) in out.iter_mut().zip(row).zip(w).zip(b) {
            *o = (v - mean) * inv * g + c;
        }
    }
}

impl Device for CpuDevice {
    type Tensor = CpuTensor;
    type Part = CpuPart;
    type Buffer = CpuBuffer;
    type Cache = CpuCache;
    type Rows = CpuRows;

    fn describe(&self) -> String {
        let simd = if cfg!(target_arch = "x86_64") {
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") {
                    "AVX-512"
                } else if std::is_x86_feature_detected!("avx2") {
                    "AVX2"
                } else {
                    "SSE2"
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                ""
            }
        } else if cfg!(target_arch = "aarch64") {
            "NEON"
        } else {
            "scalar"
        };
        format!("cpu: {} threads, {simd}", self.threads())
    }

    fn is_host(&self) -> bool {
        true
    }

    fn max_buffer_bytes(&self) -> u64 {
        isize::MAX as u64
    }

    fn upload(&self, data: &[f32], rows: usize, width: usize) -> Result<CpuTensor> {
        expect(data.len() == rows * width, "tensor", || {
            format!("{} values for [{rows}, {width}]", data.len())
        })?;
        Ok(CpuTensor::new(data.to_vec(), rows, width))
    }

    fn upload_owned(&self, data: Vec<f32>, rows: usize, width: usize) -> Result<CpuTensor> {
        expect(data.len() == rows * width, "tensor", || {
            format!("{} values for [{rows}, {width}]", data.len())
        })?;
        Ok(CpuTensor::new(data, rows, width))
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<CpuTensor> {
        Ok(CpuTensor::new(vec![0.0; rows * width], rows, width))
    }

    fn dims(&self, t: &CpuTensor) -> [usize; 2] {
        [t.rows, t.width]
    }

    fn reshape(&self, t: &CpuTensor, rows: usize, width: usize) -> Result<CpuTensor> {
        expect(rows * width == t.rows * t.width, "reshape", || {
            format!("[{}, {}] as [{rows}, {width}]", t.rows, t.width)
        })?;
        Ok(CpuTensor {
            data: Arc::clone(&t.data),
            rows,
            width,
        })
    }

    fn download(&self, t: &CpuTensor, rows: Range<usize>) -> Result<Vec<f32>> {
        expect(rows.end <= t.rows, "download", || {
            format!("rows {rows:?} of {}", t.rows)
        })?;
        Ok(read(&t.data)[rows.start * t.width..rows.end * t.width].to_vec())
    }

    fn write_rows(&self, t: &CpuTensor, at: usize, data: &[f32]) -> Result<()> {
        let start = at * t.width;
        expect(start + data.len() <= t.rows * t.width, "write rows", || {
            format!(
                "{} values at row {at} of [{}, {}]",
                data.len(),
                t.rows,
                t.width
            )
        })?;
        write(&t.data)[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn copy_rows(
        &self,
        src: &CpuTensor,
        rows: Range<usize>,
        dst: &CpuTensor,
        at: usize,
    ) -> Result<()> {
        let w = src.width;
        expect(
            dst.width == w && rows.end <= src.rows && at + rows.len() <= dst.rows,
            "copy rows",
            || {
                format!(
                    "rows {rows:?} of [{}, {w}] to row {at} of [{}, {}]",
                    src.rows, dst.rows, dst.width
                )
            },
        )?;
        if Arc::ptr_eq(&src.data, &dst.data) {
            let mut d = write(&dst.data);
            d.copy_within(rows.start * w..rows.end * w, at * w);
        } else {
            let s = read(&src.data);
            write(&dst.data)[at * w..(at + rows.len()) * w]
                .copy_from_slice(&s[rows.start * w..rows.end * w]);
        }
        Ok(())
    }

    fn buffer(&self, bytes: u64) -> Result<CpuBuffer> {
        Ok(CpuBuffer(Arc::new(RwLock::new(HostWords::new(bytes)))))
    }

    fn fill_host_buffers(
        &self,
        buffers: &[&CpuBuffer],
        fill: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Result<bool> {
        // (distinct buffers: a buffer given twice would wait on its own lock)
        let mut guards: Vec<_> = buffers.iter().map(|b| write(&b.0)).collect();
        let mut bytes: Vec<&mut [u8]> = guards.iter_mut().map(|g| g.bytes_with_room()).collect();
        fill(&mut bytes)?;
        Ok(true)
    }

    fn write_buffer(&self, buffer: &CpuBuffer, offset: u64, bytes: &[u8]) -> Result<()> {
        let mut words = write(&buffer.0);
        let len = words.len * 4;
        let all = &mut words.bytes_with_room()[..len];
        let at = offset as usize;
        expect(at + bytes.len() <= all.len(), "weights", || {
            format!(
                "{} bytes at {at} of a {}-byte buffer",
                bytes.len(),
                all.len()
            )
        })?;
        all[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn part(&self, format: RowFormat, rows: usize, segments: Vec<CpuBuffer>) -> Result<CpuPart> {
        let want = format.segment_row_bytes();
        expect(
            segments.len() == want.len()
                && segments
                    .iter()
                    .zip(&want)
                    .all(|(s, &b)| read(&s.0).len * 4 >= rows * b),
            "weights",
            || format!("segments too small for {rows} rows of {format:?}"),
        )?;
        Ok(CpuPart { format, segments })
    }

    fn rows(&self, rows: &HostRows) -> Result<CpuRows> {
        Ok(CpuRows {
            infos: rows.infos.clone(),
            rope: rows.rope.clone(),
            softcap: rows.softcap,
        })
    }

    fn linear(&self, x: &CpuTensor, parts: &[(CpuPart, usize)], out: usize) -> Result<CpuTensor> {
        let (m, k) = (x.rows, x.width);
        let mut y = vec![0.0f32; m * out];
        let xd = read(&x.data);
        for (part, col) in parts {
            let guards: Vec<_> = part.segments.iter().map(|s| read(&s.0)).collect();
            let views: Vec<&[u32]> = guards.iter().map(|g| g.words()).collect();
            let w = WeightRows::new(part.format, &views);
            let rows = w.rows();
            expect(w.k() == k && col + rows <= out, "linear", || {
                format!(
                    "x [{m}, {k}] with weight rows {col}..{} of {out}, k {}",
                    col + rows,
                    w.k()
                )
            })?;
            matmul::linear_into(&self.pool, &w, &xd, m, &mut y, out, *col);
        }
        Ok(CpuTensor::new(y, m, out))
    }

    fn add_bias(&self, y: &CpuTensor, bias: &CpuTensor) -> Result<()> {
        let b = read(&bias.data).clone();
        expect(b.len() == y.width, "add_bias", || {
            format!("{} biases for width {}", b.len(), y.width)
        })?;
        self.rows_mut(y, |_, row| {
            row.iter_mut().zip(&b).for_each(|(v, &c)| *v += c);
        });
        Ok(())
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let w = read(&w.data).clone();
        expect(w.len() == x.width, "rms_norm", || "weight width".into())?;
        self.norm(x, |row, out| rms_norm_row(row, &w, eps, out))
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        b: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        let (w, b) = (read(&w.data).clone(), read(&b.data).clone());
        expect(
            w.len() == x.width && b.len() == x.width,
            "layer_norm",
            || "weight width".into(),
        )?;
        self.norm(x, |row, out| layer_norm_row(row, &w, &b, eps, out))
    }

    fn add(&self, x: &CpuTensor, y: &CpuTensor) -> Result<()> {
        self.same(x, y, "add")?;
        self.zip_mut(x, y, add_into);
        Ok(())
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<()> {
        self.same(gate, up, "silu_mul")?;
        self.zip_mut(gate, up, silu_mul_into);
        Ok(())
    }

    fn gelu_tanh_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<()> {
        self.same(gate, up, "gelu_tanh_mul")?;
        self.zip_mut(gate, up, gelu_tanh_mul_into);
        Ok(())
    }

    fn scale(&self, x: &CpuTensor, s: f32) -> Result<()> {
        self.rows_mut(x, |_, row| row.iter_mut().for_each(|v| *v *= s));
        Ok(())
    }

    fn relu(&self, x: &CpuTensor) -> Result<()> {
        self.rows_mut(x, |_, row| row.iter_mut().for_each(|v| *v = v.max(0.0)));
        Ok(())
    }

    fn rope(&self, x: &CpuTensor, rows: &CpuRows, head_dim: usize) -> Result<()> {
        let (cos, sin) = rows
            .rope
            .as_ref()
            .ok_or_else(|| Error::invalid("rope", "rows without RoPE tables"))?;
        let half = head_dim / 2;
        expect(
            cos.len() == x.rows * half && x.width.is_multiple_of(head_dim.max(1)),
            "rope",
            || {
                format!(
                    "tables for {} rows, x [{}, {}]",
                    cos.len() / half.max(1),
                    x.rows,
                    x.width
                )
            },
        )?;
        // x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin for each pair (i, i + d/2) of a head
        self.rows_mut(x, |r, row| {
            let (c, s) = (
                &cos[r * half..(r + 1) * half],
                &sin[r * half..(r + 1) * half],
            );
            for head in row.chunks_exact_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * c[i] - x2 * s[i];
                    b[i] = x2 * c[i] + x1 * s[i];
                }
            }
        });
        Ok(())
    }

    fn gather(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
        let t = read(&table.data);
        let w = table.width;
        let mut out = Vec::with_capacity(ids.len() * w);
        for &id in ids {
            let id = id as usize;
            expect(id < table.rows, "gather", || {
                format!("row {id} of a {}-row table", table.rows)
            })?;
            out.extend_from_slice(&t[id * w..(id + 1) * w]);
        }
        Ok(CpuTensor::new(out, ids.len(), w))
    }

    fn fold_logits(
        &self,
        x: &CpuTensor,
        parts: &[(CpuPart, usize)],
        cols: Range<usize>,
        targets: Option<&[u32]>,
        softcap: Option<f32>,
        states: &mut [LogitState],
    ) -> Result<()> {
        let (m, k) = (x.rows, x.width);
        expect(states.len() == m, "logits", || "one state per row".into())?;
        if let Some(t) = targets {
            expect(t.len() == m, "logprob", || "one target per row".into())?;
        }
        let guards: Vec<Vec<_>> = parts
            .iter()
            .map(|(p, _)| p.segments.iter().map(|s| read(&s.0)).collect())
            .collect();
        let views: Vec<Vec<&[u32]>> = guards
            .iter()
            .map(|g| g.iter().map(|s| s.words()).collect())
            .collect();
        let weights: Vec<(WeightRows, usize)> = parts
            .iter()
            .zip(&views)
            .map(|((p, col), v)| (WeightRows::new(p.format, v), *col))
            .collect();
        let covered: usize = weights.iter().map(|(w, _)| w.rows()).sum();
        expect(
            covered == cols.len()
                && weights
                    .iter()
                    .all(|(w, c)| w.k() == k && *c >= cols.start && c + w.rows() <= cols.end),
            "logits",
            || format!("output rows {covered} for columns {cols:?}, x [{m}, {k}]"),
        )?;
        let xd = read(&x.data);
        let panel = cols.len().clamp(1, LOGIT_PANEL);
        let mut logits = vec![0.0f32; m * panel];
        for p0 in cols.clone().step_by(panel) {
            let p1 = (p0 + panel).min(cols.end);
            let width = p1 - p0;
            let logits = &mut logits[..m * width];
            // logits[:, j] = x W[p0 + j]^T from every part that holds rows of the panel
            for (w, col) in &weights {
                let (a, b) = ((*col).max(p0), (col + w.rows()).min(p1));
                if a < b {
                    let rows = w.slice(a - col..b - col);
                    matmul::linear_into(&self.pool, &rows, &xd, m, logits, width, a - p0);
                }
            }
            if let Some(cap) = softcap {
                logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
            }
            self.pool.install(|| {
                states
                    .par_iter_mut()
                    .zip(logits.par_chunks(width))
                    .enumerate()
                    .for_each(|(i, (st, row))| {
                        fold_row(st, row, p0, targets.map(|t| t[i]));
                    })
            });
        }
        Ok(())
    }

    fn logit_width(&self, cols: usize) -> usize {
        cols.min(LOGIT_PANEL)
    }

    fn cache(&self, format: CacheFormat, rows: usize) -> Result<CpuCache> {
        Ok(CpuCache {
            format,
            segments: format
                .segment_bytes()
                .iter()
                .map(|&b| RwLock::new(vec![0u32; rows * b as usize / 4]))
                .collect(),
        })
    }

    fn attend(
        &self,
        cache: &CpuCache,
        rows: &CpuRows,
        appends: &[(usize, usize, usize)],
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        layout: HeadLayout,
    ) -> Result<CpuTensor> {
        let (kd, vd) = (read(&k.data), read(&v.data));
        let kvw = k.width;
        expect(
            q.rows == rows.infos.len() && k.rows == q.rows && v.rows == q.rows,
            "attention",
            || "queries, keys, values and row infos disagree".into(),
        )?;
        // append at each sequence's cache rows: f32 rows copied, f16 rows rounded, 4-bit rows
        // quantized
        {
            let mut segs: Vec<_> = cache.segments.iter().map(write).collect();
            let cache_rows = segs[0].len() * 4 / cache.format.segment_bytes()[0].max(1) as usize;
            for &(src, dst, n) in appends {
                expect(dst + n <= cache_rows, "KV cache", || {
                    format!("rows {dst}..{} of a {cache_rows}-row cache", dst + n)
                })?;
                match cache.format {
                    CacheFormat::F32 { width } => {
                        for (seg, data) in [(0, &kd), (1, &vd)] {
                            let rows: &[f32] = &data[src * kvw..(src + n) * kvw];
                            let dst_f: &mut [f32] =
                                bytemuck::cast_slice_mut(segs[seg].as_mut_slice());
                            dst_f[dst * width..(dst + n) * width].copy_from_slice(rows);
                        }
                    }
                    CacheFormat::F16 { width } => {
                        // rounded to nearest even, as the GPU's pack2x16float
                        let stride = CacheFormat::f16_stride(width);
                        for (seg, data) in [(0, &kd), (1, &vd)] {
                            let dst_h: &mut [u16] =
                                bytemuck::cast_slice_mut(segs[seg].as_mut_slice());
                            for i in 0..n {
                                let from = &data[(src + i) * kvw..(src + i) * kvw + width];
                                let to = &mut dst_h[(dst + i) * stride..][..width];
                                for (h, &x) in to.iter_mut().zip(from) {
                                    *h = half::f16::from_f32(x).to_bits();
                                }
                            }
                        }
                    }
                    CacheFormat::Q4(l) => {
                        let (w, g) = (l.words_per_row(), l.groups_per_row());
                        for i in 0..n {
                            let (s, d) = (src + i, dst + i);
                            let (kc, rest) = segs.split_at_mut(1);
                            let (ks, rest) = rest.split_at_mut(1);
                            let (vc, vs) = rest.split_at_mut(1);
                            quantize_row(
                                &l,
                                &kd[s * kvw..(s + 1) * kvw],
                                &mut kc[0][d * w..(d + 1) * w],
                                &mut ks[0][d * g..(d + 1) * g],
                            );
                            quantize_row(
                                &l,
                                &vd[s * kvw..(s + 1) * kvw],
                                &mut vc[0][d * w..(d + 1) * w],
                                &mut vs[0][d * g..(d + 1) * g],
                            );
                        }
                    }
                }
            }
        }
        let segs: Vec<_> = cache.segments.iter().map(read).collect();
        let view = match cache.format {
            CacheFormat::F32 { width } => KvView::F32 {
                k: bytemuck::cast_slice(segs[0].as_slice()),
                v: bytemuck::cast_slice(segs[1].as_slice()),
                width,
            },
            CacheFormat::F16 { width } => KvView::F16 {
                k: bytemuck::cast_slice(segs[0].as_slice()),
                v: bytemuck::cast_slice(segs[1].as_slice()),
                stride: CacheFormat::f16_stride(width),
            },
            CacheFormat::Q4(layout) => KvView::Q4 {
                layout,
                k_codes: &segs[0],
                k_scales: &segs[1],
                v_codes: &segs[2],
                v_scales: &segs[3],
            },
        };
        let mut o = vec![0.0f32; q.rows * q.width];
        let qd = read(&q.data);
        self.pool
            .install(|| attention::attend(&qd, &rows.infos, view, layout, rows.softcap, &mut o));
        Ok(CpuTensor::new(o, q.rows, q.width))
    }

    fn copy_cache_rows(
        &self,
        src: &CpuCache,
        dst: &CpuCache,
        rows: &[(usize, usize)],
    ) -> Result<()> {
        expect(src.format == dst.format, "KV cache", || {
            "formats differ".into()
        })?;
        for ((s, d), b) in src
            .segments
            .iter()
            .zip(&dst.segments)
            .zip(src.format.segment_bytes())
        {
            let words = b as usize / 4;
            let (s, mut d) = (read(s), write(d));
            for &(first, count) in rows {
                let r = first * words..(first + count) * words;
                d[r.clone()].copy_from_slice(&s[r]);
            }
        }
        Ok(())
    }

    fn write_cache(
        &self,
        cache: &CpuCache,
        segment: usize,
        offset: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let seg = cache
            .segments
            .get(segment)
            .ok_or_else(|| Error::invalid("KV cache", format!("no segment {segment}")))?;
        let mut words = write(seg);
        let all: &mut [u8] = bytemuck::cast_slice_mut(words.as_mut_slice());
        let at = offset as usize;
        expect(at + bytes.len() <= all.len(), "KV cache", || {
            format!(
                "{} bytes at {at} of a {}-byte segment",
                bytes.len(),
                all.len()
            )
        })?;
        all[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn read_cache(&self, cache: &CpuCache, ranges: &[(usize, u64, u64)]) -> Result<Vec<Vec<u8>>> {
        ranges
            .iter()
            .map(|&(seg, offset, len)| {
                let s = cache
                    .segments
                    .get(seg)
                    .ok_or_else(|| Error::invalid("KV cache", format!("no segment {seg}")))?;
                let words = read(s);
                let all: &[u8] = bytemuck::cast_slice(words.as_slice());
                let r = offset as usize..(offset + len) as usize;
                all.get(r.clone()).map(<[u8]>::to_vec).ok_or_else(|| {
                    Error::invalid("KV cache", format!("bytes {r:?} of {}", all.len()))
                })
            })
            .collect()
    }

    fn wait(&self) -> Result<()> {
        Ok(())
    }

    fn run_unit<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::ops;
    use ndarray::Array2;
    use proptest::prelude::*;

    proptest! {
        /// GeGLU (gates up to +-12, where tanh saturates) and scaling against the reference.
        #[test]
        fn gelu_tanh_mul_and_scale_match_reference(
            rows in 1usize..5,
            width in 1usize..300,
            seed in any::<u64>(),
        ) {
            let dev = CpuDevice::new(0).unwrap();
            let mut s = seed | 1;
            let mut next = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 20001) as f32 / 10000.0 - 1.0
            };
            let gate: Vec<f32> = (0..rows * width).map(|_| next() * 12.0).collect();
            let up: Vec<f32> = (0..rows * width).map(|_| next()).collect();
            let (g, u) = (
                dev.upload(&gate, rows, width).unwrap(),
                dev.upload(&up, rows, width).unwrap(),
            );
            dev.gelu_tanh_mul(&g, &u).unwrap();
            let mut want = Array2::from_shape_vec((rows, width), gate.clone()).unwrap();
            ops::gelu_tanh_mul(&mut want, &Array2::from_shape_vec((rows, width), up).unwrap());
            let got = dev.download(&g, 0..rows).unwrap();
            for (a, b) in got.iter().zip(want.iter()) {
                prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
            dev.scale(&g, 0.5).unwrap();
            let halved = dev.download(&g, 0..rows).unwrap();
            for (h, a) in halved.iter().zip(&got) {
                prop_assert_eq!(*h, a * 0.5);
            }
        }
    }
}
