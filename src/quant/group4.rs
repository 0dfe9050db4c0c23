//! FlexGen's 4-bit asymmetric group quantization, in one packed layout shared by the CPU code
//! and (later) the WGSL kernels.
//!
//! A tensor of shape `[..outer, len, ..inner]` is grouped along one dimension (`group_dim`, of
//! length `len`): that dimension is padded to `padded = ceil(len / G) * G` (`G` = group size, 64)
//! and split into `padded / G` groups of `G` consecutive values. Per group, with `mn` and `mx` its
//! minimum and maximum:
//! ```text
//! min  = mn rounded down to f16                     (stored f16)
//! step = (mx - min) / 15 rounded up to f16          (stored f16; FlexGen stores 15 / (mx - mn))
//! q    = clamp(round((x - min) / step), 0, 15)      (0 when step == 0: a constant group)
//! x'   = q * step + min
//! ```
//! Rounding `min` down and `step` up keeps every value inside `[min, min + 15 step]`, so
//! `|x - x'| <= step / 2` holds exactly, f16 storage included.
//!
//! Layout, for outer index `o`, padded position `p` and inner index `i`:
//! - value `(o, p, i)` has linear index `e = (o * padded + p) * inner + i`; its nibble is in byte
//!   `e / 2`, the low nibble when `e` is even;
//! - group `(o, p / G, i)` has linear index `(o * groups + p / G) * inner + i` into `steps` and
//!   `mins`. Padding values are 0 and count in their group's min and max, as in FlexGen.
//!
//! 64 values take 32 bytes of nibbles and 4 bytes of (step, min): 36 bytes instead of 128 in fp16.

use half::f16;

use crate::error::{Error, Result};

/// Values per group in FlexGen's format.
pub const DEFAULT_GROUP: usize = 64;

/// A tensor in 4-bit groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Group4 {
    /// Shape of the original (unpadded) tensor.
    pub shape: Vec<usize>,
    /// The grouped dimension.
    pub group_dim: usize,
    /// Values per group.
    pub group_size: usize,
    /// Packed nibbles (see the module docs for the order).
    pub nibbles: Vec<u8>,
    /// Per-group step (f16).
    pub steps: Vec<f16>,
    /// Per-group minimum (f16).
    pub mins: Vec<f16>,
}

/// `outer`, `len` and `inner` of a shape split at `dim`.
fn split(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (
        shape[..dim].iter().product(),
        shape[dim],
        shape[dim + 1..].iter().product(),
    )
}

/// The largest f16 not above `x` (x finite and within f16's range).
fn f16_floor(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() <= x {
        h
    } else if h.to_f32() == 0.0 {
        f16::from_bits(0x8001) // the smallest negative subnormal
    } else if h.is_sign_positive() {
        f16::from_bits(h.to_bits() - 1)
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

/// The smallest f16 not below `x` (x >= 0, finite and within f16's range).
fn f16_ceil(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

impl Group4 {
    /// Quantizes `data` (row-major `shape`) in groups of `group_size` along `group_dim`.
    /// Fails on a shape that does not match, a bad dimension or group size, or values outside
    /// f16's range (|x| > 65504) or not finite.
    pub fn quantize(
        data: &[f32],
        shape: &[usize],
        group_dim: usize,
        group_size: usize,
    ) -> Result<Self> {
        let bad = |reason: String| Err(Error::invalid("group quantization", reason));
        if group_dim >= shape.len() {
            return bad(format!(
                "group_dim {group_dim} for a {}-d tensor",
                shape.len()
            ));
        }
        if group_size == 0 || !group_size.is_multiple_of(2) {
            return bad(format!("group size {group_size} must be even and positive"));
        }
        if shape.iter().product::<usize>() != data.len() {
            return bad(format!("{} values for shape {shape:?}", data.len()));
        }
        if let Some(v) = data.iter().find(|v| !v.is_finite() || v.abs() > 65504.0) {
            return bad(format!("value {v} does not fit f16"));
        }
        let (outer, len, inner) = split(shape, group_dim);
        let groups = len.div_ceil(group_size);
        let padded = groups * group_size;
        let n_groups = outer * groups * inner;
        let mut steps = vec![f16::ZERO; n_groups];
        let mut mins = vec![f16::ZERO; n_groups];
        let mut nibbles = vec![0u8; (outer * padded * inner).div_ceil(2)];
        // value (o, p, i), zero in the padding
        let value = |o: usize, p: usize, i: usize| {
            if p < len {
                data[(o * len + p) * inner + i]
            } else {
                0.0
            }
        };
        for o in 0..outer {
            for g in 0..groups {
                for i in 0..inner {
                    let positions = g * group_size..(g + 1) * group_size;
                    let (mn, mx) =
                        positions
                            .clone()
                            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), p| {
                                let v = value(o, p, i);
                                (a.min(v), b.max(v))
                            });
                    let min = f16_floor(mn);
                    let step = f16_ceil((mx - min.to_f32()) / 15.0);
                    let gi = (o * groups + g) * inner + i;
                    mins[gi] = min;
                    steps[gi] = step;
                    let (min, step) = (min.to_f32(), step.to_f32());
                    for p in positions {
                        let q = if step > 0.0 {
                            ((value(o, p, i) - min) / step).round().clamp(0.0, 15.0) as u8
                        } else {
                            0
                        };
                        let e = (o * padded + p) * inner + i;
                        nibbles[e / 2] |= if e.is_multiple_of(2) { q } else { q << 4 };
                    }
                }
            }
        }
        Ok(Self {
            shape: shape.to_vec(),
            group_dim,
            group_size,
            nibbles,
            steps,
            mins,
        })
    }

    /// The 4-bit code of value `(o, p, i)`.
    fn code(&self, e: usize) -> u8 {
        let b = self.nibbles[e / 2];
        if e.is_multiple_of(2) {
            b & 0x0F
        } else {
            b >> 4
        }
    }

    /// Decodes back to f32 in the original shape: `x' = q * step + min`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (outer, len, inner) = split(&self.shape, self.group_dim);
        let groups = len.div_ceil(self.group_size);
        let padded = groups * self.group_size;
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            for p in 0..len {
                for i in 0..inner {
                    let gi = (o * groups + p / self.group_size) * inner + i;
                    let q = f32::from(self.code((o * padded + p) * inner + i));
                    out.push(q * self.steps[gi].to_f32() + self.mins[gi].to_f32());
                }
            }
        }
        out
    }

    /// The step of the group holding element `index` (row-major in the original shape).
    pub fn step_of(&self, index: usize) -> f32 {
        let (_, len, inner) = split(&self.shape, self.group_dim);
        let groups = len.div_ceil(self.group_size);
        let (o, rest) = (index / (len * inner), index % (len * inner));
        let (p, i) = (rest / inner, rest % inner);
        self.steps[(o * groups + p / self.group_size) * inner + i].to_f32()
    }

    /// Bytes stored: nibbles plus an f16 step and an f16 minimum per group.
    pub fn stored_bytes(&self) -> usize {
        self.nibbles.len() + 4 * self.steps.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sixty_four_values_take_36_bytes() {
        let data: Vec<f32> = (0..64).map(|v| v as f32 / 7.0 - 3.0).collect();
        let q = Group4::quantize(&data, &[64], 0, 64).unwrap();
        assert_eq!(q.stored_bytes(), 36);
    }

    #[test]
    fn constant_groups_are_exact() {
        let q = Group4::quantize(&[2.5; 70], &[70], 0, 64).unwrap();
        // the first group is all 2.5; the second mixes 2.5 and padding zeros
        assert!(q.dequantize()[..64].iter().all(|&v| v == 2.5));
        assert!(Group4::quantize(&[f32::NAN], &[1], 0, 64).is_err());
        assert!(Group4::quantize(&[1.0; 6], &[2, 3], 2, 64).is_err());
        assert!(Group4::quantize(&[1.0; 6], &[2, 3], 0, 3).is_err());
    }

    #[test]
    fn f16_rounding_directions() {
        for x in [0.1f32, -0.1, 1e-7, -1e-7, 3.0, 0.0, -65504.0] {
            assert!(f16_floor(x).to_f32() <= x, "{x}");
        }
        for x in [0.1f32, 1e-7, 3.0001, 0.0] {
            assert!(f16_ceil(x).to_f32() >= x, "{x}");
        }
    }

    proptest! {
        /// Every value comes back within half its group's step, on shapes whose grouped
        /// dimension is not a multiple of the group size, along any dimension.
        #[test]
        fn round_trip_within_half_a_step(
            dims in prop::collection::vec(1usize..40, 1..4),
            group_dim_seed in any::<usize>(),
            group_size in prop::sample::select(vec![2usize, 8, 64]),
            scale in 0.001f32..100.0,
            seed in any::<u64>(),
        ) {
            let group_dim = group_dim_seed % dims.len();
            let n: usize = dims.iter().product();
            let mut state = seed | 1;
            let data: Vec<f32> = (0..n).map(|_| {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                ((state % 20001) as f32 / 10000.0 - 1.0) * scale
            }).collect();
            let q = Group4::quantize(&data, &dims, group_dim, group_size).unwrap();
            let back = q.dequantize();
            prop_assert_eq!(back.len(), n);
            for (idx, (a, b)) in data.iter().zip(&back).enumerate() {
                let half_step = q.step_of(idx) / 2.0;
                // f32 arithmetic in q * step + min may add one rounding of the result
                prop_assert!((a - b).abs() <= half_step + a.abs() * 1e-6 + 1e-12,
                    "{a} -> {b}, half step {half_step}");
            }
        }

        /// Values already on a group's grid (step 0.25 from -2, each group holding codes 0 and
        /// 15) come back exactly: the nibble packing loses nothing.
        #[test]
        fn packing_round_trips_exactly(
            groups in 1usize..4,
            inner in 1usize..5,
            codes in prop::collection::vec(0u8..16, 64 * 4 * 4),
        ) {
            let len = groups * 64;
            let data: Vec<f32> = (0..len * inner)
                .map(|e| {
                    let p = e / inner;
                    let q = match p % 64 { 0 => 0, 1 => 15, _ => codes[e % codes.len()] };
                    f32::from(q) * 0.25 - 2.0
                })
                .collect();
            let q = Group4::quantize(&data, &[len, inner], 0, 64).unwrap();
            prop_assert_eq!(q.dequantize(), data);
        }
    }
}
