//! AVX-512 kernels for one row of `x` (decode) against weights kept as GGUF blocks.
//!
//! Every block format splits a block into runs of 16 values that share one scale: value `i`
//! of run `j` is `q * dl_j - ml_j`. So a row's dot product with `x` is
//!
//! `sum_j dl_j * sum_i q_i x_i - sum_j ml_j * xsum_j`,
//!
//! with `xsum_j` the sum of `x` over run `j`, computed once per call for all rows
//! ([`run_sums`]). Per 16 values the kernel widens the codes' bytes, picks their bits,
//! converts them to f32 (or looks IQ4's levels up with one permute), and does one multiply
//! and one multiply-add; the minimums cost one multiply-add per block.

use std::arch::x86_64::*;

use super::weight_rows::f16_bits_to_f32;
use crate::layout::PackedWeight;
use crate::quant::ggml::BlockFormat;
use crate::quant::kquant::{scale_min_k4, IQ4_LEVELS_F32};

/// How far ahead of the block being read the next bytes are prefetched.
const PREFETCH_BYTES: usize = 4096;

/// Sums of `x` over each run of 16 values (`x.len()` a multiple of 16).
pub fn run_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(16).map(|c| c.iter().sum()).collect()
}

/// Whether [`block_row_dot`] runs `format`: every format kept as blocks (those the packed
/// layout does not take).
pub fn supports(format: BlockFormat) -> bool {
    !PackedWeight::repacks(format)
}

/// One row of blocks of `format` against `x` (the row's `k` values), `xsum` its
/// [`run_sums`].
///
/// # Safety
/// AVX-512 (F, BW, VL) and F16C are available; `row` is whole blocks of `format` covering
/// `x.len()` values; `format` is one [`supports`] allows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub unsafe fn block_row_dot(format: BlockFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    match format {
        BlockFormat::Q4K => row_dot::<Q4K>(row, x, xsum),
        BlockFormat::Q5K => row_dot::<Q5K>(row, x, xsum),
        BlockFormat::Q6K => row_dot::<Q6K>(row, x, xsum),
        BlockFormat::Iq4Xs => row_dot::<Iq4Xs>(row, x, xsum),
        BlockFormat::Q2K => row_dot::<Q2K>(row, x, xsum),
        BlockFormat::Q3K => row_dot::<Q3K>(row, x, xsum),
        BlockFormat::Q5_0 => row_dot::<Q5_0>(row, x, xsum),
        BlockFormat::Q5_1 => row_dot::<Q5_1>(row, x, xsum),
        BlockFormat::Iq4Nl => row_dot::<Iq4Nl>(row, x, xsum),
        _ => unreachable!("{format:?} is repacked, never kept as blocks"),
    }
}

/// A block format as runs of 16 values.
trait Runs {
    /// Values and bytes per block.
    const LEN: usize;
    const BYTES: usize;
    /// `(dl_j, ml_j)` of every run of the block at `b` into `dl` and `ml`.
    unsafe fn scales(b: *const u8, dl: &mut [f32; 16], ml: &mut [f32; 16]);
    /// The 16 code values `q` of run `j`.
    unsafe fn codes(b: *const u8, j: usize) -> __m512;
}

/// [`block_row_dot`] for one format.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn row_dot<F: Runs>(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let runs = F::LEN / 16;
    debug_assert!(row.len() * F::LEN >= x.len() * F::BYTES && xsum.len() * 16 >= x.len());
    let [mut acc0, mut acc1, mut accm] = [_mm512_setzero_ps(); 3];
    let mut mins = 0.0f32;
    let (mut dl, mut ml) = ([0.0f32; 16], [0.0f32; 16]);
    for b in 0..x.len() / F::LEN {
        let block = row.as_ptr().add(b * F::BYTES);
        _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_BYTES).cast());
        F::scales(block, &mut dl, &mut ml);
        let xb = x.as_ptr().add(b * F::LEN);
        for j in (0..runs).step_by(2) {
            let t0 = _mm512_mul_ps(F::codes(block, j), _mm512_loadu_ps(xb.add(16 * j)));
            acc0 = _mm512_fmadd_ps(t0, _mm512_set1_ps(dl[j]), acc0);
            let t1 = _mm512_mul_ps(F::codes(block, j + 1), _mm512_loadu_ps(xb.add(16 * j + 16)));
            acc1 = _mm512_fmadd_ps(t1, _mm512_set1_ps(dl[j + 1]), acc1);
        }
        if runs == 16 {
            let xs = _mm512_loadu_ps(xsum.as_ptr().add(16 * b));
            accm = _mm512_fmadd_ps(_mm512_loadu_ps(ml.as_ptr()), xs, accm);
        } else {
            for j in 0..runs {
                mins += ml[j] * xsum[b * runs + j];
            }
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - mins - _mm512_reduce_add_ps(accm)
}

#[inline(always)]
unsafe fn half(b: *const u8, at: usize) -> f32 {
    f16_bits_to_f32(u32::from(u16::from_le_bytes([*b.add(at), *b.add(at + 1)])))
}

/// 16 bytes at `p`, widened to 32-bit lanes.
#[inline(always)]
unsafe fn bytes16(p: *const u8) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()))
}

/// `(v >> shift) & mask` per lane.
#[inline(always)]
unsafe fn bits(v: __m512i, shift: usize, mask: i32) -> __m512i {
    _mm512_and_si512(
        _mm512_srlv_epi32(v, _mm512_set1_epi32(shift as i32)),
        _mm512_set1_epi32(mask),
    )
}

/// IQ4's level for each lane's nibble.
#[inline(always)]
unsafe fn iq4_levels(nib: __m512i) -> __m512 {
    _mm512_permutexvar_ps(nib, _mm512_loadu_ps(IQ4_LEVELS_F32.as_ptr()))
}

struct Q4K;
impl Runs for Q4K {
    const LEN: usize = 256;
    const BYTES: usize = 144;
    #[inline(always)]
    unsafe fn scales(b: *const u8, dl: &mut [f32; 16], ml: &mut [f32; 16]) {
        let (d, dmin) = (half(b, 0), half(b, 2));
        let packed = std::slice::from_raw_parts(b.add(4), 12);
        for s in 0..8 {
            let (sc, m) = scale_min_k4(s, packed);
            let (dls, mls) = (d * f32::from(sc), dmin * f32::from(m));
            dl[2 * s..2 * s + 2].fill(dls);
            ml[2 * s..2 * s + 2].fill(mls);
        }
    }
    #[inline(always)]
    unsafe fn codes(b: *const u8, j: usize) -> __m512 {
        // run j: sub-block s = j / 2, half j % 2 of its 32 values
        let s = j / 2;
        let v = bytes16(b.add(16 + 32 * (s / 2) + 16 * (j % 2)));
        _mm512_cvtepi32_ps(bits(v, 4 * (s % 2), 15))
    }
}

struct Q5K;
impl Runs for Q5K {
    const LEN: usize = 256;
    const BYTES: usize = 176;
    #[inline(always)]
    unsafe fn scales(b: *const u8, dl: &mut [f32; 16], ml: &mut [f32; 16]) {
        Q4K::scales(b, dl, ml)
    }
    #[inline(always)]
    unsafe fn codes(b: *const u8, j: usize) -> __m512 {
        let s = j / 2;
        let low = bits(
            bytes16(b.add(48 + 32 * (s / 2) + 16 * (j % 2))),
            4 * (s % 2),
            15,
        );
        let high = bits(bytes16(b.add(16 + 16 * (j % 2))), s, 1);
        _mm512_cvtepi32_ps(_mm512_or_si512(low, _mm512_slli_epi32::<4>(high)))
    }
}

struct Q6K;
impl Runs for Q6K {
    const LEN: usize = 256;
    const BYTES: usize = 210;
    #[inline(always)]
    unsafe fn scales(b: *const u8, dl: &mut [f32; 16], ml: &mut [f32; 16]) {
        let d = half(b, 208);
        for j in 0..16 {
            dl[j] = d * f32::from(*b.add(192 + j) as i8);
            // codes are stored plus 32
            ml[j] = 32.0 * dl[j];
        }
    }
    #[inline(always)]
    unsafe fn codes(b: *const u8, j: usize) -> __m512 {
        let (h, t, hf) = (j / 8, (j / 2) % 4, j % 2);
        let low = bits(
            bytes16(b.add(64 * h + 32 * (t % 2) + 16 * hf)),
            4 * (t / 2),
            15,
        );
        let high = bits(bytes16(b.add(128 + 32 * h + 16 * hf)), 2 * t, 3);
        _mm512_cvtepi32_ps(_mm512_or_si512(low, _mm512_slli_epi32::<4>(high)))
    }
}

struct Iq4Xs;
impl Runs for Iq4Xs {
    const LEN: usize = 256;
    const BYTES: usize = 136;
    #[inline(always)]
    unsafe fn scales(b: *const u8, dl: &mut [f32; 16], ml: &mut [f32; 16]) {
        let d = half(b, 0);
        let high_bits = u16::from_le_bytes([*b.add(2), *b.add(3)]);
        for s in 0..8 {
            let low = (*b.add(4 + s / 2) >> (4 * (s % 2))) & 15;
            let high = ((high_bits >> (2 * s)) & 3) as u8;
            dl[2 * s..2 * s + 2].fill(d * f32::from(((low | (high << 4)) as i8) - 32));
        }
        ml.fill(0.0);
    }
    #[inline(always)]
    unsafe fn codes(b: *const u8, j: usize) -> __m512 {
        iq4_levels(bits(bytes16(b.add(8 + 16 * (j / 2))), 4 * (j % 2), 15))
    }
}

struct Q2K;
impl Runs for Q2K {
    const LEN: usize = 256;
    const BYTES: usize = 84;
    #[inline(always)]
    unsafe fn scales(b: *const u8, dl: &mut [f32; 16], ml: &mut [f32; 16]) {
        let (d, dmin) = (half(b, 80), half(b, 82));
        for j in 0..16 {
            let sc = *b.add(j);
            dl[j] = d * f32::from(sc & 15);
            ml[j] = dmin * f32::from(sc >> 4);
        }
    }
    #[inline(always)]
    unsafe fn codes(b: *const u8, j: usize) -> __m512 {
        let (h, s, hf) = (j / 8, (j / 2) % 4, j % 2);
        _mm512_cvtepi32_ps(bits(bytes16(b.add(16 + 32 * h + 16 * hf)), 2 * s, 3))
    }
}

struct Q3K;
impl Runs for Q3K {
    const LEN: usize = 256;
    const BYTES: usize = 110;
    #[inline(always)]
    unsafe fn scales(b: *const u8, dl: &mut [f32; 16], ml: &mut [f32; 16]) {
        let d = half(b, 108);
        for j in 0..16 {
            let low = (*b.add(96 + j % 8) >> (4 * (j / 8))) & 15;
            let high = (*b.add(104 + j % 4) >> (2 * (j / 4))) & 3;
            dl[j] = d * f32::from(((low | (high << 4)) as i8) - 32);
            // q = low - 4 (1 - hbit) = (low | hbit << 2) - 4
            ml[j] = 4.0 * dl[j];
        }
    }
    #[inline(always)]
    unsafe fn codes(b: *const u8, j: usize) -> __m512 {
        let (h, s, hf) = (j / 8, (j / 2) % 4, j % 2);
        let low = bits(bytes16(b.add(32 + 32 * h + 16 * hf)), 2 * s, 3);
        let high = bits(bytes16(b.add(16 * hf)), j / 2, 1);
        _mm512_cvtepi32_ps(_mm512_or_si512(low, _mm512_slli_epi32::<2>(high)))
    }
}

/// Q5_0 and Q5_1's codes: nibbles at `qs`, fifth bits in the u32 at `qh`.
#[inline(always)]
unsafe fn fives(qh: *const u8, qs: *const u8, j: usize) -> __m512 {
    let high = u32::from_le_bytes([*qh, *qh.add(1), *qh.add(2), *qh.add(3)]);
    let low = bits(bytes16(qs), 4 * j, 15);
    let mask = (high >> (16 * j)) as u16;
    _mm512_cvtepi32_ps(_mm512_mask_or_epi32(low, mask, low, _mm512_set1_epi32(16)))
}

struct Q5_0;
impl Runs for Q5_0 {
    const LEN: usize = 32;
    const BYTES: usize = 22;
    #[inline(always)]
    unsafe fn scales(b: *const u8, dl: &mut [f32; 16], ml: &mut [f32; 16]) {
        let d = half(b, 0);
        dl[..2].fill(d);
        ml[..2].fill(16.0 * d);
    }
    #[inline(always)]
    unsafe fn codes(b: *const u8, j: usize) -> __m512 {
        fives(b.add(2), b.add(6), j)
    }
}

struct Q5_1;
impl Runs for Q5_1 {
    const LEN: usize = 32;
    const BYTES: usize = 24;
    #[inline(always)]
    unsafe fn scales(b: *const u8, dl: &mut [f32; 16], ml: &mut [f32; 16]) {
        dl[..2].fill(half(b, 0));
        ml[..2].fill(-half(b, 2));
    }
    #[inline(always)]
    unsafe fn codes(b: *const u8, j: usize) -> __m512 {
        fives(b.add(4), b.add(8), j)
    }
}

struct Iq4Nl;
impl Runs for Iq4Nl {
    const LEN: usize = 32;
    const BYTES: usize = 18;
    #[inline(always)]
    unsafe fn scales(b: *const u8, dl: &mut [f32; 16], ml: &mut [f32; 16]) {
        dl[..2].fill(half(b, 0));
        ml[..2].fill(0.0);
    }
    #[inline(always)]
    unsafe fn codes(b: *const u8, j: usize) -> __m512 {
        iq4_levels(bits(bytes16(b.add(2)), 4 * j, 15))
    }
}
