//! [`PackedWeight`]: the packed layout every device reads linear weights in.
//!
//! Per row of `W [n, k]`: `padded_k` codes of `bits` (4, 8 or 16) packed little-endian into
//! u32 words, and per group of `group` codes one u32 `pack2x16float(step, min)` (step in the
//! low half); a value is `code * step + min`, a 16-bit code being an IEEE half. Every source
//! format maps onto it without requantizing (only bits move):
//! - FlexGen 4-bit groups along `k` ([`Group4`] with `group_dim = 1`): codes and (step, min) as
//!   stored;
//! - GGUF Q4_1 (`d * q + m`): step `d`, min `m`; nibbles reordered (GGUF puts value `j` and
//!   `j + 16` in one byte);
//! - GGUF Q4_0 (`d * (q - 8)`): step `d`, min `-8 d` (exact in f16);
//! - GGUF Q8_0 (`d * q`, q signed): 8-bit codes `q + 128`, step `d`, min `-128 d` (exact);
//! - f16 tensors: the halves as stored, in groups of 64 with step 1 and min 0 (half the bytes
//!   of f32; the scales add 1/32 of a byte per value).

use half::f16;

use crate::error::{Error, Result};
use crate::quant::ggml::{BlockFormat, BLOCK_LEN};
use crate::quant::group4::Group4;

/// Quantized weights in the kernel's layout, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    /// Rows of `W` (output features).
    pub rows: usize,
    /// Columns of `W` (input features).
    pub k: usize,
    /// `k` rounded up to a whole number of groups.
    pub padded_k: usize,
    /// Codes per group (a multiple of 8).
    pub group: usize,
    /// Bits per code (4, 8 or 16).
    pub bits: u32,
    /// `rows * padded_k * bits / 32` words.
    pub codes: Vec<u32>,
    /// `rows * padded_k / group` packed (step, min) pairs.
    pub scales: Vec<u32>,
}

/// `pack2x16float(step, min)`: step in the low half.
fn pack_scale(step: f16, min: f16) -> u32 {
    u32::from(step.to_bits()) | (u32::from(min.to_bits()) << 16)
}

/// `factor * d` in f16, which must be exact (it is, short of overflow, for powers of two).
fn scaled_exactly(d: f16, factor: f32) -> Result<f16> {
    let v = f16::from_f32(factor * d.to_f32());
    if v.to_f32() == factor * d.to_f32() {
        Ok(v)
    } else {
        Err(Error::invalid(
            "quantized weight",
            format!("scale {d} overflows f16 when multiplied by {factor}"),
        ))
    }
}

impl PackedWeight {
    /// From FlexGen 4-bit groups of a 2-d weight grouped along its columns (`group_dim = 1`).
    pub fn from_group4(q: &Group4) -> Result<Self> {
        let (&[rows, k], 1) = (q.shape.as_slice(), q.group_dim) else {
            return Err(Error::invalid(
                "quantized weight",
                "needs a 2-d weight grouped along dim 1",
            ));
        };
        if !q.group_size.is_multiple_of(8) {
            return Err(Error::invalid(
                "quantized weight",
                "group size must be a multiple of 8",
            ));
        }
        let padded_k = k.div_ceil(q.group_size) * q.group_size;
        // each row is padded_k / 2 bytes, a multiple of 4: rows stay word-aligned
        let codes = q
            .nibbles
            .chunks(4)
            .map(|c| {
                u32::from_le_bytes([
                    c[0],
                    *c.get(1).unwrap_or(&0),
                    *c.get(2).unwrap_or(&0),
                    *c.get(3).unwrap_or(&0),
                ])
            })
            .collect();
        let scales = q
            .steps
            .iter()
            .zip(&q.mins)
            .map(|(&s, &m)| pack_scale(s, m))
            .collect();
        Ok(Self {
            rows,
            k,
            padded_k,
            group: q.group_size,
            bits: 4,
            codes,
            scales,
        })
    }

    /// Whether [`PackedWeight::from_ggml`] repacks `format` losslessly (Q4_0, Q4_1, Q8_0:
    /// one f16 scale and offset per 32 codes of 4 or 8 bits).
    pub fn repacks(format: BlockFormat) -> bool {
        matches!(
            format,
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q8_0
        )
    }

    /// From GGUF blocks of a weight `[rows, k]` (`k` a multiple of 32; a format that
    /// [`PackedWeight::repacks`]).
    pub fn from_ggml(format: BlockFormat, bytes: &[u8], rows: usize, k: usize) -> Result<Self> {
        if !Self::repacks(format)
            || !k.is_multiple_of(BLOCK_LEN)
            || bytes.len() != rows * format.bytes_for(k)
        {
            return Err(Error::invalid(
                "quantized weight",
                format!("{} bytes for a {rows} x {k} {format:?} weight", bytes.len()),
            ));
        }
        let bits = if format == BlockFormat::Q8_0 { 8 } else { 4 };
        let mut codes = Vec::with_capacity(rows * k * bits / 32);
        let mut scales = Vec::with_capacity(rows * k / BLOCK_LEN);
        for block in bytes.chunks_exact(format.block_bytes()) {
            let d = f16::from_le_bytes([block[0], block[1]]);
            match format {
                BlockFormat::Q8_0 => {
                    scales.push(pack_scale(d, scaled_exactly(d, -128.0)?));
                    for w in block[2..].chunks_exact(4) {
                        let u = |b: u8| u32::from((b as i8 as i16 + 128) as u8);
                        codes.push(u(w[0]) | (u(w[1]) << 8) | (u(w[2]) << 16) | (u(w[3]) << 24));
                    }
                }
                BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                    let (min, qs) = if format == BlockFormat::Q4_1 {
                        (f16::from_le_bytes([block[2], block[3]]), &block[4..])
                    } else {
                        (scaled_exactly(d, -8.0)?, &block[2..])
                    };
                    scales.push(pack_scale(d, min));
                    // GGUF: value j < 16 is the low nibble of qs[j], value j + 16 its high nibble
                    let code = |p: usize| {
                        u32::from(if p < 16 {
                            qs[p] & 0x0F
                        } else {
                            qs[p - 16] >> 4
                        })
                    };
                    for word in 0..4 {
                        codes.push((0..8).fold(0, |acc, i| acc | (code(word * 8 + i) << (4 * i))));
                    }
                }
                // refused above
                _ => unreachable!("{format:?} does not repack"),
            }
        }
        Ok(Self {
            rows,
            k,
            padded_k: k,
            group: BLOCK_LEN,
            bits: bits as u32,
            codes,
            scales,
        })
    }

    /// From f16 values `[rows, k]` (raw IEEE half bits, as a safetensors file stores them).
    pub fn from_f16(halves: &[u16], rows: usize, k: usize) -> Result<Self> {
        if halves.len() != rows * k {
            return Err(Error::invalid(
                "f16 weight",
                format!("{} values for a {rows} x {k} weight", halves.len()),
            ));
        }
        const GROUP: usize = 64;
        let padded_k = k.div_ceil(GROUP) * GROUP;
        let mut codes = Vec::with_capacity(rows * padded_k / 2);
        for row in halves.chunks_exact(k.max(1)).take(rows) {
            let half = |i: usize| u32::from(row.get(i).copied().unwrap_or(0));
            codes.extend((0..padded_k / 2).map(|w| half(2 * w) | (half(2 * w + 1) << 16)));
        }
        let one = pack_scale(f16::ONE, f16::ZERO);
        Ok(Self {
            rows,
            k,
            padded_k,
            group: GROUP,
            bits: 16,
            codes,
            scales: vec![one; rows * padded_k / GROUP],
        })
    }

    /// The weight as f32 `[rows, k]`, decoded exactly as the kernel does.
    pub fn dequantize(&self) -> Vec<f32> {
        let per_word = 32 / self.bits as usize;
        let words = self.padded_k / per_word;
        let groups = self.padded_k / self.group;
        let mask = (1u32 << self.bits) - 1;
        let mut out = Vec::with_capacity(self.rows * self.k);
        for r in 0..self.rows {
            for c in 0..self.k {
                let word = self.codes[r * words + c / per_word];
                let q = (word >> (self.bits as usize * (c % per_word))) & mask;
                let q = if self.bits == 16 {
                    f16::from_bits(q as u16).to_f32()
                } else {
                    q as f32
                };
                let s = self.scales[r * groups + c / self.group];
                let (step, min) = (
                    f16::from_bits(s as u16).to_f32(),
                    f16::from_bits((s >> 16) as u16).to_f32(),
                );
                out.push(q * step + min);
            }
        }
        out
    }

    /// Bytes on the device.
    pub fn stored_bytes(&self) -> usize {
        4 * (self.codes.len() + self.scales.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(format: BlockFormat, rows: usize, k: usize, seed: u8) -> Vec<u8> {
        let n = rows * format.bytes_for(k);
        let mut b: Vec<u8> = (0..n)
            .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed))
            .collect();
        // keep scales small and finite: overwrite each block's f16 fields
        for block in b.chunks_exact_mut(format.block_bytes()) {
            let d = f16::from_f32(0.01 * (1.0 + f32::from(block[2] % 7)));
            block[..2].copy_from_slice(&d.to_le_bytes());
            if format == BlockFormat::Q4_1 {
                block[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn ggml_repacking_is_lossless() {
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (rows, k) = (3, 96);
            let bytes = blocks(format, rows, k, 5);
            let packed = PackedWeight::from_ggml(format, &bytes, rows, k).unwrap();
            let mut want = vec![0f32; rows * k];
            format.decode(&bytes, &mut want);
            assert_eq!(packed.dequantize(), want, "{format:?}");
        }
    }

    #[test]
    fn f16_packing_is_lossless() {
        let (rows, k) = (3, 70);
        let values: Vec<f16> = (0..rows * k)
            .map(|i| f16::from_f32((i as f32 - 100.0) * 0.37))
            .collect();
        let bits: Vec<u16> = values.iter().map(|v| v.to_bits()).collect();
        let packed = PackedWeight::from_f16(&bits, rows, k).unwrap();
        let want: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
        assert_eq!(packed.dequantize(), want);
        assert_eq!((packed.padded_k, packed.codes.len()), (128, rows * 64));
        assert!(PackedWeight::from_f16(&bits, rows, k + 1).is_err());
    }

    #[test]
    fn group4_repacking_is_lossless() {
        let (rows, k) = (5, 100);
        let data: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let q = Group4::quantize(&data, &[rows, k], 1, 64).unwrap();
        let packed = PackedWeight::from_group4(&q).unwrap();
        assert_eq!(packed.dequantize(), q.dequantize());
        assert_eq!(packed.stored_bytes(), rows * 128 / 2 + rows * 2 * 4);
    }
}
