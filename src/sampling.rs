//! How generated tokens are chosen and when a sequence is done: greedy or sampled (temperature,
//! top-k, top-p) from a per-sequence seed, up to a token budget, an end-of-sequence token or
//! a caller's stop condition (stop strings, matched on decoded text by the generation job).

use crate::error::{Error, Result};

/// How the next token is drawn from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Divides the logits before the softmax; 0 is greedy (the argmax).
    pub temperature: f32,
    /// Draw only among the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Draw only among the most likely tokens whose probabilities (after temperature and top-k)
    /// add up to at least `top_p` (1: all).
    pub top_p: f32,
    /// Seeds the draws: token `t` of a sequence is drawn with the `t`-th number of the seed's
    /// stream, so a sequence gives the same tokens whatever batch or block it runs in.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self::GREEDY
    }
}

/// Logits more than this below the largest (after temperature) are left out of a draw: each
/// has a probability below `e^-30` of the largest's, so all of them together (at most a
/// vocabulary's worth, 2^18) weigh less than `2.5e-8` of it.
const NEGLIGIBLE: f64 = 30.0;

impl Sampling {
    /// The argmax, always.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };

    /// Whether the choice is the argmax (temperature 0, or top-k 1).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Checks the parameters, naming the one out of range.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid(
                "temperature",
                format!("{}: must be 0 (greedy) or more", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "top_p",
                format!("{}: must be in (0, 1]", self.top_p),
            ));
        }
        Ok(())
    }

    /// Chooses token `step` of a sequence from its `logits` (one per vocabulary entry):
    /// returns it with its logprob under the model's own distribution (`ln softmax(logits)`,
    /// before temperature and filtering, as scoring the output would give).
    ///
    /// Sampling: `w_i = e^((l_i - max) / T)` over the candidates (the `top_k` largest logits,
    /// ties by lower id; those within `NEGLIGIBLE` of the largest), sorted by logit; the
    /// nucleus is the shortest prefix whose `w` reach `top_p * sum(w)`; then the token where the
    /// running sum of the nucleus's `w` first exceeds `u * sum`, with `u` the seed's number for
    /// this step.
    pub fn pick(&self, logits: &[f32], step: usize) -> (u32, f32) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_z = f64::from(max)
            + logits
                .iter()
                .map(|&l| f64::from(l - max).exp())
                .sum::<f64>()
                .ln();
        let logprob = |i: u32| (f64::from(logits[i as usize]) - log_z) as f32;
        if self.is_greedy() || logits.is_empty() {
            let best = logits.iter().position(|&l| l == max).unwrap_or(0) as u32;
            return (best, logprob(best));
        }
        let t = f64::from(self.temperature);
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut candidates: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| f64::from(logits[i as usize] - max) / t > -NEGLIGIBLE)
            .collect();
        if self.top_k > 0 && candidates.len() > self.top_k {
            candidates.select_nth_unstable_by(self.top_k - 1, by_logit);
            candidates.truncate(self.top_k);
        }
        candidates.sort_unstable_by(by_logit);
        let weights: Vec<f64> = candidates
            .iter()
            .map(|&i| (f64::from(logits[i as usize] - max) / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // the nucleus: the shortest prefix reaching top_p of the mass
        let mut kept = weights.len();
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            for (n, w) in weights.iter().enumerate() {
                acc += w;
                if acc >= f64::from(self.top_p) * total {
                    kept = n + 1;
                    break;
                }
            }
        }
        let mass: f64 = weights[..kept].iter().sum();
        let target = uniform(self.seed, step as u64) * mass;
        let mut acc = 0.0;
        for (&i, w) in candidates[..kept].iter().zip(&weights) {
            acc += w;
            if acc > target {
                return (i, logprob(i));
            }
        }
        let last = candidates[kept - 1];
        (last, logprob(last))
    }
}

/// The `n`-th number in `[0, 1)` of `seed`'s stream: SplitMix64 of `seed + (n + 1) * golden`,
/// 53 bits.
fn uniform(seed: u64, n: u64) -> f64 {
    let mut z = seed.wrapping_add(n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// How one sequence is generated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decoding {
    /// New tokens at most (at least 1 when other sequences of its call generate: a block's
    /// first step gives every sequence its first token).
    pub max_tokens: usize,
    /// How each is chosen.
    pub sampling: Sampling,
    /// Tokens that end the sequence (kept as its last token): the model's end of sequence.
    pub stop_tokens: Vec<u32>,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It reached its `max_tokens`.
    Length,
    /// It generated one of its stop tokens.
    Eos,
    /// The caller's stop condition held (a stop string appeared).
    Stop,
}

impl FinishReason {
    /// The name the generation job writes: `length`, `eos` or `stop`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| (f64::from(l - max) / t).exp())
            .collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    #[test]
    fn greedy_takes_the_first_argmax_with_its_model_logprob() {
        let logits = [1.0, 3.0, 3.0, -2.0];
        let (tok, lp) = Sampling::GREEDY.pick(&logits, 5);
        assert_eq!(tok, 1);
        assert!((f64::from(lp) - softmax(&logits, 1.0)[1].ln()).abs() < 1e-6);
        let top1 = Sampling {
            temperature: 0.7,
            top_k: 1,
            ..Sampling::GREEDY
        };
        assert_eq!(top1.pick(&logits, 9).0, 1);
    }

    #[test]
    fn draws_follow_the_filtered_distribution_and_repeat_with_the_seed() {
        let logits: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
        let s = Sampling {
            temperature: 0.8,
            top_k: 6,
            top_p: 0.9,
            seed: 42,
        };
        // the nucleus of the top 6 at T = 0.8
        let p = softmax(&logits, 0.8);
        let mut order: Vec<usize> = (0..12).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top: Vec<usize> = order[..6].to_vec();
        let mass: f64 = top.iter().map(|&i| p[i]).sum();
        let mut acc = 0.0;
        let mut nucleus = Vec::new();
        for &i in &top {
            acc += p[i] / mass;
            nucleus.push(i);
            if acc >= 0.9 {
                break;
            }
        }
        let nmass: f64 = nucleus.iter().map(|&i| p[i]).sum();
        let draws = 20_000;
        let mut counts = [0usize; 12];
        for step in 0..draws {
            let (tok, lp) = s.pick(&logits, step);
            counts[tok as usize] += 1;
            assert!((f64::from(lp) - softmax(&logits, 1.0)[tok as usize].ln()).abs() < 1e-5);
        }
        for i in 0..12 {
            let want = if nucleus.contains(&i) {
                p[i] / nmass
            } else {
                0.0
            };
            let got = counts[i] as f64 / draws as f64;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
        // the same seed and step give the same token; another seed, another stream
        let again: Vec<u32> = (0..50).map(|k| s.pick(&logits, k).0).collect();
        let first: Vec<u32> = (0..50).map(|k| s.pick(&logits, k).0).collect();
        assert_eq!(again, first);
        let other = Sampling { seed: 43, ..s };
        let third: Vec<u32> = (0..50).map(|k| other.pick(&logits, k).0).collect();
        assert_ne!(third, first);
    }

    #[test]
    fn bad_parameters_are_named() {
        let bad_t = Sampling {
            temperature: -1.0,
            ..Sampling::GREEDY
        };
        assert!(bad_t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        let bad_p = Sampling {
            top_p: 0.0,
            ..Sampling::GREEDY
        };
        assert!(bad_p.validate().unwrap_err().to_string().contains("top_p"));
    }
}
