//! Row bookkeeping of ragged batches, shared by the backends: a batch of sequences runs as their
//! tokens stacked into one matrix, sequence after sequence.

use crate::error::{Error, Result};

/// One scored sequence of `n` tokens: for each token `t_i` after the first, `ln p(t_i | t_<i)`
/// and whether `t_i` is the model's greedy choice there (the first largest logit, as an argmax
/// breaks ties).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenScores {
    /// `n - 1` values `ln p(t_i | t_<i)`.
    pub logprobs: Vec<f32>,
    /// `n - 1` flags: `t_i` is the argmax of the logits that predict it.
    pub greedy: Vec<bool>,
}

impl TokenScores {
    /// Scores from per-row logprobs and argmax tokens, against `seq`'s tokens after the first.
    pub(crate) fn new(logprobs: Vec<f32>, argmax: &[u32], seq: &[u32]) -> Self {
        let greedy = argmax.iter().zip(&seq[1..]).map(|(a, t)| a == t).collect();
        Self { logprobs, greedy }
    }

    /// The logprobs of each of `scores`, for the calls that return only those.
    pub(crate) fn logprobs_of(scores: Vec<TokenScores>) -> Vec<Vec<f32>> {
        scores.into_iter().map(|s| s.logprobs).collect()
    }
}

/// Every sequence must have 2 tokens at least to be scored (one context, one target).
pub fn check_scorable(batch: &[&[u32]]) -> Result<()> {
    match batch.iter().find(|s| s.len() < 2) {
        Some(short) => Err(Error::SequenceTooShort {
            len: short.len(),
            needed: 2,
            what: "score a sequence",
        }),
        None => Ok(()),
    }
}

/// The row of each sequence's last token in the stacked batch.
pub fn last_rows(batch: &[&[u32]]) -> Vec<usize> {
    batch
        .iter()
        .scan(0, |end, seq| {
            *end += seq.len();
            Some(*end - 1)
        })
        .collect()
}

/// For scoring: the rows that predict a next token (all but each sequence's last) and the
/// tokens they predict (`row j` of a sequence predicts its token `j + 1`).
pub fn scoring_rows(batch: &[&[u32]]) -> (Vec<usize>, Vec<u32>) {
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    let mut start = 0;
    for seq in batch {
        rows.extend(start..start + seq.len().saturating_sub(1));
        targets.extend(seq.iter().skip(1));
        start += seq.len();
    }
    (rows, targets)
}

/// Splits values laid out as [`scoring_rows`] lists them back into one vector per sequence.
pub fn split_per_sequence<T: Clone>(flat: &[T], batch: &[&[u32]]) -> Vec<Vec<T>> {
    let mut at = 0;
    batch
        .iter()
        .map(|seq| {
            let n = seq.len().saturating_sub(1);
            at += n;
            flat[at - n..at].to_vec()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_a_ragged_batch() {
        let batch: [&[u32]; 3] = [&[1, 2, 3], &[4], &[5, 6]];
        assert_eq!(last_rows(&batch), vec![2, 3, 5]);
        let (rows, targets) = scoring_rows(&batch);
        assert_eq!((rows, targets.clone()), (vec![0, 1, 4], vec![2, 3, 6]));
        assert_eq!(
            split_per_sequence(&targets, &batch),
            vec![vec![2, 3], vec![], vec![6]]
        );
    }
}
