//! Small numeric helpers the CPU kernels share, written over fixed-width lanes with no
//! branches so that the compiler turns them into vector code (inside `multiversion!` bodies
//! that is AVX2 or AVX-512).

/// Lanes of the accumulators (one AVX-512 register of f32).
pub const LANES: usize = 16;

/// `sum_i a[i] * b[i]`, accumulated in [`LANES`] partial sums.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `e^x` to about 2 ulp for `x` in `[-87, 88]` (clamped outside, so `e^-inf` reads as
/// `~1e-38`): `x = n ln 2 + r` with `n = round(x / ln 2)` and `|r| <= ln 2 / 2`, then
/// `e^x = 2^n (1 + r + r^2 p(r))` with Cephes' degree-5 polynomial `p`, and `2^n` built in the
/// exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer (ties to even)
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The larger of `a` and `b`, NaN when either is (`f32::max` returns the other one: a NaN
/// score or logit would vanish, and a broken model give finite numbers).
#[inline(always)]
pub fn max_nan(a: f32, b: f32) -> f32 {
    if b > a || b.is_nan() {
        b
    } else {
        a
    }
}

/// `max_i x[i]` (`-inf` when empty; NaN when any is NaN).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = max_nan(acc[l], c[l]);
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| max_nan(m, v))
}

/// `sum_i x[i]`, in [`LANES`] partial sums.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `sum_i e^(x[i] - shift)`, in f32 lanes, totalled in f64.
#[inline(always)]
pub fn sum_exp(x: &[f32], shift: f32) -> f64 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut total = 0.0f64;
    for (i, c) in chunks.enumerate() {
        for l in 0..LANES {
            acc[l] += exp(c[l] - shift);
        }
        // fold the lanes into f64 now and then, so long rows keep f32's relative precision
        if i % 64 == 63 {
            total += acc.iter().map(|&v| f64::from(v)).sum::<f64>();
            acc = [0.0; LANES];
        }
    }
    total += acc.iter().map(|&v| f64::from(v)).sum::<f64>();
    total + rest.iter().map(|&v| f64::from(exp(v - shift))).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn reductions_match_plain_loops() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 / 10.0 - 5.0)
            .collect();
        for n in [0, 1, 15, 16, 17, 999, 1000] {
            let x = &x[..n];
            let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            if n > 0 {
                let mut with_nan = x.to_vec();
                with_nan[n / 2] = f32::NAN;
                assert!(max(&with_nan).is_nan(), "a NaN is the max ({n} values)");
            }
            assert_eq!(max(x), m);
            let want: f64 = x.iter().map(|&v| f64::from(v - 1.0).exp()).sum();
            assert!((sum_exp(x, 1.0) - want).abs() <= 1e-6 * want.max(1.0));
            let d: f32 = x.iter().zip(x).map(|(a, b)| a * b).sum();
            assert!((dot(x, x) - d).abs() <= 1e-4 * d.max(1.0));
        }
    }
}
