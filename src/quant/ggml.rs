//! GGUF (ggml) block formats, decoded exactly to f32.
//!
//! Each format stores a row in blocks of 32 values; a row's length must be a multiple of 32.
//! Layouts (little-endian), with `d` and `m` as IEEE half floats:
//! - Q8_0 (34 bytes): `d`, then 32 signed bytes `q`;            `x[i] = d * q[i]`
//! - Q4_0 (18 bytes): `d`, then 16 bytes of nibbles;             `x[i] = d * (nib[i] - 8)`
//! - Q4_1 (20 bytes): `d`, `m`, then 16 bytes of nibbles;        `x[i] = d * nib[i] + m`
//!
//! where, for byte `b = qs[j]` (j in 0..16), `nib[j] = b & 0xF` and `nib[j + 16] = b >> 4`.

use half::f16;

/// Values per block in every ggml block format here.
pub const BLOCK_LEN: usize = 32;

/// A ggml block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// 8-bit symmetric, one f16 scale per block.
    Q8_0,
    /// 4-bit symmetric (offset 8), one f16 scale per block.
    Q4_0,
    /// 4-bit asymmetric, f16 scale and f16 minimum per block.
    Q4_1,
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
    /// Bytes of one block of [`BLOCK_LEN`] values.
    pub const fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 2 + 32,
            BlockFormat::Q4_0 => 2 + 16,
            BlockFormat::Q4_1 => 2 + 2 + 16,
        }
    }

    /// Bytes needed for `n` values (`n` a multiple of [`BLOCK_LEN`]).
    pub const fn bytes_for(self, n: usize) -> usize {
        n / BLOCK_LEN * self.block_bytes()
    }

    /// Decodes `bytes` (whole blocks) into `out`, whose length is `bytes / block_bytes * 32`.
    ///
    /// # Panics
    /// If the lengths disagree; callers check sizes against the file first.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        let bb = self.block_bytes();
        assert_eq!(bytes.len() % bb, 0, "partial ggml block");
        assert_eq!(out.len(), bytes.len() / bb * BLOCK_LEN, "output length");
        for (block, x) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK_LEN)) {
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            match self {
                BlockFormat::Q8_0 => {
                    for (xi, &q) in x.iter_mut().zip(&block[2..]) {
                        *xi = d * f32::from(q as i8);
                    }
                }
                BlockFormat::Q4_0 => decode_nibbles(&block[2..], x, |q| d * (q - 8.0)),
                BlockFormat::Q4_1 => {
                    let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                    decode_nibbles(&block[4..], x, |q| d * q + m)
                }
            }
        }
    }
}

/// Low nibbles give values 0..16, high nibbles 16..32.
fn decode_nibbles(qs: &[u8], x: &mut [f32], f: impl Fn(f32) -> f32) {
    let (lo, hi) = x.split_at_mut(BLOCK_LEN / 2);
    for ((&b, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = f(f32::from(b & 0x0F));
        *h = f(f32::from(b >> 4));
    }
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
