//! The 4-bit KV cache row layout (FlexGen's groups along head_dim), and its host quantizer.
//!
//! A cache row (one token of one layer) holds `kv_heads` heads of `head_dim` values; each head
//! is padded to `padded` values (a multiple of 8) and split into groups of `group` values.
//! Codes: padded column `c` of row `r` is word `r * width / 8 + c / 8`, bits `4 * (c % 8)`.
//! Scales: one u32 `pack2x16float(step, min)` per group, word `r * width / group + c / group`.
//! A value is `code * step + min`.

use half::f16;

/// How one cache row is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Q4Layout {
    /// Key/value heads per row.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// `head_dim` rounded up to a multiple of 8.
    pub padded: usize,
    /// Values per group: the largest multiple of 8 that is at most 64 and divides `padded`
    /// (64 = FlexGen's group for head_dim 64 or 128); groups never straddle heads.
    pub group: usize,
}

impl Q4Layout {
    /// The layout for `kv_heads` heads of `head_dim`.
    pub fn new(kv_heads: usize, head_dim: usize) -> Self {
        let padded = head_dim.div_ceil(8) * 8;
        let group = (1..=8)
            .rev()
            .map(|m| 8 * m)
            .find(|g| padded.is_multiple_of(*g))
            .unwrap_or(8);
        Self {
            kv_heads,
            head_dim,
            padded,
            group,
        }
    }
    /// Values per row, heads padded.
    pub fn width(&self) -> usize {
        self.kv_heads * self.padded
    }
    /// u32 code words per row.
    pub fn words_per_row(&self) -> usize {
        self.width() / 8
    }
    /// Groups (and scale words) per row.
    pub fn groups_per_row(&self) -> usize {
        self.width() / self.group
    }
    /// Bytes per cached token (codes and scales).
    pub fn bytes_per_row(&self) -> usize {
        4 * (self.words_per_row() + self.groups_per_row())
    }
}

/// Quantizes one row of `kv_heads * head_dim` values into `codes` (`words_per_row`) and
/// `scales` (`groups_per_row`), as the device kernels do: per group `step = (max - min) / 15`
/// and `min` rounded to f16, then `code = round((x - min) / step)` clamped to 0..=15 against
/// the rounded pair (padding values read as 0).
pub fn quantize_row(layout: &Q4Layout, row: &[f32], codes: &mut [u32], scales: &mut [u32]) {
    let value = |c: usize| -> f32 {
        let (head, e) = (c / layout.padded, c % layout.padded);
        if e >= layout.head_dim {
            0.0
        } else {
            row[head * layout.head_dim + e]
        }
    };
    for (j, scale) in scales.iter_mut().enumerate().take(layout.groups_per_row()) {
        let c0 = j * layout.group;
        let (lo, hi) = (c0..c0 + layout.group)
            .map(value)
            .fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (step, min) = (f16::from_f32((hi - lo) / 15.0), f16::from_f32(lo));
        *scale = u32::from(step.to_bits()) | (u32::from(min.to_bits()) << 16);
        let (s, m) = (step.to_f32(), min.to_f32());
        for (w, code) in codes
            .iter_mut()
            .enumerate()
            .take((c0 + layout.group) / 8)
            .skip(c0 / 8)
        {
            let mut word = 0u32;
            for b in 0..8 {
                let q = if s > 0.0 {
                    ((value(w * 8 + b) - m) / s).round().clamp(0.0, 15.0)
                } else {
                    0.0
                };
                word |= (q as u32) << (4 * b);
            }
            *code = word;
        }
    }
}

/// The `(step, min)` of a packed scale word.
pub fn unpack_scale(word: u32) -> (f32, f32) {
    (
        f16::from_bits(word as u16).to_f32(),
        f16::from_bits((word >> 16) as u16).to_f32(),
    )
}

/// Decodes one quantized row back to `kv_heads * head_dim` values (the tests' reference).
#[cfg(test)]
pub(crate) fn dequantize_row(layout: &Q4Layout, codes: &[u32], scales: &[u32], out: &mut [f32]) {
    for head in 0..layout.kv_heads {
        for e in 0..layout.head_dim {
            let c = head * layout.padded + e;
            let q = (codes[c / 8] >> (4 * (c % 8))) & 15;
            let (s, m) = unpack_scale(scales[c / layout.group]);
            out[head * layout.head_dim + e] = q as f32 * s + m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_group_within_heads() {
        assert_eq!(Q4Layout::new(3, 64).group, 64);
        assert_eq!(Q4Layout::new(1, 128).group, 64);
        assert_eq!(Q4Layout::new(2, 24).group, 24);
        assert_eq!(Q4Layout::new(2, 96).group, 48);
        let l = Q4Layout::new(3, 1);
        assert_eq!((l.padded, l.group), (8, 8));
        // FlexGen's 36 bytes per 64 values
        assert_eq!(Q4Layout::new(1, 64).bytes_per_row(), 36);
    }

    #[test]
    fn rows_round_trip_within_half_a_step() {
        let l = Q4Layout::new(2, 24);
        let row: Vec<f32> = (0..48)
            .map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.2)
            .collect();
        let (mut codes, mut scales) = (vec![0; l.words_per_row()], vec![0; l.groups_per_row()]);
        quantize_row(&l, &row, &mut codes, &mut scales);
        let mut back = vec![0.0; 48];
        dequantize_row(&l, &codes, &scales, &mut back);
        for (i, (&a, &b)) in row.iter().zip(&back).enumerate() {
            let (s, _) = unpack_scale(scales[(i / 24 * l.padded + i % 24) / l.group]);
            assert!((a - b).abs() <= 0.5 * s + 1e-3, "{i}: {a} vs {b}");
        }
    }
}
