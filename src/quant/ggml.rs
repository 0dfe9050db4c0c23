//! GGUF (ggml) block formats, decoded exactly to f32 (bit for bit as `gguf`'s Python
//! `dequantize` and ggml's own `dequantize_row_*` compute them: products rounded one at a
//! time, never fused).
//!
//! The legacy formats hold 32 values a block; the K-quants and IQ4_XS 256 (a "super-block"
//! of 8 or 16 sub-blocks with their own small scales); a row's length is a multiple of the
//! block. Layouts (little-endian), with `d` and `m` as IEEE half floats; for byte `b = qs[j]`
//! (j in 0..16), `nib[j] = b & 0xF` and `nib[j + 16] = b >> 4`:
//! - Q8_0 (34 bytes): `d`, then 32 signed bytes `q`;            `x[i] = d * q[i]`
//! - Q4_0 (18 bytes): `d`, then 16 bytes of nibbles;             `x[i] = d * (nib[i] - 8)`
//! - Q4_1 (20 bytes): `d`, `m`, then 16 bytes of nibbles;        `x[i] = d * nib[i] + m`
//! - Q5_0 (22 bytes): `d`, 32 high bits `qh`, 16 bytes of nibbles;
//!   `x[i] = d * ((nib[i] | bit_i(qh) << 4) - 16)`
//! - Q5_1 (24 bytes): `d`, `m`, `qh`, nibbles;                   `x[i] = d * (nib[i] | bit_i(qh) << 4) + m`
//! - IQ4_NL (18 bytes): `d`, nibbles indexing a fixed non-linear table; `x[i] = d * T[nib[i]]`
//! - the 256-value formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS): see [`super::kquant`].

use half::f16;

use super::kquant;

/// Values per block of the legacy formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL).
pub const BLOCK_LEN: usize = 32;

/// A ggml block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum BlockFormat {
    /// 8-bit symmetric, one f16 scale per block.
    Q8_0,
    /// 4-bit symmetric (offset 8), one f16 scale per block.
    Q4_0,
    /// 4-bit asymmetric, f16 scale and f16 minimum per block.
    Q4_1,
    /// 5-bit symmetric (offset 16), one f16 scale per block.
    Q5_0,
    /// 5-bit asymmetric, f16 scale and f16 minimum per block.
    Q5_1,
    /// 2-bit K-quant: 16 sub-blocks of 16 with 4-bit scales and minimums.
    Q2K,
    /// 3-bit K-quant: 16 sub-blocks of 16 with 6-bit signed scales.
    Q3K,
    /// 4-bit K-quant: 8 sub-blocks of 32 with 6-bit scales and minimums.
    Q4K,
    /// 5-bit K-quant: as Q4_K with a fifth bit per value.
    Q5K,
    /// 6-bit K-quant: 16 sub-blocks of 16 with 8-bit signed scales.
    Q6K,
    /// 4-bit non-linear (a fixed table of 16 levels), one f16 scale per 32.
    Iq4Nl,
    /// IQ4_NL's levels in super-blocks of 256 with 6-bit sub-block scales.
    Iq4Xs,
}

/// Quantizes `values` (a multiple of [`BLOCK_LEN`] long) to Q8_0 blocks: per block
/// `d = max|x| / 127` (as f16), `q = round(x / d)`; the error of each value is at most `d / 2`
/// plus the rounding of `d` to f16.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / BLOCK_LEN * BlockFormat::Q8_0.block_bytes());
    for block in values.chunks(BLOCK_LEN) {
        let amax = block.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let d = f16::from_f32(amax / 127.0);
        let inv = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        out.extend_from_slice(&d.to_le_bytes());
        for i in 0..BLOCK_LEN {
            let x = block.get(i).copied().unwrap_or(0.0);
            out.push((x * inv).round().clamp(-127.0, 127.0) as i8 as u8);
        }
    }
    out
}

impl BlockFormat {
    /// The format of ggml type id `id`, or `None` for one not listed here.
    pub fn from_ggml_type(id: u32) -> Option<Self> {
        Some(match id {
            2 => BlockFormat::Q4_0,
            3 => BlockFormat::Q4_1,
            6 => BlockFormat::Q5_0,
            7 => BlockFormat::Q5_1,
            8 => BlockFormat::Q8_0,
            10 => BlockFormat::Q2K,
            11 => BlockFormat::Q3K,
            12 => BlockFormat::Q4K,
            13 => BlockFormat::Q5K,
            14 => BlockFormat::Q6K,
            20 => BlockFormat::Iq4Nl,
            23 => BlockFormat::Iq4Xs,
            _ => return None,
        })
    }

    /// The format's ggml type id (as a GGUF tensor table names it).
    pub const fn ggml_type(self) -> u32 {
        match self {
            BlockFormat::Q4_0 => 2,
            BlockFormat::Q4_1 => 3,
            BlockFormat::Q5_0 => 6,
            BlockFormat::Q5_1 => 7,
            BlockFormat::Q8_0 => 8,
            BlockFormat::Q2K => 10,
            BlockFormat::Q3K => 11,
            BlockFormat::Q4K => 12,
            BlockFormat::Q5K => 13,
            BlockFormat::Q6K => 14,
            BlockFormat::Iq4Nl => 20,
            BlockFormat::Iq4Xs => 23,
        }
    }

    /// The name ggml gives the format (`Q4_K`, `IQ4_XS`).
    pub const fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q4_1 => "Q4_1",
            BlockFormat::Q5_0 => "Q5_0",
            BlockFormat::Q5_1 => "Q5_1",
            BlockFormat::Q2K => "Q2_K",
            BlockFormat::Q3K => "Q3_K",
            BlockFormat::Q4K => "Q4_K",
            BlockFormat::Q5K => "Q5_K",
            BlockFormat::Q6K => "Q6_K",
            BlockFormat::Iq4Nl => "IQ4_NL",
            BlockFormat::Iq4Xs => "IQ4_XS",
        }
    }

    /// Values per block: 32 for the legacy formats, 256 for the K-quants and IQ4_XS.
    pub const fn block_len(self) -> usize {
        match self {
            BlockFormat::Q8_0
            | BlockFormat::Q4_0
            | BlockFormat::Q4_1
            | BlockFormat::Q5_0
            | BlockFormat::Q5_1
            | BlockFormat::Iq4Nl => BLOCK_LEN,
            _ => kquant::SUPER_LEN,
        }
    }

    /// Bytes of one block.
    pub const fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 2 + 32,
            BlockFormat::Q4_0 | BlockFormat::Iq4Nl => 2 + 16,
            BlockFormat::Q4_1 => 2 + 2 + 16,
            BlockFormat::Q5_0 => 2 + 4 + 16,
            BlockFormat::Q5_1 => 2 + 2 + 4 + 16,
            BlockFormat::Q2K => kquant::Q2K_BYTES,
            BlockFormat::Q3K => kquant::Q3K_BYTES,
            BlockFormat::Q4K => kquant::Q4K_BYTES,
            BlockFormat::Q5K => kquant::Q5K_BYTES,
            BlockFormat::Q6K => kquant::Q6K_BYTES,
            BlockFormat::Iq4Xs => kquant::IQ4XS_BYTES,
        }
    }

    /// Bytes needed for `n` values (`n` a multiple of [`BlockFormat::block_len`]).
    pub const fn bytes_for(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }

    /// Where each block keeps its f16 super-scales (`d`, and `dmin` or `m` where the format
    /// has one), as byte offsets: what a test writing random blocks must keep finite.
    pub const fn scale_offsets(self) -> &'static [usize] {
        match self {
            BlockFormat::Q4_1 | BlockFormat::Q5_1 | BlockFormat::Q4K | BlockFormat::Q5K => &[0, 2],
            BlockFormat::Q2K => &[80, 82],
            BlockFormat::Q3K => &[108],
            BlockFormat::Q6K => &[208],
            _ => &[0],
        }
    }

    /// Decodes `bytes` (whole blocks) into `out`, whose length is
    /// `bytes / block_bytes * block_len`.
    ///
    /// # Panics
    /// If the lengths disagree; callers check sizes against the file first.
    #[inline(always)]
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        let (bb, bl) = (self.block_bytes(), self.block_len());
        assert_eq!(bytes.len() % bb, 0, "partial ggml block");
        assert_eq!(out.len(), bytes.len() / bb * bl, "output length");
        self.with_decoder(DecodeAll { bb, bl, bytes, out })
    }

    /// Runs `job` with a decoder of this format that the compiler sees as one fixed format
    /// (a loop over blocks then compiles without a format `match` per block, and vectorizes).
    #[inline(always)]
    pub fn with_decoder<J: DecodeJob>(self, job: J) -> J::Output {
        use BlockFormat::*;
        match self {
            Q8_0 => job.run(|b: &[u8], x: &mut [f32]| Q8_0.decode_block(b, x)),
            Q4_0 => job.run(|b: &[u8], x: &mut [f32]| Q4_0.decode_block(b, x)),
            Q4_1 => job.run(|b: &[u8], x: &mut [f32]| Q4_1.decode_block(b, x)),
            Q5_0 => job.run(|b: &[u8], x: &mut [f32]| Q5_0.decode_block(b, x)),
            Q5_1 => job.run(|b: &[u8], x: &mut [f32]| Q5_1.decode_block(b, x)),
            Iq4Nl => job.run(|b: &[u8], x: &mut [f32]| Iq4Nl.decode_block(b, x)),
            Q2K => job.run(kquant::decode_q2_k),
            Q3K => job.run(kquant::decode_q3_k),
            Q4K => job.run(kquant::decode_q4_k),
            Q5K => job.run(kquant::decode_q5_k),
            Q6K => job.run(kquant::decode_q6_k),
            Iq4Xs => job.run(kquant::decode_iq4_xs),
        }
    }

    /// Decodes one block (`block_bytes` bytes) into `x` (`block_len` values).
    #[inline(always)]
    pub fn decode_block(self, block: &[u8], x: &mut [f32]) {
        let half = |at: usize| f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
        let d = half(0);
        match self {
            BlockFormat::Q8_0 => {
                for (xi, &q) in x.iter_mut().zip(&block[2..34]) {
                    *xi = d * f32::from(q as i8);
                }
            }
            BlockFormat::Q4_0 => decode_nibbles(&block[2..18], x, |q| d * (q - 8.0)),
            BlockFormat::Q4_1 => {
                let m = half(2);
                decode_nibbles(&block[4..20], x, |q| d * q + m)
            }
            BlockFormat::Iq4Nl => {
                decode_nibbles(&block[2..18], x, |q| d * kquant::IQ4_LEVELS_F32[q as usize])
            }
            BlockFormat::Q5_0 => decode_fives(&block[2..22], x, |q| d * (q - 16.0)),
            BlockFormat::Q5_1 => {
                let m = half(2);
                decode_fives(&block[4..24], x, |q| d * q + m)
            }
            BlockFormat::Q2K => kquant::decode_q2_k(block, x),
            BlockFormat::Q3K => kquant::decode_q3_k(block, x),
            BlockFormat::Q4K => kquant::decode_q4_k(block, x),
            BlockFormat::Q5K => kquant::decode_q5_k(block, x),
            BlockFormat::Q6K => kquant::decode_q6_k(block, x),
            BlockFormat::Iq4Xs => kquant::decode_iq4_xs(block, x),
        }
    }
}

/// Work over blocks of one format, given that format's block decoder
/// ([`BlockFormat::with_decoder`]).
pub trait DecodeJob {
    /// What the work returns.
    type Output;
    /// Runs with `decode(block, values)`.
    fn run<D: Fn(&[u8], &mut [f32]) + Copy>(self, decode: D) -> Self::Output;
}

/// [`BlockFormat::decode`]'s loop over blocks, for one fixed format.
struct DecodeAll<'a> {
    bb: usize,
    bl: usize,
    bytes: &'a [u8],
    out: &'a mut [f32],
}

impl DecodeJob for DecodeAll<'_> {
    type Output = ();

    #[inline(always)]
    fn run<D: Fn(&[u8], &mut [f32]) + Copy>(self, decode: D) {
        for (block, x) in self
            .bytes
            .chunks_exact(self.bb)
            .zip(self.out.chunks_exact_mut(self.bl))
        {
            decode(block, x);
        }
    }
}

/// Low nibbles give values 0..16, high nibbles 16..32.
#[inline(always)]
fn decode_nibbles(qs: &[u8], x: &mut [f32], f: impl Fn(f32) -> f32) {
    let (lo, hi) = x.split_at_mut(BLOCK_LEN / 2);
    for ((&b, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = f(f32::from(b & 0x0F));
        *h = f(f32::from(b >> 4));
    }
}

/// 5-bit codes: `qh_qs` is the 32 high bits (little-endian, bit `i` for value `i`) then the
/// nibbles as in [`decode_nibbles`].
#[inline(always)]
fn decode_fives(qh_qs: &[u8], x: &mut [f32], f: impl Fn(f32) -> f32) {
    let qh = u32::from_le_bytes([qh_qs[0], qh_qs[1], qh_qs[2], qh_qs[3]]);
    let qs = &qh_qs[4..20];
    let (lo, hi) = x.split_at_mut(BLOCK_LEN / 2);
    for (j, ((l, h), &b)) in lo.iter_mut().zip(hi).zip(qs).enumerate() {
        let (bl, bh) = ((qh >> j) & 1, (qh >> (j + 16)) & 1);
        *l = f((u32::from(b & 0x0F) | (bl << 4)) as f32);
        *h = f((u32::from(b >> 4) | (bh << 4)) as f32);
    }
}

#[cfg(test)]
/// `count` blocks of `format` with random bytes, their super-scales set so that the
/// block's values lie within [-1, 1] (at most one at the edge).
pub(crate) fn random_blocks(format: BlockFormat, count: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 24) as u8
    };
    let (bb, bl) = (format.block_bytes(), format.block_len());
    let mut out = vec![0u8; count * bb];
    let mut values = vec![0.0f32; bl];
    for block in out.chunks_exact_mut(bb) {
        block.iter_mut().for_each(|b| *b = next());
        for &at in format.scale_offsets() {
            block[at..at + 2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        }
        format.decode_block(block, &mut values);
        let peak = values.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
        for &at in format.scale_offsets() {
            block[at..at + 2].copy_from_slice(&f16::from_f32(1.0 / peak).to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_quantization_round_trips_within_half_a_step() {
        let values: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let bytes = quantize_q8_0(&values);
        assert_eq!(bytes.len(), BlockFormat::Q8_0.bytes_for(96));
        let mut back = vec![0f32; 96];
        BlockFormat::Q8_0.decode(&bytes, &mut back);
        for (i, (v, b)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
            let at = i * BlockFormat::Q8_0.block_bytes();
            let d = f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
            let amax = v.iter().fold(0f32, |m, &x| m.max(x.abs()));
            // d is amax / 127 rounded to f16: half a step of d, and 127 times d's rounding
            let bound = 0.5 * d + 127.0 * (d - amax / 127.0).abs();
            for (x, y) in v.iter().zip(b) {
                assert!((x - y).abs() <= bound * 1.0001, "{x} vs {y}");
            }
        }
    }

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        let mut block = f16_bytes(0.5).to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = [0f32; 32];
        BlockFormat::Q8_0.decode(&block, &mut out);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, 0.5 * (i as f32 - 16.0));
        }
    }

    #[test]
    fn q4_0_and_q4_1_nibble_order() {
        // byte j holds value j (low nibble) and value j+16 (high nibble)
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let mut q40 = f16_bytes(2.0).to_vec();
        q40.extend(&qs);
        let mut out = [0f32; 32];
        BlockFormat::Q4_0.decode(&q40, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], 2.0 * ((15 - j) as f32 - 8.0));
        }
        let mut q41 = f16_bytes(0.25).to_vec();
        q41.extend(f16_bytes(-1.0));
        q41.extend(&qs);
        BlockFormat::Q4_1.decode(&q41, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.25 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.25 * (15 - j) as f32 - 1.0);
        }
    }
}
