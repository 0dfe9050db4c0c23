//! AVX-512 versions of the packed-weight inner loops (a row's dot product with one row of
//! `x`, decode-and-multiply for a few rows, decode into a panel for many), written with
//! intrinsics because the compiler turns the portable versions' code unpacking into gathers
//! and scalar multiply-adds. Callers check [`available`] first; elsewhere the portable loops
//! in `matmul` run.
//!
//! Codes `at..at + 16` of a row (`at` a multiple of 16) are 8 bytes of nibbles (code `c` in
//! the low nibble of byte `c / 2` when even, the high one when odd), 16 bytes, or 16 IEEE
//! halves; they widen to 16 f32 lanes, which become weights by one multiply-add
//! `code * step + min` with the group's `(step, min)` (two halves of one scale word).

use std::arch::x86_64::*;

/// Whether this CPU runs the AVX-512 kernels.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("f16c")
}

/// The 16 codes at `at` of a row's code words, as f32 (not yet scaled).
///
/// # Safety
/// AVX-512 is available, and `words` holds the codes `at..at + 16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn codes16<const BITS: usize>(words: &[u32], at: usize) -> __m512 {
    debug_assert!((at + 16) * BITS / 32 <= words.len());
    codes16_at::<BITS>(words.as_ptr().cast::<u8>().add(at * BITS / 8))
}

/// The 16 codes whose bytes start at `p`, as f32 (not yet scaled).
///
/// # Safety
/// AVX-512 is available, and `p` points to the 16 codes' `2 * BITS` bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn codes16_at<const BITS: usize>(p: *const u8) -> __m512 {
    match BITS {
        4 => {
            let b = _mm_loadl_epi64(p.cast());
            let nibble = _mm_set1_epi8(15);
            let lo = _mm_and_si128(b, nibble);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), nibble);
            // lo0 hi0 lo1 hi1 ...: the 16 codes in order, one per byte
            let q = _mm_unpacklo_epi8(lo, hi);
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q))
        }
        8 => _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()))),
        _ => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
    }
}

/// `(step, min)` of a scale word, broadcast.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn scale(word: u32) -> (__m512, __m512) {
    let pair = _mm_cvtph_ps(_mm_cvtsi32_si128(word as i32));
    (
        _mm512_broadcastss_ps(pair),
        _mm512_broadcastss_ps(_mm_movehdup_ps(pair)),
    )
}

/// Columns `at..end` (at most 16; none when `end <= at`) as a lane mask.
#[inline]
pub(super) fn mask(at: usize, end: usize) -> __mmask16 {
    ((1u32 << end.saturating_sub(at).min(16)) - 1) as __mmask16
}

/// Weight rows held as packed codes: per row, its code words and scale words.
pub type PackedRows<'a, const R: usize> = [(&'a [u32], &'a [u32]); R];

/// `R` packed rows (`k` values each in groups of `group`, a multiple of 16, `bits` per code)
/// against `M` rows of `x [M, k]`: `y[i * R + r] = sum_c x[i, c] (q_rc step_rg + min_rg)`.
/// Each 16 codes of a weight row are decoded once for all `M` rows of `x`, and each 16 of
/// `x` loaded once for all `R` weight rows, into `R * M` accumulators of 16 lanes (so that
/// many multiply-add chains run at once) summed at the end.
///
/// # Safety
/// AVX-512 is available; every row's codes and scales are whole rows; `x` has `M * k` values
/// and `y` at least `M * R`; `next` holds whole rows too (or empty ones, to prefetch nothing).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub unsafe fn packed_rows<const R: usize, const M: usize>(
    rows: PackedRows<'_, R>,
    next: PackedRows<'_, R>,
    (k, group, bits): (usize, usize, u32),
    x: &[f32],
    y: &mut [f32],
) {
    match bits {
        4 => packed_rows_bits::<R, M, 4>(rows, next, (k, group), x, y),
        8 => packed_rows_bits::<R, M, 8>(rows, next, (k, group), x, y),
        _ => packed_rows_bits::<R, M, 16>(rows, next, (k, group), x, y),
    }
}

/// [`packed_rows`] for codes of `BITS` bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn packed_rows_bits<const R: usize, const M: usize, const BITS: usize>(
    rows: PackedRows<'_, R>,
    next: PackedRows<'_, R>,
    (k, group): (usize, usize),
    x: &[f32],
    y: &mut [f32],
) {
    debug_assert!(x.len() >= M * k && y.len() >= M * R && group % 16 == 0);
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let xp = x.as_ptr();
    let groups = k.div_ceil(group);
    for g in 0..groups {
        let mut scales = [(_mm512_setzero_ps(), _mm512_setzero_ps()); R];
        for (sc, (_, s)) in scales.iter_mut().zip(&rows) {
            *sc = scale(s[g]);
        }
        // the rows after these, a group ahead of time: short rows end before the hardware
        // prefetcher has seen their streams
        for (codes, scales) in &next {
            let c = codes.as_ptr().add(g * group * BITS / 32);
            for line in (0..group * BITS / 8).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(c.cast::<i8>().add(line));
            }
            if g % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(scales.as_ptr().add(g).cast());
            }
        }
        let end = ((g + 1) * group).min(k);
        let mut at = g * group;
        while at < end {
            let m = mask(at, end);
            let mut xs = [_mm512_setzero_ps(); M];
            for (i, xv) in xs.iter_mut().enumerate() {
                // lanes past k (the row's last columns) read nothing
                *xv = _mm512_maskz_loadu_ps(m, xp.add(i * k + at));
            }
            for r in 0..R {
                let (step, min) = scales[r];
                let w = _mm512_fmadd_ps(codes16::<BITS>(rows[r].0, at), step, min);
                for i in 0..M {
                    acc[r][i] = _mm512_fmadd_ps(w, xs[i], acc[r][i]);
                }
            }
            at += 16;
        }
    }
    for r in 0..R {
        for i in 0..M {
            y[i * R + r] = _mm512_reduce_add_ps(acc[r][i]);
        }
    }
}

/// Decodes a packed row into `out[..k]`: `q_c step + min`.
///
/// # Safety
/// AVX-512 is available; `codes` and `scales` hold a whole row; `out` has at least `k`
/// values and `group` is a multiple of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub unsafe fn decode_row(
    codes: &[u32],
    scales: &[u32],
    (k, group, bits): (usize, usize, u32),
    out: &mut [f32],
) {
    decode_cols(codes, scales, (0, group, bits), &mut out[..k]);
}

/// Decodes columns `c0..c0 + out.len()` of a packed row into `out`: `q_c step + min`.
///
/// # Safety
/// AVX-512 is available; `codes` and `scales` hold a whole row, the columns lie within it,
/// `group` is a multiple of 16 and `c0` a multiple of `group`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub unsafe fn decode_cols(
    codes: &[u32],
    scales: &[u32],
    (c0, group, bits): (usize, usize, u32),
    out: &mut [f32],
) {
    match bits {
        4 => decode_cols_bits::<4>(codes, scales, (c0, group), out),
        8 => decode_cols_bits::<8>(codes, scales, (c0, group), out),
        _ => decode_cols_bits::<16>(codes, scales, (c0, group), out),
    }
}

/// [`decode_cols`] for codes of `BITS` bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn decode_cols_bits<const BITS: usize>(
    codes: &[u32],
    scales: &[u32],
    (c0, group): (usize, usize),
    out: &mut [f32],
) {
    debug_assert!(group % 16 == 0 && c0 % group == 0);
    let end = c0 + out.len();
    let op = out.as_mut_ptr();
    let mut g = c0 / group;
    while g * group < end {
        let (step, min) = scale(scales[g]);
        let group_end = ((g + 1) * group).min(end);
        let mut at = g * group;
        while at < group_end {
            let w = _mm512_fmadd_ps(codes16::<BITS>(codes, at), step, min);
            _mm512_mask_storeu_ps(op.add(at - c0), mask(at, group_end), w);
            at += 16;
        }
        g += 1;
    }
}

/// The order [`packed_row_dot`] reads `x` in for codes of `bits` bits in groups of `group`:
/// `xp[i]` is `x[order(i)]`, zero past `k`, written into the first `padded_k` values of `xp`.
///
/// 4-bit codes in groups that are whole blocks of 32 are widened a byte (two codes) per lane,
/// the low nibbles (codes `2j`) of a block's 16 bytes in one vector and the high ones (codes
/// `2j + 1`) in the next, so `x` is split the same way: within each block of 32, the 16
/// even-indexed values, then the 16 odd-indexed ones. Other layouts read `x` in order.
pub fn dot_order(
    x: &[f32],
    (k, padded_k, group, bits): (usize, usize, usize, u32),
    xp: &mut [f32],
) {
    let xp = &mut xp[..padded_k];
    if bits == 4 && group % 32 == 0 {
        let whole = k / 32;
        for (b, block) in xp.chunks_exact_mut(32).enumerate() {
            let (even, odd) = block.split_at_mut(16);
            if b < whole {
                // block b, lane j: codes 32b + 2j (low nibble) and 32b + 2j + 1 (high nibble)
                let xs = &x[32 * b..32 * b + 32];
                for j in 0..16 {
                    even[j] = xs[2 * j];
                    odd[j] = xs[2 * j + 1];
                }
            } else {
                for j in 0..16 {
                    let (e, o) = (32 * b + 2 * j, 32 * b + 2 * j + 1);
                    even[j] = if e < k { x[e] } else { 0.0 };
                    odd[j] = if o < k { x[o] } else { 0.0 };
                }
            }
        }
    } else {
        xp[..k].copy_from_slice(&x[..k]);
        xp[k..].fill(0.0);
    }
}

/// How far ahead of its reads [`packed_row_dot`] asks for a row's code bytes: one row of `x`
/// leaves few instructions per byte, and the hardware prefetcher alone kept the two cores
/// at about half the memory's read rate (BENCHMARKS.md, "b"); 2 and 8 KiB measured alike.
const PREFETCH_BYTES: usize = 8192;

/// One packed row against one row of `x` (M = 1, decode): `sum_c x[c] (q_c step_g + min_g)`,
/// with `xp` the row of `x` in [`dot_order`] (`padded_k` values, zero past `k`).
///
/// Made to stream a row's bytes at memory speed with few instructions per code: the row's
/// scale words are converted 16 at a time into f32 steps and mins; a 4-bit group's 16
/// possible weights `q step + min` are one vector (a look-up table, built by one multiply-add
/// per group), so each 16 codes cost a widening, a permute and a multiply-add; 8- and 16-bit
/// codes are widened and converted, scaled by one multiply-add, and accumulated by another.
///
/// # Safety
/// AVX-512 is available; `codes` and `scales` hold one whole row of `padded_k` codes in
/// groups of `group` (a multiple of 16; of 32 for 4-bit codes); `xp` has `padded_k` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub unsafe fn packed_row_dot(
    codes: &[u32],
    scales: &[u32],
    (padded_k, group, bits): (usize, usize, u32),
    xp: &[f32],
) -> f32 {
    let shape = (padded_k, group);
    // the groups of the GGUF blocks (32) and of FlexGen's and the f16 layout (64) unrolled
    match (bits, group) {
        (4, 32) => row_dot_q4_32(codes, scales, padded_k, xp),
        (4, 64) => row_dot_bits::<4, 64>(codes, scales, shape, xp),
        (4, _) => row_dot_bits::<4, 0>(codes, scales, shape, xp),
        (8, 32) => row_dot_bits::<8, 32>(codes, scales, shape, xp),
        (8, _) => row_dot_bits::<8, 0>(codes, scales, shape, xp),
        (_, 64) => row_dot_bits::<16, 64>(codes, scales, shape, xp),
        _ => row_dot_bits::<16, 0>(codes, scales, shape, xp),
    }
}

/// [`packed_row_dot`] for codes of `BITS` bits in groups of `GROUP` (0: of `group`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn row_dot_bits<const BITS: usize, const GROUP: usize>(
    codes: &[u32],
    scales: &[u32],
    (padded_k, group): (usize, usize),
    xp: &[f32],
) -> f32 {
    let group = if GROUP > 0 { GROUP } else { group };
    let groups = padded_k / group;
    debug_assert!(scales.len() >= groups && codes.len() * 32 >= padded_k * BITS);
    debug_assert!(xp.len() >= padded_k && group % if BITS == 4 { 32 } else { 16 } == 0);
    let (cp, xq) = (codes.as_ptr().cast::<u8>(), xp.as_ptr());
    let [mut acc0, mut acc1, mut acc2, mut acc3] = [_mm512_setzero_ps(); 4];
    let (mut steps, mut mins) = ([0.0f32; 16], [0.0f32; 16]);
    for g0 in (0..groups).step_by(16) {
        scales16(scales, (g0, groups), (&mut steps, &mut mins));
        // two groups at a time, into two pairs of sums (each sum's multiply-adds then wait
        // for one another half as often)
        let count = (groups - g0).min(16);
        for j in (0..count).step_by(2) {
            let start = (g0 + j) * group;
            let (step, min) = (_mm512_set1_ps(steps[j]), _mm512_set1_ps(mins[j]));
            group_dot::<BITS>(
                (cp, xq),
                start..start + group,
                (step, min),
                [&mut acc0, &mut acc1],
            );
            if j + 1 < count {
                let (step, min) = (_mm512_set1_ps(steps[j + 1]), _mm512_set1_ps(mins[j + 1]));
                let at = start + group;
                group_dot::<BITS>(
                    (cp, xq),
                    at..at + group,
                    (step, min),
                    [&mut acc2, &mut acc3],
                );
            }
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(acc0, acc1),
        _mm512_add_ps(acc2, acc3),
    ))
}

/// [`row_dot_bits`] for 4-bit codes in groups of 32 (the GGUF Q4_0 and Q4_1 blocks): a
/// group is only 16 bytes of codes, so the per-group work is hoisted into steps of four groups
/// (one 64-byte line of codes, one prefetch), each group into its own pair of sums.
///
/// # Safety
/// As [`packed_row_dot`], with `group` 32 and 4-bit codes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn row_dot_q4_32(codes: &[u32], scales: &[u32], padded_k: usize, xp: &[f32]) -> f32 {
    let groups = padded_k / 32;
    debug_assert!(scales.len() >= groups && codes.len() * 8 >= padded_k);
    debug_assert!(xp.len() >= padded_k && padded_k.is_multiple_of(32));
    let (cp, xq) = (codes.as_ptr().cast::<u8>(), xp.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 8];
    let (mut steps, mut mins) = ([0.0f32; 16], [0.0f32; 16]);
    for g0 in (0..groups).step_by(16) {
        scales16(scales, (g0, groups), (&mut steps, &mut mins));
        let count = (groups - g0).min(16);
        for j in (0..count).step_by(4) {
            // codes of groups g0 + j .. + 4: bytes 16 (g0 + j) .. + 64, one line
            let line = (g0 + j) * 16;
            _mm_prefetch::<_MM_HINT_T0>(cp.add(line + PREFETCH_BYTES).cast());
            for u in 0..4.min(count - j) {
                let (step, min) = (steps[j + u], mins[j + u]);
                let table = weight_table(_mm512_set1_ps(step), _mm512_set1_ps(min));
                // byte i of the group, one per lane: code 2i in its low nibble, 2i + 1 in
                // the high one; x in dot_order (the group's 16 even, then 16 odd values)
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(cp.add(line + 16 * u).cast()));
                let at = (g0 + j + u) * 32;
                let even = _mm512_permutexvar_ps(b, table);
                let odd = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b), table);
                acc[2 * u] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xq.add(at)), acc[2 * u]);
                acc[2 * u + 1] =
                    _mm512_fmadd_ps(odd, _mm512_loadu_ps(xq.add(at + 16)), acc[2 * u + 1]);
            }
        }
    }
    let pairs = [0, 2, 4, 6].map(|i| _mm512_add_ps(acc[i], acc[i + 1]));
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(pairs[0], pairs[1]),
        _mm512_add_ps(pairs[2], pairs[3]),
    ))
}

/// `R` packed rows of 4-bit codes (groups of `group`, a multiple of 32) against `M` rows of
/// `x` in [`dot_order`] (`xp[i * padded_k ..]` is row `i`): `y[i * R + r] = sum_c x[i, c]
/// (q_rc step_rg + min_rg)`. A few rows of `x` (decode's batches): each 32 codes of a weight
/// row are decoded once, by [`packed_row_dot`]'s look-up table (a widening, a shift and two
/// permutes, no conversion), for all `M` rows of `x`, into `R * M` accumulators.
///
/// Per 32 codes the vector units do `R (4 + 32 / group)` decoding operations (widen, shift,
/// two permutes, a table per group) and `2 R M` multiply-adds; with `R = 2, M = 8` and groups
/// of 32 that is 42 operations for 1024 flops, where [`packed_rows`] needs about 80.
///
/// # Safety
/// AVX-512 is available; every row's codes and scales are whole rows of `padded_k` codes;
/// `group` is a multiple of 32; `xp` has `M * padded_k` values and `y` at least `M * R`;
/// `next` holds whole rows too (or the same rows, to prefetch what is already near).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
#[allow(clippy::needless_range_loop)] // `i` indexes x's rows and the accumulators alike
pub unsafe fn packed_rows_q4<const R: usize, const M: usize>(
    rows: PackedRows<'_, R>,
    next: PackedRows<'_, R>,
    (padded_k, group): (usize, usize),
    xp: &[f32],
    y: &mut [f32],
) {
    debug_assert!(group % 32 == 0 && padded_k.is_multiple_of(group));
    debug_assert!(xp.len() >= M * padded_k && y.len() >= M * R);
    let groups = padded_k / group;
    let xq = xp.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let (mut steps, mut mins) = ([[0.0f32; 16]; R], [[0.0f32; 16]; R]);
    for g in 0..groups {
        if g % 16 == 0 {
            for r in 0..R {
                scales16(rows[r].1, (g, groups), (&mut steps[r], &mut mins[r]));
            }
        }
        let mut tables = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let (step, min) = (steps[r][g % 16], mins[r][g % 16]);
            tables[r] = weight_table(_mm512_set1_ps(step), _mm512_set1_ps(min));
        }
        // the rows after these, a group ahead: short rows end before the hardware prefetcher
        // has seen their streams
        for (codes, scales) in &next {
            let c = codes.as_ptr().cast::<u8>().add(g * group / 2);
            for line in (0..group / 2).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(c.add(line).cast());
            }
            if g % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(scales.as_ptr().add(g).cast());
            }
        }
        for at in (g * group..(g + 1) * group).step_by(32) {
            // per weight row: byte j of codes at..at + 32 in lane j, code at + 2j in its low
            // nibble and at + 2j + 1 in its high one; the permute reads the low 4 bits
            let mut even = [_mm512_setzero_ps(); R];
            let mut odd = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let cp = rows[r].0.as_ptr().cast::<u8>().add(at / 2);
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(cp.cast()));
                even[r] = _mm512_permutexvar_ps(b, tables[r]);
                odd[r] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b), tables[r]);
            }
            for i in 0..M {
                // row i of x at..at + 32 in dot order: the 16 even columns, then the 16 odd
                let xe = _mm512_loadu_ps(xq.add(i * padded_k + at));
                let xo = _mm512_loadu_ps(xq.add(i * padded_k + at + 16));
                for r in 0..R {
                    acc[r][i] = _mm512_fmadd_ps(even[r], xe, acc[r][i]);
                    acc[r][i] = _mm512_fmadd_ps(odd[r], xo, acc[r][i]);
                }
            }
        }
    }
    for r in 0..R {
        for i in 0..M {
            y[i * R + r] = _mm512_reduce_add_ps(acc[r][i]);
        }
    }
}

/// The scale words of groups `g0 .. g0 + 16` (fewer at `groups`, the row's end) as f32 steps
/// (each word's low half) and mins (its high half), into `steps` and `mins`.
///
/// # Safety
/// AVX-512 is available; `scales` holds `groups` words.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn scales16(
    scales: &[u32],
    (g0, groups): (usize, usize),
    (steps, mins): (&mut [f32; 16], &mut [f32; 16]),
) {
    let words = _mm512_maskz_loadu_epi32(mask(g0, groups), scales.as_ptr().add(g0).cast());
    _mm_prefetch::<_MM_HINT_T0>(scales.as_ptr().add(g0 + 64).cast());
    let low = _mm512_cvtepi32_epi16(words);
    let high = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(words));
    _mm512_storeu_ps(steps.as_mut_ptr(), _mm512_cvtph_ps(low));
    _mm512_storeu_ps(mins.as_mut_ptr(), _mm512_cvtph_ps(high));
}

/// A 4-bit group's 16 possible weights, `table[q] = q step + min`: a permute then picks a lane
/// by the low 4 bits of its index.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn weight_table(step: __m512, min: __m512) -> __m512 {
    let iota = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    _mm512_fmadd_ps(iota, step, min)
}

/// One group's codes `codes` of a row against `x` in [`dot_order`], added into `acc`.
///
/// # Safety
/// AVX-512 is available; the row's code bytes at `cp` and `xq` cover the group.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn group_dot<const BITS: usize>(
    (cp, xq): (*const u8, *const f32),
    codes: std::ops::Range<usize>,
    (step, min): (__m512, __m512),
    [acc0, acc1]: [&mut __m512; 2],
) {
    if BITS == 4 {
        let table = weight_table(step, min);
        for at in codes.step_by(32) {
            // bytes at / 2 .. at / 2 + 16, one per lane: code at + 2j in the low nibble of
            // lane j, code at + 2j + 1 in the high one
            _mm_prefetch::<_MM_HINT_T0>(cp.add(at / 2 + PREFETCH_BYTES).cast());
            let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(cp.add(at / 2).cast()));
            let even = _mm512_permutexvar_ps(b, table);
            let odd = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b), table);
            *acc0 = _mm512_fmadd_ps(even, _mm512_loadu_ps(xq.add(at)), *acc0);
            *acc1 = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xq.add(at + 16)), *acc1);
        }
    } else {
        let end = codes.end;
        for at in codes.step_by(32) {
            // codes at..at + 32 in two vectors of 16 (the second only in groups of 32s)
            _mm_prefetch::<_MM_HINT_T0>(cp.add(at * BITS / 8 + PREFETCH_BYTES).cast());
            let w0 = _mm512_fmadd_ps(codes16_at::<BITS>(cp.add(at * BITS / 8)), step, min);
            *acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xq.add(at)), *acc0);
            if at + 16 < end {
                let c1 = cp.add((at + 16) * BITS / 8);
                let w1 = _mm512_fmadd_ps(codes16_at::<BITS>(c1), step, min);
                *acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xq.add(at + 16)), *acc1);
            }
        }
    }
}
