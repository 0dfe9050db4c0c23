//! The linear forms the cost model's terms are written in: a constant plus a coefficient per
//! placement fraction ([`x`]), so that the LP search can optimize over the fractions.

/// Index of each placement fraction in a [`Linear`] form.
pub mod x {
    /// Weights on GPU, CPU, disk.
    pub const WG: usize = 0;
    /// Weights in CPU RAM.
    pub const WC: usize = 1;
    /// Weights on disk.
    pub const WN: usize = 2;
    /// KV cache on GPU.
    pub const CG: usize = 3;
    /// KV cache in CPU RAM.
    pub const CC: usize = 4;
    /// KV cache on disk.
    pub const CN: usize = 5;
    /// Activations on GPU.
    pub const HG: usize = 6;
    /// Activations in CPU RAM.
    pub const HC: usize = 7;
    /// Activations on disk.
    pub const HN: usize = 8;
    /// Number of placement fractions.
    pub const COUNT: usize = 9;
}

/// `constant + sum_i coef[i] * x[i]` over the placement fractions.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Linear {
    /// The part that does not depend on placement.
    pub constant: f64,
    /// Coefficients of `x`.
    pub coef: [f64; x::COUNT],
}

impl Linear {
    pub(crate) fn constant(c: f64) -> Self {
        Self {
            constant: c,
            ..Self::default()
        }
    }
    /// `scale * sum of the given fractions`.
    pub(crate) fn of(scale: f64, fractions: &[usize]) -> Self {
        let mut l = Self::default();
        for &i in fractions {
            l.coef[i] += scale;
        }
        l
    }
    /// Value at placement `x`.
    pub fn eval(&self, x: &[f64; x::COUNT]) -> f64 {
        self.constant + self.coef.iter().zip(x).map(|(c, v)| c * v).sum::<f64>()
    }
}

impl std::ops::Add for Linear {
    type Output = Linear;
    fn add(mut self, o: Linear) -> Linear {
        self.constant += o.constant;
        for (a, b) in self.coef.iter_mut().zip(o.coef) {
            *a += b;
        }
        self
    }
}
