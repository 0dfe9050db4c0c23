//! Linear layers on the CPU in every run-time weight layout, never expanding a weight to an
//! f32 copy of itself:
//!
//! - few rows of `x` (decode): each weight row's packed bytes are streamed once, decoded a
//!   group at a time into registers and multiplied with every row of `x` (bandwidth-bound);
//!   one row of `x` on AVX-512 has its own kernel, one weight row after another in memory
//!   order, with `x` reordered once per call to match how the codes unpack;
//! - many rows (prefill, big decode batches): on AVX-512 the device's own GEMM
//!   (`x86_gemm`) decodes chunks of weight rows straight into the order its tiles read;
//!   elsewhere a panel of weight rows (about 1 MiB as f32) is decoded, then one GEMM (faer,
//!   all cores) multiplies it at full FLOP rate.
//!
//! The inner loops are plain Rust over fixed-width lanes, compiled three times (baseline,
//! AVX2+FMA, AVX-512: see `multiversion!`) and picked at run time by CPU feature detection.

use rayon::prelude::*;

use super::math::dot;
pub use super::weight_rows::WeightRows;
use super::weight_rows::{codes16, scale_pair};
use crate::policy::hardware::{GEMM_MIN_ROWS, PACKED_GEMM_MIN_ROWS};
use crate::quant::ggml::{BlockFormat, DecodeJob};

/// f32 values of a decoded weight panel (4 MiB: big enough that the GEMM's per-call costs
/// stay small, small enough to stay in the caches).
const PANEL_VALUES: usize = 1 << 20;

/// One packed weight row (`codes`, `scales` of one row) against `M` rows of `x [M, k]`:
/// `y[i] = sum_c x[i, c] (q_c step_g + min_g)`, 16 values at a time (decoded once for all `M`
/// rows), in 16 lanes per row of `x` that are summed at the end. Needs `group % 16 == 0`.
#[inline(always)]
fn packed_row<const M: usize>(
    codes: &[u32],
    scales: &[u32],
    (k, group, bits): (usize, usize, u32),
    x: &[f32],
    y: &mut [f32],
) {
    let mut acc = [[0.0f32; 16]; M];
    for (g, &sw) in scales.iter().enumerate() {
        let (step, min) = scale_pair(sw);
        for at in (g * group..(g + 1) * group).step_by(16) {
            if at >= k {
                break;
            }
            let q = codes16(codes, bits, at);
            let mut w = [0.0f32; 16];
            for l in 0..16 {
                w[l] = q[l].mul_add(step, min);
            }
            if at + 16 <= k {
                for (i, a) in acc.iter_mut().enumerate() {
                    let xs = &x[i * k + at..i * k + at + 16];
                    for l in 0..16 {
                        a[l] = w[l].mul_add(xs[l], a[l]);
                    }
                }
            } else {
                // the row's last, partial 16: columns past k do not exist
                for (i, a) in acc.iter_mut().enumerate() {
                    for (l, &xv) in x[i * k + at..(i + 1) * k].iter().enumerate() {
                        a[l] = w[l].mul_add(xv, a[l]);
                    }
                }
            }
        }
    }
    for (yi, a) in y.iter_mut().zip(&acc) {
        *yi = a.iter().sum();
    }
}

/// One row of GGUF blocks against every row of `x [m, k]`: each block is decoded once into
/// registers (at most 256 values) and multiplied with the same columns of every row of `x`,
/// `y[i] = sum_b sum_{c in b} x[i, c] * w[c]`.
struct BlocksTimesX<'a> {
    row: &'a [u8],
    format: BlockFormat,
    k: usize,
    x: &'a [f32],
    y: &'a mut [f32],
}

impl DecodeJob for BlocksTimesX<'_> {
    type Output = ();

    #[inline(always)]
    fn run<D: Fn(&[u8], &mut [f32]) + Copy>(self, decode: D) {
        let (bl, bb, k) = (self.format.block_len(), self.format.block_bytes(), self.k);
        let mut w = [0.0f32; 256];
        self.y.fill(0.0);
        for (b, block) in self.row.chunks_exact(bb).enumerate() {
            let w = &mut w[..bl];
            decode(block, w);
            for (i, yi) in self.y.iter_mut().enumerate() {
                *yi += dot(w, &self.x[i * k + b * bl..i * k + (b + 1) * bl]);
            }
        }
    }
}

/// One weight row against every row of `x`: `y[i] = sum_c x[i, c] * w[c]` for `i < m`.
#[inline(always)]
fn row_times_x(w: &WeightRows, r: usize, x: &[f32], m: usize, y: &mut [f32]) {
    match *w {
        WeightRows::F32 { values, k } => {
            let row = &values[r * k..(r + 1) * k];
            for i in 0..m {
                y[i] = dot(row, &x[i * k..(i + 1) * k]);
            }
        }
        WeightRows::Blocks { k, format, .. } => format.with_decoder(BlocksTimesX {
            row: w.block_row(r),
            format,
            k,
            x,
            y: &mut y[..m],
        }),
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
            let shape = (k, group, bits);
            match m {
                _ if group % 16 != 0 => {
                    // groups of 8 or 24 (4-bit caches of odd head widths): one value at a time
                    let mut row = vec![0.0f32; k];
                    w.decode_row(r, &mut row);
                    for i in 0..m {
                        y[i] = dot(&row, &x[i * k..(i + 1) * k]);
                    }
                }
                1 => packed_row::<1>(codes, scales, shape, x, y),
                2 => packed_row::<2>(codes, scales, shape, x, y),
                3 => packed_row::<3>(codes, scales, shape, x, y),
                4 => packed_row::<4>(codes, scales, shape, x, y),
                _ => {
                    for (xi, yi) in x.chunks(4 * k).zip(y.chunks_mut(4)) {
                        match yi.len() {
                            4 => packed_row::<4>(codes, scales, shape, xi, yi),
                            3 => packed_row::<3>(codes, scales, shape, xi, yi),
                            2 => packed_row::<2>(codes, scales, shape, xi, yi),
                            _ => packed_row::<1>(codes, scales, shape, xi, yi),
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// Weight rows `rows` against all of `x`, into `out[(r - rows.start) * m + i]`.
    fn rows_kernel(
        w: &WeightRows,
        rows: std::ops::Range<usize>,
        x: &[f32],
        m: usize,
        out: &mut [f32]
    ) -> () {
        for (j, r) in rows.enumerate() {
            row_times_x(w, r, x, m, &mut out[j * m..(j + 1) * m]);
        }
    }
}

multiversion! {
    /// Decodes weight rows `rows` into `out` (`k` values per row).
    fn decode_kernel(w: &WeightRows, rows: std::ops::Range<usize>, out: &mut [f32]) -> () {
        let k = w.k();
        for (j, r) in rows.enumerate() {
            w.decode_row(r, &mut out[j * k..(j + 1) * k]);
        }
    }
}

/// The tile driver of the AVX-512 few-rows kernels: weight rows `rows` in tiles of `WT` rows
/// (then single rows at the end), each against the `m` rows of `x` (`x_row` values each) at
/// most `XT` at a time. `tile(r, take, ahead, x_tile, y)` computes weight rows `r..r + take`
/// against the `mi = y.len() / take` rows of `x_tile`, `y[i * take + j]` being x row `i0 + i`
/// against weight row `r + j`, which goes to `out[(r - rows.start + j) * m + i0 + i]`;
/// `ahead` is the next tile's first row, to prefetch (the tile's own at the end).
#[cfg(target_arch = "x86_64")]
fn drive_tiles<const WT: usize, const XT: usize>(
    rows: std::ops::Range<usize>,
    m: usize,
    x: &[f32],
    x_row: usize,
    out: &mut [f32],
    mut tile: impl FnMut(usize, usize, usize, &[f32], &mut [f32]),
) {
    let mut tmp = [0.0f32; 64];
    let mut r = rows.start;
    while r < rows.end {
        let take = if rows.end - r >= WT { WT } else { 1 };
        let ahead = if r + 2 * WT <= rows.end { r + WT } else { r };
        for i0 in (0..m).step_by(XT) {
            let mi = (m - i0).min(XT);
            let y = &mut tmp[..mi * take];
            tile(r, take, ahead, &x[i0 * x_row..(i0 + mi) * x_row], y);
            for i in 0..mi {
                for j in 0..take {
                    out[(r - rows.start + j) * m + i0 + i] = y[i * take + j];
                }
            }
        }
        r += take;
    }
}

/// Weight rows `rows` against all of `x`, into `out[(r - rows.start) * m + i]`: the AVX-512
/// kernel where the CPU and the layout allow, else the portable one.
fn rows_times_x(
    w: &WeightRows,
    rows: std::ops::Range<usize>,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let WeightRows::Packed { k, group, bits, .. } = *w {
        if group % 16 == 0 && super::x86::available() {
            use super::x86::packed_rows;
            let shape = (k, group, bits);
            // four weight rows at a time (then one), against at most four rows of x at once
            drive_tiles::<4, 4>(rows, m, x, k, out, |r, take, ahead, xi, y| {
                // SAFETY: AVX-512 is available; packed_row gives whole rows; xi holds mi
                // rows of k values and y mi * take results
                unsafe {
                    if take == 4 {
                        let w4 = [0, 1, 2, 3].map(|j| w.packed_row(r + j));
                        let n4 = [0, 1, 2, 3].map(|j| w.packed_row(ahead + j));
                        match y.len() / take {
                            4 => packed_rows::<4, 4>(w4, n4, shape, xi, y),
                            3 => packed_rows::<4, 3>(w4, n4, shape, xi, y),
                            2 => packed_rows::<4, 2>(w4, n4, shape, xi, y),
                            _ => packed_rows::<4, 1>(w4, n4, shape, xi, y),
                        }
                    } else {
                        let w1 = [w.packed_row(r)];
                        match y.len() {
                            4 => packed_rows::<1, 4>(w1, w1, shape, xi, y),
                            3 => packed_rows::<1, 3>(w1, w1, shape, xi, y),
                            2 => packed_rows::<1, 2>(w1, w1, shape, xi, y),
                            _ => packed_rows::<1, 1>(w1, w1, shape, xi, y),
                        }
                    }
                }
            });
            return;
        }
    }
    rows_kernel(w, rows, x, m, out)
}

/// `x` in the order the AVX-512 dot-order kernels read it, row after row (`m * padded_k`
/// values), or `None` where none runs: one row of `x` against any packed layout whose codes
/// come in whole vectors ([`rows_dot`]), or a few rows against 4-bit codes in groups of whole
/// 32s ([`rows_q4`]).
fn dot_input(w: &WeightRows, x: &[f32], m: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if let WeightRows::Packed {
        k,
        padded_k,
        group,
        bits,
        ..
    } = *w
    {
        // 4-bit codes are read 32 at a time, others 16
        let whole = if bits == 4 { 32 } else { 16 };
        let runs = m == 1 || bits == 4;
        if runs && group % whole == 0 && super::x86::available() {
            let shape = (k, padded_k, group, bits);
            let mut xp = vec![0.0f32; m * padded_k];
            for (row, out) in x.chunks_exact(k).zip(xp.chunks_exact_mut(padded_k)) {
                super::x86::dot_order(row, shape, out);
            }
            return Some(xp);
        }
    }
    let _ = (w, x, m);
    None
}

/// The sums of `x` over runs of 16 that the AVX-512 block kernel needs
/// ([`super::x86_blocks::run_sums`]), or `None` where it does not run: one row of `x`
/// against GGUF blocks, on AVX-512.
fn blocks_input(w: &WeightRows, x: &[f32], m: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if let WeightRows::Blocks { format, .. } = *w {
        if m == 1 && super::x86_blocks::supports(format) && super::x86::available() {
            return Some(super::x86_blocks::run_sums(x));
        }
    }
    let _ = (w, x, m);
    None
}

/// GGUF block rows `rows` against one row of `x` whose run sums `sums` [`blocks_input`]
/// gave, into `out[r - rows.start]`.
fn rows_blocks_dot(
    w: &WeightRows,
    rows: std::ops::Range<usize>,
    x: &[f32],
    sums: &[f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let WeightRows::Blocks { format, .. } = *w {
        for (o, r) in out.iter_mut().zip(rows) {
            // SAFETY: blocks_input checked AVX-512 and the format; block_row gives the row's
            // whole blocks, covering x's k values
            *o = unsafe { super::x86_blocks::block_row_dot(format, w.block_row(r), x, sums) };
        }
        return;
    }
    let _ = (w, rows, x, sums, out);
    unreachable!("blocks_input gives sums only for GGUF blocks on x86-64")
}

/// Packed weight rows `rows` against one row of `x` given as `xp` by [`dot_input`], into
/// `out[r - rows.start]`.
fn rows_dot(w: &WeightRows, rows: std::ops::Range<usize>, xp: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let WeightRows::Packed {
        padded_k,
        group,
        bits,
        ..
    } = *w
    {
        for (o, r) in out.iter_mut().zip(rows) {
            let (codes, scales) = w.packed_row(r);
            // SAFETY: dot_input checked AVX-512 and the group; whole rows; xp has padded_k
            // values
            *o = unsafe { super::x86::packed_row_dot(codes, scales, (padded_k, group, bits), xp) };
        }
        return;
    }
    let _ = (rows, xp, out);
    unreachable!("dot_input gives x only for packed rows on x86-64")
}

/// Packed 4-bit weight rows `rows` against the `m` rows of `x` given as `xp` by
/// [`dot_input`], into `out[(r - rows.start) * m + i]`: two weight rows at a time against at
/// most eight rows of `x` ([`super::x86::packed_rows_q4`]).
fn rows_q4(w: &WeightRows, rows: std::ops::Range<usize>, xp: &[f32], m: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let WeightRows::Packed {
        padded_k, group, ..
    } = *w
    {
        use super::x86::packed_rows_q4;
        let shape = (padded_k, group);
        // two weight rows at a time (then one), against at most eight rows of x at once
        drive_tiles::<2, 8>(rows, m, xp, padded_k, out, |r, take, ahead, x, y| {
            // SAFETY: dot_input checked AVX-512, 4-bit codes and groups of whole 32s;
            // packed_row gives whole rows; x holds mi rows of padded_k values in dot order
            // and y mi * take results
            unsafe {
                if take == 2 {
                    let w2 = [w.packed_row(r), w.packed_row(r + 1)];
                    let n2 = [w.packed_row(ahead), w.packed_row(ahead + 1)];
                    match y.len() / take {
                        8 => packed_rows_q4::<2, 8>(w2, n2, shape, x, y),
                        7 => packed_rows_q4::<2, 7>(w2, n2, shape, x, y),
                        6 => packed_rows_q4::<2, 6>(w2, n2, shape, x, y),
                        5 => packed_rows_q4::<2, 5>(w2, n2, shape, x, y),
                        4 => packed_rows_q4::<2, 4>(w2, n2, shape, x, y),
                        3 => packed_rows_q4::<2, 3>(w2, n2, shape, x, y),
                        2 => packed_rows_q4::<2, 2>(w2, n2, shape, x, y),
                        _ => packed_rows_q4::<2, 1>(w2, n2, shape, x, y),
                    }
                } else {
                    let w1 = [w.packed_row(r)];
                    match y.len() {
                        8 => packed_rows_q4::<1, 8>(w1, w1, shape, x, y),
                        7 => packed_rows_q4::<1, 7>(w1, w1, shape, x, y),
                        6 => packed_rows_q4::<1, 6>(w1, w1, shape, x, y),
                        5 => packed_rows_q4::<1, 5>(w1, w1, shape, x, y),
                        4 => packed_rows_q4::<1, 4>(w1, w1, shape, x, y),
                        3 => packed_rows_q4::<1, 3>(w1, w1, shape, x, y),
                        2 => packed_rows_q4::<1, 2>(w1, w1, shape, x, y),
                        _ => packed_rows_q4::<1, 1>(w1, w1, shape, x, y),
                    }
                }
            }
        });
        return;
    }
    let _ = (rows, xp, m, out);
    unreachable!("dot_input gives x for several rows only for 4-bit rows on x86-64")
}

/// Decodes weight rows `rows` into `out` (`k` values per row): the AVX-512 kernel where the
/// CPU and the layout allow, else the portable one.
fn decode_rows(w: &WeightRows, rows: std::ops::Range<usize>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let WeightRows::Packed { k, group, bits, .. } = *w {
        if group % 16 == 0 && super::x86::available() {
            for (j, r) in rows.enumerate() {
                let (codes, scales) = w.packed_row(r);
                // SAFETY: AVX-512 is available; whole rows in, k values out
                unsafe {
                    super::x86::decode_row(
                        codes,
                        scales,
                        (k, group, bits),
                        &mut out[j * k..(j + 1) * k],
                    )
                };
            }
            return;
        }
    }
    decode_kernel(w, rows, out)
}

/// `y[:, col..col + rows] = x W^T` for `x [m, k]` and the weight rows `w`, with `y` of `ldy`
/// columns, on all threads of `pool`.
pub fn linear_into(
    pool: &rayon::ThreadPool,
    w: &WeightRows,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    ldy: usize,
    col: usize,
) {
    linear_on(pool, w, (x, m), (y, ldy, col), true)
}

/// [`linear_into`], with the AVX-512 GEMM allowed or not (tests run the portable path too).
fn linear_on(
    pool: &rayon::ThreadPool,
    w: &WeightRows,
    (x, m): (&[f32], usize),
    (y, ldy, col): (&mut [f32], usize, usize),
    avx512_gemm: bool,
) {
    let (k, n) = (w.k(), w.rows());
    if m == 0 || n == 0 {
        return;
    }
    let gemm_from = match w {
        WeightRows::F32 { .. } => GEMM_MIN_ROWS,
        WeightRows::Packed { .. } | WeightRows::Blocks { .. } => PACKED_GEMM_MIN_ROWS,
    };
    if m < gemm_from {
        // rows of W in blocks over the cores; each block's results, transposed into y
        let block = n.div_ceil(pool.current_num_threads() * 8).clamp(16, 1024);
        let x_in_dot_order = dot_input(w, x, m);
        let x_run_sums = blocks_input(w, x, m);
        let results: Vec<(usize, Vec<f32>)> = pool.install(|| {
            (0..n.div_ceil(block))
                .into_par_iter()
                .map(|b| {
                    let rows = b * block..((b + 1) * block).min(n);
                    let mut out = vec![0.0; rows.len() * m];
                    match (&x_run_sums, &x_in_dot_order) {
                        (Some(sums), _) => rows_blocks_dot(w, rows.clone(), x, sums, &mut out),
                        (_, Some(xp)) if m == 1 => rows_dot(w, rows.clone(), xp, &mut out),
                        (_, Some(xp)) => rows_q4(w, rows.clone(), xp, m, &mut out),
                        (None, None) => rows_times_x(w, rows.clone(), x, m, &mut out),
                    }
                    (rows.start, out)
                })
                .collect()
        });
        for (start, out) in results {
            for (j, vals) in out.chunks_exact(m).enumerate() {
                for (i, &v) in vals.iter().enumerate() {
                    y[i * ldy + col + start + j] = v;
                }
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx512_gemm && super::x86_gemm::supports(w) {
        super::x86_gemm::linear(pool, w, x, m, y, ldy, col);
        return;
    }
    match *w {
        WeightRows::F32 { values, .. } => pool.install(|| gemm(x, m, k, values, n, y, ldy, col)),
        WeightRows::Packed { .. } | WeightRows::Blocks { .. } => {
            let panel_rows = (PANEL_VALUES / k.max(1)).clamp(16, n.max(16));
            let mut panel = vec![0.0f32; panel_rows.min(n) * k];
            for p0 in (0..n).step_by(panel_rows) {
                let rows = p0..(p0 + panel_rows).min(n);
                let count = rows.len();
                let per = count.div_ceil(pool.current_num_threads()).max(1);
                pool.install(|| {
                    panel[..count * k]
                        .par_chunks_mut(per * k)
                        .enumerate()
                        .for_each(|(c, out)| {
                            let a = p0 + c * per;
                            decode_rows(w, a..a + out.len() / k, out);
                        });
                    gemm(x, m, k, &panel[..count * k], count, y, ldy, col + p0);
                });
            }
        }
    }
}

/// `y[:, col..col + n] = x [m, k] · w [n, k]^T` by faer, on the calling rayon pool.
///
/// faer writes a contiguous `[m, n]` result; a destination with a row stride (`ldy != n`)
/// goes through a temporary, because faer 0.24's strided destinations corrupt memory here
/// (BENCHMARKS.md, "Which GEMM").
#[allow(clippy::too_many_arguments)]
fn gemm(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, y: &mut [f32], ldy: usize, col: usize) {
    use faer::{Accum, MatMut, MatRef, Par};
    let product = |dst: &mut [f32]| {
        let lhs = MatRef::from_row_major_slice(&x[..m * k], m, k);
        let rhs = MatRef::from_row_major_slice(&w[..n * k], n, k).transpose();
        let dst = MatMut::from_row_major_slice_mut(&mut dst[..m * n], m, n);
        faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::rayon(0));
    };
    if ldy == n && col == 0 {
        product(y);
    } else {
        let mut tmp = vec![0.0f32; m * n];
        product(&mut tmp);
        for (row, t) in y.chunks_mut(ldy).zip(tmp.chunks_exact(n)) {
            row[col..col + n].copy_from_slice(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cpu::weight_rows::f16_bits_to_f32;
    use crate::layout::{PackedWeight, RowFormat};
    use crate::quant::ggml::{quantize_q8_0, BlockFormat};
    use crate::quant::group4::Group4;
    use half::f16;
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
            // 4-bit codes in groups of 32: the layout of GGUF Q4_0 and Q4_1
            4 => PackedWeight::from_group4(&Group4::quantize(values, &[n, k], 1, 32).unwrap())
                .unwrap(),
            // groups of 128: the M = 1 kernel's path for groups it does not unroll
            6 => PackedWeight::from_group4(&Group4::quantize(values, &[n, k], 1, 128).unwrap())
                .unwrap(),
            // groups of 48 and 384: chunks of the AVX-512 GEMM a group wide (not dividing 256)
            7 => PackedWeight::from_group4(&Group4::quantize(values, &[n, k], 1, 48).unwrap())
                .unwrap(),
            8 => PackedWeight::from_group4(&Group4::quantize(values, &[n, k], 1, 384).unwrap())
                .unwrap(),
            // groups of 8: the one-code-at-a-time path
            5 => PackedWeight::from_group4(&Group4::quantize(values, &[n, k], 1, 8).unwrap())
                .unwrap(),
            1 => PackedWeight::from_ggml(BlockFormat::Q8_0, &quantize_q8_0(values), n, k).unwrap(),
            _ => {
                let halves: Vec<u16> = values.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
                PackedWeight::from_f16(&halves, n, k).unwrap()
            }
        }
    }

    #[test]
    fn every_half_converts_exactly() {
        for h in 0..=u16::MAX {
            let (got, want) = (f16_bits_to_f32(u32::from(h)), f16::from_bits(h).to_f32());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} vs {want}"
            );
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
            kind in 0u8..7,
            seed in 0u64..1000,
        ) {
            check_case(m, n, (k32, odd), kind, seed)?;
        }

        /// Many rows of `x` (the GEMM paths): rows of `x` in tiles of 12 with ragged ends,
        /// weight rows over several tasks of 128 with a ragged last tile, `k` over several
        /// chunks of 256 (or of a group) with a ragged end, every layout.
        #[test]
        fn many_rows_match_reference(
            m in 24usize..64,
            n in prop_oneof![1usize..40, 100usize..300],
            k32 in prop_oneof![1usize..4, 8usize..30],
            odd in 0usize..2,
            kind in 0u8..9,
            seed in 0u64..1000,
        ) {
            check_case(m, n, (k32, odd), kind, seed)?;
        }

        /// A few rows of `x` (decode's batches) against 4-bit codes in groups of 32, 64 and
        /// 128 (the dot-order kernel: two weight rows at a time, up to eight rows of `x` per
        /// pass, then the rest), odd and even weight rows, rows long enough for more than 16
        /// groups (scales converted 16 at a time) and ragged ends.
        #[test]
        fn few_rows_of_4_bit_codes_match_reference(
            m in 2usize..24,
            n in 1usize..20,
            k32 in prop_oneof![1usize..4, 17usize..40],
            odd in 0usize..2,
            kind in prop::sample::select(vec![0u8, 4, 6]),
            seed in 0u64..1000,
        ) {
            check_case(m, n, (k32, odd), kind, seed)?;
        }

        /// One row of `x` (decode), every packed layout, rows long enough for more than 16
        /// groups (the M = 1 kernel converts scales 16 groups at a time) and ragged ends.
        #[test]
        fn one_row_matches_reference(
            n in 1usize..40,
            k32 in 1usize..70,
            odd in 0usize..2,
            kind in prop::sample::select(vec![0u8, 1, 2, 4, 6]),
            seed in 0u64..1000,
        ) {
            check_case(1, n, (k32, odd), kind, seed)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// GGUF blocks kept as stored (K-quants, Q5_0/Q5_1, IQ4): decode (one row of `x`, a
        /// few) and prefill shapes (the GEMM paths), odd row counts, rows of one or several
        /// blocks: equal to the f64 product with the weight as the blocks decode.
        #[test]
        fn gguf_blocks_match_reference(
            m in prop_oneof![1usize..3, 3usize..12, 24usize..50],
            n in 1usize..70,
            blocks in 1usize..5,
            format in prop::sample::select(vec![
                BlockFormat::Q5_0, BlockFormat::Q5_1, BlockFormat::Iq4Nl, BlockFormat::Q2K,
                BlockFormat::Q3K, BlockFormat::Q4K, BlockFormat::Q5K, BlockFormat::Q6K,
                BlockFormat::Iq4Xs,
            ]),
            seed in 0u64..1000,
        ) {
            let k = blocks * format.block_len();
            let bytes = crate::quant::ggml::random_blocks(format, n * blocks, seed);
            let mut w_ref = vec![0.0f32; n * k];
            format.decode(&bytes, &mut w_ref);
            let (row, segs) = crate::layout::rows::as_blocks(format, &bytes, n, k);
            let words: Vec<u32> = bytemuck::pod_collect_to_vec(&segs[0]);
            let w = WeightRows::new(row, &[&words]);
            prop_assert_eq!(w.rows(), n);
            let val = |i: usize| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0;
            let x: Vec<f32> = (0..m * k).map(|i| val(i + 77)).collect();
            check_linear(&w, &w_ref, &x, (m, n, k))?;
        }
    }

    /// A weight of `kind` ([`packed`]'s, 3 for f32) `[n, k]` with `k = 32 k32` (less 7 when
    /// `odd`, except for Q8_0, which needs whole blocks of 32) and `m` rows of `x`, both
    /// drawn from `seed`: [`check_linear`].
    fn check_case(
        m: usize,
        n: usize,
        (k32, odd): (usize, usize),
        kind: u8,
        seed: u64,
    ) -> Result<(), TestCaseError> {
        // Q8_0 needs whole blocks of 32; the others take any k
        let k = if kind == 1 {
            32 * k32
        } else {
            32 * k32 - odd * 7
        };
        let val = |i: usize| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0;
        let wv: Vec<f32> = (0..n * k).map(val).collect();
        let x: Vec<f32> = (0..m * k).map(|i| val(i + 77)).collect();
        let (w_ref, rows_fmt, segs): (Vec<f32>, RowFormat, Vec<Vec<u32>>) = if kind == 3 {
            (
                wv.clone(),
                RowFormat::F32 { k },
                vec![bytemuck::cast_slice(&wv).to_vec()],
            )
        } else {
            let p = packed(kind, &wv, n, k);
            (
                p.dequantize(),
                RowFormat::Packed {
                    k,
                    padded_k: p.padded_k,
                    group: p.group,
                    bits: p.bits,
                },
                vec![p.codes.clone(), p.scales.clone()],
            )
        };
        let views: Vec<&[u32]> = segs.iter().map(|s| s.as_slice()).collect();
        let w = WeightRows::new(rows_fmt, &views);
        prop_assert_eq!(w.rows(), n);
        check_linear(&w, &w_ref, &x, (m, n, k))?;
        Ok(())
    }

    /// `linear_into` of `w` (whose values are `w_ref`) and `x`, written at a column offset,
    /// against the f64 product; the columns around it untouched.
    fn check_linear(
        w: &WeightRows,
        w_ref: &[f32],
        x: &[f32],
        (m, n, k): (usize, usize, usize),
    ) -> Result<(), TestCaseError> {
        let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
        let want = reference(w_ref, x, m, n, k);
        // the AVX-512 GEMM where it runs, and the portable path (faer's GEMM)
        for avx512_gemm in [true, false] {
            check_linear_on(&pool, w, x, (m, n, k), &want, avx512_gemm)?;
        }
        Ok(())
    }

    /// One path of [`check_linear`].
    fn check_linear_on(
        pool: &rayon::ThreadPool,
        w: &WeightRows,
        x: &[f32],
        (m, n, k): (usize, usize, usize),
        want: &[f32],
        avx512_gemm: bool,
    ) -> Result<(), TestCaseError> {
        let (col, ldy) = (3, n + 5);
        let mut y = vec![f32::NAN; m * ldy];
        linear_on(pool, w, (x, m), (&mut y, ldy, col), avx512_gemm);
        for i in 0..m {
            for j in (0..col).chain(col + n..ldy) {
                prop_assert!(
                    y[i * ldy + j].is_nan(),
                    "m {m} n {n} k {k} (AVX-512 GEMM {avx512_gemm}): wrote y[{i}, {j}]"
                );
            }
            for j in 0..n {
                let (g, e) = (y[i * ldy + col + j], want[i * n + j]);
                prop_assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()) * (k as f32).sqrt(),
                    "m {m} n {n} k {k} (AVX-512 GEMM {avx512_gemm}): y[{i},{j}] = {g}, want {e}"
                );
            }
        }
        Ok(())
    }
}
