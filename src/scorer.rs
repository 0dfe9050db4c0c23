//! [`Scorer`]: the seam between the scoring job and whatever computes log-probabilities (the
//! engine, a resident model, the reference).

use crate::arch::ModelConfig;
use crate::batch::TokenScores;
use crate::error::Result;

/// Something that computes per-token log-probabilities for a batch of token sequences.
pub trait Scorer {
    /// The model's configuration (vocabulary and context limits).
    fn config(&self) -> &ModelConfig;
    /// For each sequence of `n >= 2` tokens, the `n - 1` values `ln p(t_i | t_<i)` and whether
    /// each `t_i` is the greedy choice.
    fn token_scores(&self, batch: &[&[u32]]) -> Result<Vec<TokenScores>>;
    /// Tokens a call should hold to use the scorer well (an engine's blocks are sized by its
    /// budgets); `None`: no preference.
    fn batch_tokens(&self) -> Option<usize> {
        None
    }
}
