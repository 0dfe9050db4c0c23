//! A linear weight's rows as the CPU kernels read them ([`WeightRows`]), and the decoding of
//! packed codes shared by the few-rows kernels (`matmul`) and the AVX-512 GEMM (`x86_gemm`).

use crate::layout::RowFormat;
use crate::quant::ggml::BlockFormat;

/// A linear weight's rows in their run-time layout, borrowed: f32 rows, packed codes and
/// scales (the run-time `PackedWeight` layout), or GGUF blocks as stored.
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
    /// GGUF blocks, each row `k / block_len` blocks padded to whole words.
    Blocks {
        /// The rows' words.
        words: &'a [u32],
        /// Columns (whole blocks).
        k: usize,
        /// The block format.
        format: BlockFormat,
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
            RowFormat::Blocks { k, format } => WeightRows::Blocks {
                words: segments[0],
                k,
                format,
            },
        }
    }

    /// Columns of the weight.
    pub fn k(&self) -> usize {
        match *self {
            WeightRows::F32 { k, .. }
            | WeightRows::Packed { k, .. }
            | WeightRows::Blocks { k, .. } => k,
        }
    }

    /// Words per row of GGUF blocks of `format` (`k` values, padded to whole words).
    fn block_row_words(format: BlockFormat, k: usize) -> usize {
        RowFormat::Blocks { k, format }.row_bytes() / 4
    }

    /// Row `r`'s GGUF blocks (without the padding), for block rows; empty otherwise.
    #[inline(always)]
    pub fn block_row(&self, r: usize) -> &'a [u8] {
        match *self {
            WeightRows::Blocks { words, k, format } => {
                let per = Self::block_row_words(format, k);
                let bytes: &'a [u8] = bytemuck::cast_slice(&words[r * per..(r + 1) * per]);
                &bytes[..format.bytes_for(k)]
            }
            _ => &[],
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
            WeightRows::Blocks { words, k, format } => {
                words.len() / Self::block_row_words(format, k).max(1)
            }
        }
    }

    /// Row `r`'s code words and scale words (empty for f32 rows).
    pub fn packed_row(&self, r: usize) -> (&'a [u32], &'a [u32]) {
        match self.slice(r..r + 1) {
            WeightRows::F32 { .. } | WeightRows::Blocks { .. } => (&[], &[]),
            WeightRows::Packed { codes, scales, .. } => (codes, scales),
        }
    }

    /// Rows `rows` of the weight, as a weight of their own.
    pub fn slice(&self, rows: std::ops::Range<usize>) -> Self {
        match *self {
            WeightRows::F32 { values, k } => WeightRows::F32 {
                values: &values[rows.start * k..rows.end * k],
                k,
            },
            WeightRows::Packed {
                codes,
                scales,
                k,
                padded_k,
                group,
                bits,
            } => {
                let (words, groups) = (padded_k * bits as usize / 32, padded_k / group);
                WeightRows::Packed {
                    codes: &codes[rows.start * words..rows.end * words],
                    scales: &scales[rows.start * groups..rows.end * groups],
                    k,
                    padded_k,
                    group,
                    bits,
                }
            }
            WeightRows::Blocks { words, k, format } => {
                let per = Self::block_row_words(format, k);
                WeightRows::Blocks {
                    words: &words[rows.start * per..rows.end * per],
                    k,
                    format,
                }
            }
        }
    }

    /// Decodes row `r` into `out` (`k` values): `code * step + min` per value, or the
    /// blocks' own decoding.
    #[inline(always)]
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        match *self {
            WeightRows::F32 { values, k } => out[..k].copy_from_slice(&values[r * k..(r + 1) * k]),
            WeightRows::Blocks { k, format, .. } => format.decode(self.block_row(r), &mut out[..k]),
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
                for (g, &sw) in scales.iter().enumerate() {
                    let (step, min) = scale_pair(sw);
                    let c0 = g * group;
                    if group % 16 == 0 {
                        for at in (c0..c0 + group).step_by(16).take_while(|&at| at < k) {
                            let q = codes16(codes, bits, at);
                            let n = 16.min(k - at);
                            for (o, &qv) in out[at..at + n].iter_mut().zip(&q) {
                                *o = qv.mul_add(step, min);
                            }
                        }
                    } else {
                        // one code at a time (groups of 8 or 24)
                        for c in c0..(c0 + group).min(k) {
                            let w = codes[c / per_word];
                            let shift = bits as usize * (c % per_word);
                            let q = (w >> shift) & ((1u64 << bits) - 1) as u32;
                            let q = if bits == 16 {
                                f16_bits_to_f32(q)
                            } else {
                                q as f32
                            };
                            out[c] = q.mul_add(step, min);
                        }
                    }
                }
            }
        }
    }
}

/// An IEEE half's bits as f32, exactly (subnormals, infinities and NaN included), without
/// branches so that it vectorizes: the exponent is rebiased, and subnormals are renormalized
/// by a float subtraction (`2^-14 * 0.mantissa` = `(1.mantissa - 1) * 2^-14`).
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u32) -> f32 {
    const SHIFTED_EXP: u32 = 0x7c00 << 13;
    let bits = (h & 0x7fff) << 13;
    let exp = bits & SHIFTED_EXP;
    let normal = bits + ((127 - 15) << 23);
    let inf_nan = normal + ((128 - 16) << 23);
    let sub = (f32::from_bits(normal + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let magnitude = if exp == SHIFTED_EXP {
        inf_nan
    } else if exp == 0 {
        sub
    } else {
        normal
    };
    f32::from_bits(magnitude | ((h & 0x8000) << 16))
}

/// The `(step, min)` of a packed scale word (two halves, step in the low one).
#[inline(always)]
pub(crate) fn scale_pair(word: u32) -> (f32, f32) {
    (f16_bits_to_f32(word & 0xffff), f16_bits_to_f32(word >> 16))
}

/// Codes `at..at + 16` of a row (`at` a multiple of 16) as f32, not yet scaled: nibbles,
/// bytes or IEEE halves, in order. The words are read as little-endian bytes, so code `c` of
/// 4 bits is the low (even `c`) or high nibble of byte `c / 2`, of 8 bits byte `c`, of 16 bits
/// bytes `2c, 2c + 1`; written lane by lane over bytes, this compiles to byte unpacks and
/// widening conversions rather than gathers.
#[inline(always)]
pub(crate) fn codes16(words: &[u32], bits: u32, at: usize) -> [f32; 16] {
    let mut out = [0.0f32; 16];
    match bits {
        4 => {
            let b: &[u8; 8] = bytemuck::cast_slice(&words[at / 8..at / 8 + 2])
                .try_into()
                .unwrap_or(&[0; 8]);
            let mut q = [0u8; 16];
            for j in 0..8 {
                q[2 * j] = b[j] & 15;
                q[2 * j + 1] = b[j] >> 4;
            }
            for l in 0..16 {
                out[l] = f32::from(q[l]);
            }
        }
        8 => {
            let b: &[u8; 16] = bytemuck::cast_slice(&words[at / 4..at / 4 + 4])
                .try_into()
                .unwrap_or(&[0; 16]);
            for l in 0..16 {
                out[l] = f32::from(b[l]);
            }
        }
        _ => {
            let h: &[u16; 16] = bytemuck::cast_slice(&words[at / 2..at / 2 + 8])
                .try_into()
                .unwrap_or(&[0; 16]);
            for l in 0..16 {
                out[l] = f16_bits_to_f32(u32::from(h[l]));
            }
        }
    }
    out
}
