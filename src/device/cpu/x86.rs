//! AVX-512 versions of the packed-weight inner loops (decode-and-multiply for few rows of
//! `x`, decode into a panel for many), written with intrinsics because the compiler turns the
//! portable versions' code unpacking into gathers and scalar multiply-adds. Callers check
//! [`available`] first; elsewhere the portable loops in `matmul` run.
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
    let p = words.as_ptr().add(at * BITS / 32);
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

/// Columns `at..end` (at most 16) as a lane mask.
#[inline]
fn mask(at: usize, end: usize) -> __mmask16 {
    ((1u32 << (end - at).min(16)) - 1) as __mmask16
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
    match bits {
        4 => decode_row_bits::<4>(codes, scales, (k, group), out),
        8 => decode_row_bits::<8>(codes, scales, (k, group), out),
        _ => decode_row_bits::<16>(codes, scales, (k, group), out),
    }
}

/// [`decode_row`] for codes of `BITS` bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn decode_row_bits<const BITS: usize>(
    codes: &[u32],
    scales: &[u32],
    (k, group): (usize, usize),
    out: &mut [f32],
) {
    debug_assert!(out.len() >= k && group % 16 == 0);
    let op = out.as_mut_ptr();
    for (g, &sw) in scales.iter().enumerate() {
        let (step, min) = scale(sw);
        let end = ((g + 1) * group).min(k);
        let mut at = g * group;
        while at < end {
            let w = _mm512_fmadd_ps(codes16::<BITS>(codes, at), step, min);
            _mm512_mask_storeu_ps(op.add(at), mask(at, end), w);
            at += 16;
        }
    }
}
