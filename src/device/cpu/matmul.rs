//! Linear layers on the CPU in every run-time weight layout, never expanding a weight to an
//! f32 copy of itself:
//!
//! - few rows of `x` (decode): each weight row's packed bytes are streamed once, decoded a
//!   group at a time into registers and multiplied with every row of `x` (bandwidth-bound);
//! - many rows (prefill): a panel of weight rows (about 1 MiB as f32) is decoded, then one
//!   GEMM (`matrixmultiply`, all cores) multiplies it at full FLOP rate.
//!
//! The inner loops are plain Rust over fixed-width lanes, compiled three times (baseline,
//! AVX2+FMA, AVX-512) and picked at run time by CPU feature detection.

use half::f16;
use rayon::prelude::*;

use crate::layout::kv::unpack_scale;
use crate::layout::RowFormat;

/// Rows of `x` from which a linear layer decodes panels and runs a GEMM.
pub const GEMM_MIN_ROWS: usize = 6;

/// f32 values of a decoded weight panel (about 1 MiB).
const PANEL_VALUES: usize = 1 << 18;

/// A linear weight's rows in their run-time layout, borrowed: f32 rows, or packed codes and
/// scales ([`crate::layout::PackedWeight`]'s layout).
#[derive(Clone, Copy)]
pub enum WeightRows<'a> {
    /// `[rows, k]` f32.
    F32 {
        /// Row-major values.
        values: &'a [f32],
        /// Columns.
        k: usize,
    },
    /// Packed rows.
    Packed {
        /// Code words, `padded_k * bits / 32` per row.
        codes: &'a [u32],
        /// `(step, min)` words, `padded_k / group` per row.
        scales: &'a [u32],
        /// Columns.
        k: usize,
        /// Columns padded to whole groups.
        padded_k: usize,
        /// Codes per group.
        group: usize,
        /// Bits per code (4, 8 or 16).
        bits: u32,
    },
}

impl<'a> WeightRows<'a> {
    /// Views `segments` (as words) of `format`.
    pub fn new(format: RowFormat, segments: &[&'a [u32]]) -> Self {
        match format {
            RowFormat::F32 { k } => WeightRows::F32 {
                values: bytemuck::cast_slice(segments[0]),
                k,
            },
            RowFormat::Packed {
                k,
                padded_k,
                group,
                bits,
            } => WeightRows::Packed {
                codes: segments[0],
                scales: segments[1],
                k,
                padded_k,
                group,
                bits,
            },
        }
    }

    /// Columns of the weight.
    pub fn k(&self) -> usize {
        match *self {
            WeightRows::F32 { k, .. } | WeightRows::Packed { k, .. } => k,
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        match *self {
            WeightRows::F32 { values, k } => values.len() / k.max(1),
            WeightRows::Packed {
                codes,
                padded_k,
                bits,
                ..
            } => codes.len() / (padded_k * bits as usize / 32).max(1),
        }
    }

    /// Decodes row `r` into `out` (`k` values): `code * step + min` per value.
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        match *self {
            WeightRows::F32 { values, k } => out[..k].copy_from_slice(&values[r * k..(r + 1) * k]),
            WeightRows::Packed {
                codes,
                scales,
                k,
                padded_k,
                group,
                bits,
            } => {
                let words = padded_k * bits as usize / 32;
                let groups = padded_k / group;
                let codes = &codes[r * words..(r + 1) * words];
                let scales = &scales[r * groups..(r + 1) * groups];
                let per_word = 32 / bits as usize;
                let mut buf = vec![0.0f32; group];
                for (g, &sw) in scales.iter().enumerate() {
                    let (step, min) = unpack_scale(sw);
                    let w0 = g * group / per_word;
                    decode_codes(&codes[w0..w0 + group / per_word], bits, &mut buf);
                    let c0 = g * group;
                    let n = group.min(k.saturating_sub(c0));
                    for (o, &q) in out[c0..c0 + n].iter_mut().zip(&buf) {
                        *o = q * step + min;
                    }
                }
            }
        }
    }
}

/// Codes of `words` as f32 (not yet scaled): nibbles, bytes or IEEE halves, in order.
#[inline(always)]
fn decode_codes(words: &[u32], bits: u32, out: &mut [f32]) {
    match bits {
        4 => {
            for (w, o) in words.iter().zip(out.chunks_exact_mut(8)) {
                for (b, v) in o.iter_mut().enumerate() {
                    *v = ((w >> (4 * b)) & 15) as f32;
                }
            }
        }
        8 => {
            for (w, o) in words.iter().zip(out.chunks_exact_mut(4)) {
                for (b, v) in o.iter_mut().enumerate() {
                    *v = ((w >> (8 * b)) & 255) as f32;
                }
            }
        }
        _ => {
            for (w, o) in words.iter().zip(out.chunks_exact_mut(2)) {
                o[0] = f16::from_bits(*w as u16).to_f32();
                o[1] = f16::from_bits((*w >> 16) as u16).to_f32();
            }
        }
    }
}

/// `sum_i a[i] * b[i]` over 16 lanes (the compiler keeps them in vector registers).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// One weight row against every row of `x`: `y[i] = sum_c x[i, c] * w[c]` for `i < m`,
/// decoding the row a group at a time (`xsum[i * groups + g]` = the sum of `x[i]` over group
/// `g`, so that `sum (q s + m) x = s sum q x + m sum x`).
#[inline(always)]
fn row_times_x(w: &WeightRows, r: usize, x: &[f32], xsum: &[f32], m: usize, y: &mut [f32]) {
    match *w {
        WeightRows::F32 { values, k } => {
            let row = &values[r * k..(r + 1) * k];
            for i in 0..m {
                y[i] = dot(row, &x[i * k..(i + 1) * k]);
            }
        }
        WeightRows::Packed {
            codes,
            scales,
            k,
            padded_k,
            group,
            bits,
        } => {
            let words = padded_k * bits as usize / 32;
            let groups = padded_k / group;
            let per_word = 32 / bits as usize;
            let codes = &codes[r * words..(r + 1) * words];
            let scales = &scales[r * groups..(r + 1) * groups];
            let mut q = [0.0f32; 256];
            y[..m].fill(0.0);
            for (g, &sw) in scales.iter().enumerate() {
                let (step, min) = unpack_scale(sw);
                let w0 = g * group / per_word;
                let q = &mut q[..group];
                decode_codes(&codes[w0..w0 + group / per_word], bits, q);
                let c0 = g * group;
                let n = group.min(k - c0);
                for i in 0..m {
                    let xs = &x[i * k + c0..i * k + c0 + n];
                    y[i] += step * dot(&q[..n], xs) + min * xsum[i * groups + g];
                }
            }
        }
    }
}

/// Per row of `x` and per weight group: the sum of `x` over the group's columns.
fn group_sums(x: &[f32], m: usize, k: usize, group: usize, groups: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * groups];
    for i in 0..m {
        for g in 0..groups {
            let (a, b) = ((g * group).min(k), ((g + 1) * group).min(k));
            out[i * groups + g] = x[i * k + a..i * k + b].iter().sum();
        }
    }
    out
}

macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
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

multiversion! {
    /// Weight rows `rows` against all of `x`, into `out[(r - rows.start) * m + i]`.
    fn rows_kernel(
        w: &WeightRows,
        rows: std::ops::Range<usize>,
        x: &[f32],
        xsum: &[f32],
        m: usize,
        out: &mut [f32]
    ) {
        for (j, r) in rows.enumerate() {
            row_times_x(w, r, x, xsum, m, &mut out[j * m..(j + 1) * m]);
        }
    }
}

multiversion! {
    /// Decodes weight rows `rows` into `out` (`k` values per row).
    fn decode_kernel(w: &WeightRows, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let k = w.k();
        for (j, r) in rows.enumerate() {
            w.decode_row(r, &mut out[j * k..(j + 1) * k]);
        }
    }
}

/// `y[:, col..col + rows] = x W^T` for `x [m, k]` and the weight rows `w`, with `y` of `ldy`
/// columns, on the calling rayon pool.
pub fn linear_into(w: &WeightRows, x: &[f32], m: usize, y: &mut [f32], ldy: usize, col: usize) {
    let (k, n) = (w.k(), w.rows());
    if m == 0 || n == 0 {
        return;
    }
    if m < GEMM_MIN_ROWS {
        let groups = match *w {
            WeightRows::Packed {
                padded_k, group, ..
            } => padded_k / group,
            WeightRows::F32 { .. } => 0,
        };
        let group = match *w {
            WeightRows::Packed { group, .. } => group,
            WeightRows::F32 { .. } => 1,
        };
        let xsum = group_sums(x, m, k, group, groups);
        // rows of W in blocks over the cores; each block's results, transposed into y
        let block = n.div_ceil(rayon::current_num_threads() * 8).clamp(16, 1024);
        let results: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(block))
            .into_par_iter()
            .map(|b| {
                let rows = b * block..((b + 1) * block).min(n);
                let mut out = vec![0.0; rows.len() * m];
                rows_kernel(w, rows.clone(), x, &xsum, m, &mut out);
                (rows.start, out)
            })
            .collect();
        for (start, out) in results {
            for (j, vals) in out.chunks_exact(m).enumerate() {
                for (i, &v) in vals.iter().enumerate() {
                    y[i * ldy + col + start + j] = v;
                }
            }
        }
        return;
    }
    match *w {
        WeightRows::F32 { values, .. } => gemm(x, m, k, values, n, y, ldy, col),
        WeightRows::Packed { .. } => {
            let panel_rows = (PANEL_VALUES / k.max(1)).clamp(16, n.max(16));
            let mut panel = vec![0.0f32; panel_rows.min(n) * k];
            for p0 in (0..n).step_by(panel_rows) {
                let rows = p0..(p0 + panel_rows).min(n);
                let count = rows.len();
                let per = count.div_ceil(rayon::current_num_threads()).max(1);
                panel[..count * k]
                    .par_chunks_mut(per * k)
                    .enumerate()
                    .for_each(|(c, out)| {
                        let a = p0 + c * per;
                        decode_kernel(w, a..a + out.len() / k, out);
                    });
                gemm(x, m, k, &panel[..count * k], count, y, ldy, col + p0);
            }
        }
    }
}

/// `y[:, col..col + n] = x [m, k] · w [n, k]^T` by `matrixmultiply` (threaded).
#[allow(clippy::too_many_arguments)]
fn gemm(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, y: &mut [f32], ldy: usize, col: usize) {
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= (m - 1) * ldy + col + n);
    // SAFETY: the bounds above cover every element the strides address: x rows of k, w rows
    // of k read as the columns of w^T, and y rows of ldy from column col.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            y.as_mut_ptr().add(col),
            ldy as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PackedWeight;
    use crate::quant::ggml::{quantize_q8_0, BlockFormat};
    use crate::quant::group4::Group4;
    use proptest::prelude::*;

    fn reference(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|c| f64::from(x[i * k + c]) * f64::from(w[j * k + c]))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn packed(kind: u8, values: &[f32], n: usize, k: usize) -> PackedWeight {
        match kind {
            0 => PackedWeight::from_group4(&Group4::quantize(values, &[n, k], 1, 64).unwrap())
                .unwrap(),
            1 => PackedWeight::from_ggml(BlockFormat::Q8_0, &quantize_q8_0(values), n, k).unwrap(),
            _ => {
                let halves: Vec<u16> = values.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
                PackedWeight::from_f16(&halves, n, k).unwrap()
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Every layout, decode and prefill shapes, odd sizes, written at a column offset:
        /// equal to the f64 product with the weight as the packed format decodes it.
        #[test]
        fn linear_matches_reference(
            m in prop_oneof![1usize..6, 6usize..40],
            n in 1usize..70,
            k32 in 1usize..12,
            odd in 0usize..2,
            kind in 0u8..4,
            seed in 0u64..1000,
        ) {
            // Q8_0 needs whole blocks of 32; the others take any k
            let k = if kind == 1 { 32 * k32 } else { 32 * k32 - odd * 7 };
            let val = |i: usize| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0;
            let wv: Vec<f32> = (0..n * k).map(val).collect();
            let x: Vec<f32> = (0..m * k).map(|i| val(i + 77)).collect();
            let (w_ref, rows_fmt, segs): (Vec<f32>, RowFormat, Vec<Vec<u32>>) = if kind == 3 {
                (wv.clone(), RowFormat::F32 { k }, vec![bytemuck::cast_slice(&wv).to_vec()])
            } else {
                let p = packed(kind, &wv, n, k);
                (
                    p.dequantize(),
                    RowFormat::Packed { k, padded_k: p.padded_k, group: p.group, bits: p.bits },
                    vec![p.codes.clone(), p.scales.clone()],
                )
            };
            let views: Vec<&[u32]> = segs.iter().map(|s| s.as_slice()).collect();
            let w = WeightRows::new(rows_fmt, &views);
            prop_assert_eq!(w.rows(), n);
            let (col, ldy) = (3, n + 5);
            let mut y = vec![f32::NAN; m * ldy];
            linear_into(&w, &x, m, &mut y, ldy, col);
            let want = reference(&w_ref, &x, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let (g, e) = (y[i * ldy + col + j], want[i * n + j]);
                    prop_assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()) * (k as f32).sqrt(),
                        "m {m} n {n} k {k} kind {kind}: y[{i},{j}] = {g}, want {e}");
                }
            }
        }
    }
}
