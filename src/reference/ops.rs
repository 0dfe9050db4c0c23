//! The reference's building blocks on `ndarray` matrices whose rows are tokens.
//!
//! Matrix products go through ndarray's `dot` (matrixmultiply); only O(rows x width) element-wise
//! work is written out here.

use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, Zip};

/// A linear layer: `y = x W^T + b`, with `W` stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Array2<f32>,
    /// `[out]`.
    pub bias: Option<Array1<f32>>,
}

impl Linear {
    /// `x [rows, in] -> [rows, out]`.
    pub fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let mut y = x.dot(&self.weight.t());
        if let Some(b) = &self.bias {
            y += b;
        }
        y
    }
}

/// LayerNorm over each row: `y = (x - mean) / sqrt(var + eps) * w + b` (biased variance).
pub fn layer_norm(x: ArrayView2<f32>, w: &Array1<f32>, b: &Array1<f32>, eps: f32) -> Array2<f32> {
    let mut y = x.to_owned();
    for mut row in y.rows_mut() {
        let n = row.len() as f32;
        let mean = row.sum() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        Zip::from(&mut row)
            .and(w)
            .and(b)
            .for_each(|v, &w, &b| *v = (*v - mean) * inv * w + b);
    }
    y
}

/// RMSNorm over each row: `y = x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: ArrayView2<f32>, w: &Array1<f32>, eps: f32) -> Array2<f32> {
    let mut y = x.to_owned();
    for mut row in y.rows_mut() {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        Zip::from(&mut row)
            .and(w)
            .for_each(|v, &w| *v = *v * inv * w);
    }
    y
}

/// SiLU-gated product, in place: `gate = silu(gate) * up` with `silu(g) = g / (1 + e^-g)`.
/// GeGLU: `gate = gelu_tanh(gate) * up`, `gelu_tanh(g) = g / 2 * (1 + tanh(sqrt(2 / pi) *
/// (g + 0.044715 g^3)))` (torch's `gelu(approximate="tanh")`), computed in f64.
pub fn gelu_tanh_mul(gate: &mut Array2<f32>, up: &Array2<f32>) {
    gate.zip_mut_with(up, |g, &u| {
        let x = f64::from(*g);
        let t = ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh();
        *g = (0.5 * x * (1.0 + t) * f64::from(u)) as f32;
    });
}

pub fn silu_mul(gate: &mut Array2<f32>, up: &Array2<f32>) {
    Zip::from(gate)
        .and(up)
        .for_each(|g, &u| *g = *g / (1.0 + (-*g).exp()) * u);
}

/// `ln p(target)` under `softmax(logits)`, with the log-sum-exp accumulated in f64:
/// `logits[target] - (max + ln sum_j exp(logits[j] - max))`.
pub fn log_softmax_at(logits: ArrayView1<f32>, target: usize) -> f32 {
    let max = logits.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    (f64::from(logits[target] - max) - sum.ln()) as f32
}

/// Index of the largest logit (the first, on ties).
pub fn argmax(logits: ArrayView1<f32>) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

/// Rotary position embedding in Hugging Face's rotate-half form, for a set of positions.
///
/// For position `p` and pair index `i < d/2`: `theta_i = p * base^(-2i/d)`; a head's vector
/// `x = [x1 | x2]` (halves) becomes `[x1 cos - x2 sin | x2 cos + x1 sin]`.
pub struct Rope {
    /// `[positions, d/2]`.
    cos: Array2<f32>,
    sin: Array2<f32>,
}

impl Rope {
    /// Tables for the given absolute positions and inverse frequencies (one per pair of a
    /// head's dimensions: [`crate::device::rope_inv_freq`], scaled as the model says).
    pub fn new(positions: &[usize], inv_freq: &[f64]) -> Self {
        let half = inv_freq.len();
        let angle = |r: usize, i: usize| positions[r] as f64 * inv_freq[i];
        let cos = Array2::from_shape_fn((positions.len(), half), |(r, i)| angle(r, i).cos() as f32);
        let sin = Array2::from_shape_fn((positions.len(), half), |(r, i)| angle(r, i).sin() as f32);
        Self { cos, sin }
    }

    /// Rotates every head of `x [rows, heads * head_dim]` in place; row `r` uses position `r`
    /// of the table.
    pub fn apply(&self, mut x: ArrayViewMut2<f32>, head_dim: usize) {
        let half = head_dim / 2;
        let heads = x.ncols() / head_dim;
        for (r, mut row) in x.rows_mut().into_iter().enumerate() {
            for h in 0..heads {
                let base = h * head_dim;
                for i in 0..half {
                    let (c, s) = (self.cos[[r, i]], self.sin[[r, i]]);
                    let (x1, x2) = (row[base + i], row[base + half + i]);
                    row[base + i] = x1 * c - x2 * s;
                    row[base + half + i] = x2 * c + x1 * s;
                }
            }
        }
    }
}

pub use crate::layout::HeadLayout;

/// How attention scores are made: `scale * q . k`, soft-capped at `softcap`
/// (`cap * tanh(s / cap)`), and the keys a query sees (its own and up to `window - 1` before).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// The scores' scale (`1 / sqrt(head_dim)` unless the model says otherwise).
    pub scale: f32,
    /// A sliding window, or all earlier keys.
    pub window: Option<usize>,
    /// Gemma 2's soft-cap, or none.
    pub softcap: Option<f32>,
}

impl Scores {
    /// `scale * q . k` over every earlier key.
    pub fn scaled(scale: f32) -> Self {
        Self {
            scale,
            window: None,
            softcap: None,
        }
    }
}

/// Causal attention of one sequence's new rows against its whole cache.
///
/// `q [t, heads * d]` holds the queries of positions `past..past + t`; `k`, `v`
/// `[past + t, kv_heads * d]` hold every position's keys and values. Query head `h` reads kv head
/// `h / (heads / kv_heads)`. For query row `i`, `scores_j = scale * q_i . k_j` for `j <= past + i`
/// (later keys masked, and with a window those before the last `window`; soft-capped as
/// `scores` says), `out_i = sum_j softmax(scores)_j v_j`. Returns `[t, heads * d]`.
pub fn causal_attention(
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    v: ArrayView2<f32>,
    past: usize,
    layout: HeadLayout,
    scores: Scores,
) -> Array2<f32> {
    let Scores {
        scale,
        window,
        softcap,
    } = scores;
    let HeadLayout {
        heads,
        kv_heads,
        head_dim: d,
    } = layout;
    let group = heads / kv_heads;
    let t = q.nrows();
    let mut out = Array2::zeros((t, heads * d));
    for h in 0..heads {
        let g = h / group;
        let qh = q.slice(s![.., h * d..(h + 1) * d]);
        let kh = k.slice(s![.., g * d..(g + 1) * d]);
        let vh = v.slice(s![.., g * d..(g + 1) * d]);
        let mut scores = qh.dot(&kh.t());
        scores *= scale;
        if let Some(cap) = softcap {
            // Gemma 2's soft-capping, in f64
            scores
                .mapv_inplace(|s| (f64::from(cap) * (f64::from(s) / f64::from(cap)).tanh()) as f32);
        }
        for (i, mut row) in scores.axis_iter_mut(Axis(0)).enumerate() {
            // softmax over the visible keys 0..=past+i (the last `window` of them when the
            // model has a sliding window); masked keys get probability 0
            let visible = past + i + 1;
            let from = window.map_or(0, |w| visible.saturating_sub(w));
            row.slice_mut(s![visible..]).fill(0.0);
            row.slice_mut(s![..from]).fill(0.0);
            let mut seen = row.slice_mut(s![from..visible]);
            let max = seen.fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            seen.mapv_inplace(|x| (x - max).exp());
            let sum = seen.sum();
            seen /= sum;
        }
        out.slice_mut(s![.., h * d..(h + 1) * d])
            .assign(&scores.dot(&vh));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn layer_norm_matches_hand_computation() {
        let x = array![[1.0f32, 2.0, 3.0, 6.0]];
        let y = layer_norm(x.view(), &Array1::ones(4), &Array1::zeros(4), 0.0);
        // mean 3, var (4 + 1 + 0 + 9) / 4 = 3.5
        let sd = 3.5f32.sqrt();
        for (a, b) in y.iter().zip([-2.0 / sd, -1.0 / sd, 0.0, 3.0 / sd]) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn log_softmax_is_normalised() {
        let logits = array![1.0f32, -3.0, 200.0, 0.5];
        let total: f64 = (0..4)
            .map(|i| f64::from(log_softmax_at(logits.view(), i)).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(argmax(logits.view()), 2);
    }

    #[test]
    fn first_query_attends_only_to_itself() {
        let q = array![[1.0f32, 0.0], [0.0, 1.0]];
        let k = array![[1.0f32, 0.0], [0.0, 1.0]];
        let v = array![[5.0f32, 7.0], [-1.0, 2.0]];
        let layout = HeadLayout {
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
        };
        let out = causal_attention(q.view(), k.view(), v.view(), 0, layout, Scores::scaled(1.0));
        assert_eq!(out.row(0).to_vec(), vec![5.0, 7.0]);
        // row 1: softmax([0, 1]) over v
        let p1 = 1.0 / (1.0 + 1f32.exp());
        let expect = [p1 * 5.0 + -(1.0 - p1), p1 * 7.0 + (1.0 - p1) * 2.0];
        for (a, b) in out.row(1).iter().zip(expect) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let mut x = array![[1.0f32, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]];
        Rope::new(&[0, 5], &crate::device::rope_inv_freq(4, 10000.0)).apply(x.view_mut(), 4);
        assert_eq!(x.row(0).to_vec(), vec![1.0, 2.0, 3.0, 4.0]);
        let n: f32 = x.row(1).iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
        // pair (x0, x2) rotated by angle 5 rad
        assert!((x[[1, 0]] - (5f32.cos() - 3.0 * 5f32.sin())).abs() < 1e-5);
    }
}
