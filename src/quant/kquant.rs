//! The 256-value GGUF block formats ("super-blocks"): the K-quants Q2_K..Q6_K and IQ4_XS,
//! decoded exactly as ggml does (each product rounded on its own; no fused multiply-add).
//!
//! A super-block holds one or two f16 super-scales and small per-sub-block scales; a value is
//! `(d * scale_s) * q - (dmin * min_s)` (Q2_K, Q4_K, Q5_K) or `(d * scale_s) * q` (Q3_K,
//! Q6_K, IQ4_XS), with `s` its sub-block. Byte layouts, in order (value `p` in 0..256):
//! - Q2_K (84): `scales[16]` (low nibble scale, high nibble min; sub-blocks of 16),
//!   `qs[64]`, `d`, `dmin`. `q = (qs[32 h + l] >> 2 s) & 3` for `p = 128 h + 32 s + l`.
//! - Q3_K (110): `hmask[32]`, `qs[64]`, `scales[12]` (16 six-bit scales, offset 32), `d`.
//!   Low bits as Q2_K; `q = low - 4` unless bit `p / 32` of `hmask[p % 32]` is set.
//! - Q4_K (144): `d`, `dmin`, `scales[12]` (8 six-bit scales and mins), `qs[128]`:
//!   sub-block `2 c` is the low nibbles of `qs[32 c..32 c + 32]`, `2 c + 1` the high ones.
//! - Q5_K (176): as Q4_K with `qh[32]` before `qs`: bit `s` of `qh[l]` is value `32 s + l`'s
//!   fifth bit.
//! - Q6_K (210): `ql[128]`, `qh[64]`, `scales[16]` (i8, sub-blocks of 16), `d`; for
//!   `p = 128 h + j`: low 4 bits `(ql[64 h + j % 64] >> 4 (j / 64)) & 15`, high 2 bits
//!   `(qh[32 h + j % 32] >> 2 (j / 32)) & 3`, `q = low | high << 4` minus 32.
//! - IQ4_XS (136): `d`, `scales_h` (u16: 2 bits a sub-block), `scales_l[4]` (a nibble a
//!   sub-block), `qs[128]` (sub-block `s`: low nibbles of `qs[16 s..16 s + 16]`, then the
//!   high ones), levels from [`IQ4_LEVELS_F32`]; scale `(l | h << 4) - 32`.

use half::f16;

/// Values per super-block.
pub const SUPER_LEN: usize = 256;
/// Bytes of a Q2_K super-block.
pub const Q2K_BYTES: usize = 16 + 64 + 2 + 2;
/// Bytes of a Q3_K super-block.
pub const Q3K_BYTES: usize = 32 + 64 + 12 + 2;
/// Bytes of a Q4_K super-block.
pub const Q4K_BYTES: usize = 2 + 2 + 12 + 128;
/// Bytes of a Q5_K super-block.
pub const Q5K_BYTES: usize = 2 + 2 + 12 + 32 + 128;
/// Bytes of a Q6_K super-block.
pub const Q6K_BYTES: usize = 128 + 64 + 16 + 2;
/// Bytes of an IQ4_XS super-block.
pub const IQ4XS_BYTES: usize = 2 + 2 + 4 + 128;

/// The 16 levels of IQ4_NL and IQ4_XS (a non-uniform grid, denser near zero).
pub const IQ4_LEVELS_F32: [f32; 16] = [
    -127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0, 1.0, 13.0, 25.0, 38.0, 53.0, 69.0,
    89.0, 113.0,
];

#[inline(always)]
fn half(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// Q4_K's and Q5_K's 6-bit (scale, min) of sub-block `s` (0..8) from the 12 packed bytes:
/// sub-blocks 0..4 are the low 6 bits of bytes `s` and `s + 4`; sub-blocks 4..8 take their
/// low 4 bits from byte `s + 4` (scale: low nibble, min: high nibble) and their top 2 from
/// the spare top bits of bytes `s - 4` (scale) and `s` (min).
#[inline(always)]
pub fn scale_min_k4(s: usize, q: &[u8]) -> (u8, u8) {
    if s < 4 {
        (q[s] & 63, q[s + 4] & 63)
    } else {
        (
            (q[s + 4] & 0x0F) | ((q[s - 4] >> 6) << 4),
            (q[s + 4] >> 4) | ((q[s] >> 6) << 4),
        )
    }
}

/// Q2_K: `x[p] = (d * (scales[p / 16] & 15)) * q - dmin * (scales[p / 16] >> 4)`.
/// (Loops over runs of 16 values that share a scale, with shifts fixed per run, so that
/// they vectorize; the same in every decoder here.)
#[inline(always)]
pub fn decode_q2_k(block: &[u8], x: &mut [f32]) {
    let (scales, qs) = (&block[..16], &block[16..80]);
    let (d, dmin) = (half(block, 80), half(block, 82));
    // run r = 2 (4 h + s) + half covers p = 128 h + 32 s + 16 half + (0..16)
    for (r, xr) in x[..SUPER_LEN].chunks_exact_mut(16).enumerate() {
        let (h, s, hf) = (r / 8, (r / 2) % 4, r % 2);
        let q = &qs[32 * h + 16 * hf..32 * h + 16 * hf + 16];
        let dl = d * f32::from(scales[r] & 0x0F);
        let ml = dmin * f32::from(scales[r] >> 4);
        for (xp, &b) in xr.iter_mut().zip(q) {
            *xp = dl * f32::from((b >> (2 * s)) & 3) - ml;
        }
    }
}

/// Q3_K: `x[p] = (d * (scale[p / 16] - 32)) * (low - 4 * !high)`.
#[inline(always)]
pub fn decode_q3_k(block: &[u8], x: &mut [f32]) {
    let (hmask, qs, packed) = (&block[..32], &block[32..96], &block[96..108]);
    let d = half(block, 108);
    // scale i: low nibble from byte i % 8 (high nibble for i >= 8), top 2 bits from byte
    // 8 + i % 4 at bit 2 (i / 4)
    let mut dl = [0.0f32; 16];
    for (i, dli) in dl.iter_mut().enumerate() {
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *dli = d * f32::from(((low | (high << 4)) as i8) - 32);
    }
    for (r, xr) in x[..SUPER_LEN].chunks_exact_mut(16).enumerate() {
        // run r covers p = 16 r + (0..16): low bits at shift 2 s of qs[32 h + l], the high
        // bit at bit p / 32 of hmask[l], with l = 16 (r % 2) + (0..16)
        let (h, s, hf) = (r / 8, (r / 2) % 4, r % 2);
        let q = &qs[32 * h + 16 * hf..32 * h + 16 * hf + 16];
        let m = &hmask[16 * hf..16 * hf + 16];
        let bit = r / 2;
        for ((xp, &b), &hb) in xr.iter_mut().zip(q).zip(m) {
            let low = ((b >> (2 * s)) & 3) as i8;
            let sub = (((hb >> bit) & 1) ^ 1) as i8 * 4;
            *xp = dl[r] * f32::from(low - sub);
        }
    }
}

/// Q4_K and Q5_K: sub-block `s` of 32 has `(d * scale_s) * q - dmin * min_s`, `q` from the
/// nibbles (and for Q5_K a fifth bit from `qh`).
#[inline(always)]
fn decode_k4(block: &[u8], qh: Option<&[u8]>, qs: &[u8], x: &mut [f32]) {
    let (d, dmin, packed) = (half(block, 0), half(block, 2), &block[4..16]);
    for s in 0..8 {
        let (sc, m) = scale_min_k4(s, packed);
        let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
        let chunk = &qs[32 * (s / 2)..32 * (s / 2) + 32];
        for (l, xp) in x[32 * s..32 * s + 32].iter_mut().enumerate() {
            let mut q = (chunk[l] >> (4 * (s % 2))) & 0x0F;
            if let Some(qh) = qh {
                q |= ((qh[l] >> s) & 1) << 4;
            }
            *xp = dl * f32::from(q) - ml;
        }
    }
}

/// Q4_K (see [`decode_k4`]).
#[inline(always)]
pub fn decode_q4_k(block: &[u8], x: &mut [f32]) {
    decode_k4(block, None, &block[16..144], x)
}

/// Q5_K (see [`decode_k4`]).
#[inline(always)]
pub fn decode_q5_k(block: &[u8], x: &mut [f32]) {
    decode_k4(block, Some(&block[16..48]), &block[48..176], x)
}

/// Q6_K: `x[p] = (d * scales[p / 16]) * ((low | high << 4) - 32)`.
#[inline(always)]
pub fn decode_q6_k(block: &[u8], x: &mut [f32]) {
    let (ql, qh, scales) = (&block[..128], &block[128..192], &block[192..208]);
    let d = half(block, 208);
    for (r, xr) in x[..SUPER_LEN].chunks_exact_mut(16).enumerate() {
        // run r covers p = 16 r + (0..16) = 128 h + j: j = 32 t + 16 hf + (0..16)
        let (h, t, hf) = (r / 8, (r / 2) % 4, r % 2);
        let lo = 64 * h + 32 * (t % 2) + 16 * hf;
        let hi = 32 * h + 16 * hf;
        let dl = d * f32::from(scales[r] as i8);
        for ((xp, &l), &hb) in xr.iter_mut().zip(&ql[lo..lo + 16]).zip(&qh[hi..hi + 16]) {
            let low = (l >> (4 * (t / 2))) & 0x0F;
            let high = (hb >> (2 * t)) & 3;
            *xp = dl * f32::from(((low | (high << 4)) as i8) - 32);
        }
    }
}

/// IQ4_XS: `x[p] = (d * scale[p / 32]) * IQ4_LEVELS_F32[nibble]`.
#[inline(always)]
pub fn decode_iq4_xs(block: &[u8], x: &mut [f32]) {
    let d = half(block, 0);
    let scales_h = u16::from_le_bytes([block[2], block[3]]);
    let (scales_l, qs) = (&block[4..8], &block[8..136]);
    for s in 0..8 {
        let low = (scales_l[s / 2] >> (4 * (s % 2))) & 0x0F;
        let high = ((scales_h >> (2 * s)) & 3) as u8;
        let dl = d * f32::from(((low | (high << 4)) as i8) - 32);
        let q = &qs[16 * s..16 * s + 16];
        let (lo, hi) = x[32 * s..32 * s + 32].split_at_mut(16);
        for ((l, h), &b) in lo.iter_mut().zip(hi).zip(q) {
            *l = dl * IQ4_LEVELS_F32[usize::from(b & 0x0F)];
            *h = dl * IQ4_LEVELS_F32[usize::from(b >> 4)];
        }
    }
}
