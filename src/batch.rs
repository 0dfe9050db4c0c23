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

/// Sequences that begin with the same tokens, run as one: their first `L` tokens are common,
/// so the first `L - 1` (the *shared* rows) are computed once, and each member goes on in its
/// own *branch* from its token `L - 1` on. A branch row sees the shared rows and the rows of its
/// own branch before it, at the positions the member's own tokens have, so every member's
/// logprobs are those it would have alone. (The branches repeat token `L - 1` because its row
/// predicts each member's next token.) A group of one member is a plain sequence: no shared
/// rows, one branch.
///
/// Rows are laid out `[shared | branch 0 | branch 1 | ...]`, in the cache as in the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixGroup {
    /// The rows' tokens.
    pub tokens: Vec<u32>,
    /// Rows computed once for all members.
    pub shared: usize,
    /// Each member's branch length, in member order.
    pub branches: Vec<usize>,
}

impl PrefixGroup {
    /// One plain sequence.
    pub fn single(seq: &[u32]) -> Self {
        Self {
            tokens: seq.to_vec(),
            shared: 0,
            branches: vec![seq.len()],
        }
    }

    /// `members` sharing their first `common` tokens (`1 <= common <=` every length).
    pub fn new(members: &[&[u32]], common: usize) -> Self {
        let shared = common.saturating_sub(1);
        let mut tokens = members.first().map_or(&[][..], |m| &m[..shared]).to_vec();
        let branches = members
            .iter()
            .map(|m| {
                tokens.extend_from_slice(&m[shared..]);
                m.len() - shared
            })
            .collect();
        Self {
            tokens,
            shared,
            branches,
        }
    }

    /// Rows the group computes.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Members' tokens the group does not compute again: `sum(member lengths) - rows`.
    pub fn saved_rows(&self) -> usize {
        // member i has shared + branch_i tokens
        (self.shared * self.branches.len() + self.branches.iter().sum::<usize>())
            .saturating_sub(self.len())
    }

    /// Each member as a plain sequence.
    pub fn members(&self) -> Vec<PrefixGroup> {
        self.branch_rows()
            .map(|b| {
                let tokens = [&self.tokens[..self.shared], &self.tokens[b]].concat();
                PrefixGroup::single(&tokens)
            })
            .collect()
    }

    /// Appends a generated token to a plain sequence (its one branch).
    pub(crate) fn push(&mut self, token: u32) {
        self.tokens.push(token);
        if let Some(last) = self.branches.last_mut() {
            *last += 1;
        }
    }

    /// Each branch's rows.
    fn branch_rows(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.branches.iter().scan(self.shared, |at, &n| {
            *at += n;
            Some(*at - n..*at)
        })
    }

    /// Per row: its position, and the rows before it that it does not see (the earlier
    /// branches; empty for shared rows and plain sequences).
    pub fn row_places(&self) -> Vec<(usize, std::ops::Range<usize>)> {
        let mut out: Vec<_> = (0..self.shared).map(|i| (i, 0..0)).collect();
        for rows in self.branch_rows() {
            // a branch row's position is shared + its index in the branch
            let skip = self.shared..rows.start;
            out.extend((0..rows.len()).map(|t| (self.shared + t, skip.clone())));
        }
        out
    }

    /// The rows that predict a member's token (all but each branch's last) and those tokens
    /// (row `r` predicts the token of row `r + 1`: the last shared row predicts every
    /// branch's first token, which is the same).
    pub fn scoring_rows(&self) -> (Vec<usize>, Vec<u32>) {
        let rows: Vec<usize> = (0..self.shared)
            .chain(self.branch_rows().flat_map(|b| b.start..b.end - 1))
            .collect();
        let targets = rows.iter().map(|&r| self.tokens[r + 1]).collect();
        (rows, targets)
    }

    /// How many rows [`PrefixGroup::scoring_rows`] gives: all but each branch's last.
    pub fn scoring_row_count(&self) -> usize {
        self.len() - self.branches.len()
    }

    /// Values of [`PrefixGroup::scoring_rows`] (in their order) as each member's: the shared
    /// rows' then its branch's, `member length - 1` of them.
    pub fn per_member<T: Clone>(&self, values: &[T]) -> Vec<Vec<T>> {
        let (shared, mut at) = (&values[..self.shared], self.shared);
        self.branches
            .iter()
            .map(|&n| {
                let own = n.saturating_sub(1);
                at += own;
                [shared, &values[at - own..at]].concat()
            })
            .collect()
    }
}

/// Groups scoring sequences that begin with the same tokens ([`PrefixGroup`]), as members of
/// at most `max_rows` rows a group (a plain sequence longer than that stays alone). Sequences
/// are compared in token order, so those with a common beginning are neighbours, and a
/// sequence joins the group before it when that cuts the rows computed (the group's rows with
/// it are fewer than without it plus its own: a question's endings join, another question
/// sharing a word of the instructions does not). Returns each group's members (indices into
/// `seqs`, ascending) with the group, groups in the order of their first member.
pub fn group_prefixes(seqs: &[&[u32]], max_rows: usize) -> Vec<(Vec<usize>, PrefixGroup)> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by(|&a, &b| seqs[a].cmp(seqs[b]).then(a.cmp(&b)));
    let common = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    // rows of a group of members with `len_sum` tokens in all sharing `l` tokens:
    // (l - 1) + sum(len_i - (l - 1))
    let rows = |count: usize, len_sum: usize, l: usize| {
        let shared = l.saturating_sub(1);
        len_sum + shared - shared * count
    };
    // (members, their common length, their tokens in all)
    let mut groups: Vec<(Vec<usize>, usize, usize)> = Vec::new();
    for &i in &order {
        let s = seqs[i];
        if let Some((members, l, len_sum)) = groups.last_mut() {
            // sorted: the common part of the group and s is the group's first's with s
            let l_new = (*l).min(common(seqs[members[0]], s));
            let with = rows(members.len() + 1, *len_sum + s.len(), l_new);
            if l_new >= 2 && with < rows(members.len(), *len_sum, *l) + s.len() && with <= max_rows
            {
                members.push(i);
                (*l, *len_sum) = (l_new, *len_sum + s.len());
                continue;
            }
        }
        groups.push((vec![i], s.len(), s.len()));
    }
    let mut out: Vec<(Vec<usize>, PrefixGroup)> = groups
        .into_iter()
        .map(|(mut members, l, _)| {
            // branches in input order
            members.sort_unstable();
            let group = match members[..] {
                [one] => PrefixGroup::single(seqs[one]),
                _ => PrefixGroup::new(&members.iter().map(|&i| seqs[i]).collect::<Vec<_>>(), l),
            };
            (members, group)
        })
        .collect();
    out.sort_by_key(|(members, _)| members[0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Range;

    #[test]
    fn a_prefix_group_lays_out_shared_rows_then_branches() {
        // members share [1, 2, 3]: rows [1, 2] once, then [3, ...] per member
        let (a, b, c): (&[u32], &[u32], &[u32]) = (&[1, 2, 3, 4, 5], &[1, 2, 3, 6], &[1, 2, 3]);
        let g = PrefixGroup::new(&[a, b, c], 3);
        assert_eq!(g.tokens, vec![1, 2, 3, 4, 5, 3, 6, 3]);
        assert_eq!((g.shared, g.branches.clone()), (2, vec![3, 2, 1]));
        assert_eq!(g.saved_rows(), 5 + 4 + 3 - 8);
        let places: Vec<(usize, Range<usize>)> = vec![
            (0, 0..0),
            (1, 0..0),
            (2, 2..2),
            (3, 2..2),
            (4, 2..2),
            (2, 2..5),
            (3, 2..5),
            (2, 2..7),
        ];
        assert_eq!(g.row_places(), places);
        let (rows, targets) = g.scoring_rows();
        assert_eq!(rows, vec![0, 1, 2, 3, 5]);
        assert_eq!(g.scoring_row_count(), rows.len());
        assert_eq!(targets, vec![2, 3, 4, 5, 6]);
        // per member: the shared rows' values, then its branch's
        let per = g.per_member(&targets);
        assert_eq!(per, vec![vec![2, 3, 4, 5], vec![2, 3, 6], vec![2, 3]]);
        for (m, seq) in per.iter().zip([a, b, c]) {
            assert_eq!(m[..], seq[1..]);
        }
        let members: Vec<Vec<u32>> = g.members().into_iter().map(|m| m.tokens).collect();
        assert_eq!(members, vec![a.to_vec(), b.to_vec(), c.to_vec()]);
        let one = PrefixGroup::single(a);
        assert_eq!(one.scoring_rows(), (vec![0, 1, 2, 3], vec![2, 3, 4, 5]));
        assert_eq!(one.row_places()[4], (4, 0..0));
        assert_eq!(one.saved_rows(), 0);
    }

    #[test]
    fn endings_of_a_question_group_and_strangers_do_not() {
        let q1: Vec<u32> = (100..130).collect();
        let q2: Vec<u32> = (100..103).chain(200..230).collect(); // shares 3 tokens with q1
        let with = |q: &[u32], end: &[u32]| [q, end].concat();
        let seqs = [
            with(&q1, &[1, 2]),
            with(&q2, &[5]),
            with(&q1, &[3]),
            vec![9, 9],
            with(&q1, &[1, 4, 4]),
            with(&q2, &[6, 6]),
        ];
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let groups = group_prefixes(&refs, 1000);
        let members: Vec<Vec<usize>> = groups.iter().map(|g| g.0.clone()).collect();
        assert_eq!(members, vec![vec![0, 2, 4], vec![1, 5], vec![3]]);
        // q1's endings share q1 and the 1 of two of them: the common part is q1 alone
        assert_eq!(groups[0].1.shared, q1.len() - 1);
        assert_eq!(groups[0].1.branches, vec![3, 2, 4]);
        // a cap on a group's rows keeps members out
        let capped = group_prefixes(&refs, 35);
        assert!(capped.iter().all(|(m, g)| g.len() <= 35 || m.len() == 1));
        assert!(capped.len() > groups.len());
    }

    proptest::proptest! {
        /// Groups partition the sequences, each member's tokens are its sequence's, scoring
        /// rows give each member its own targets, and groups never add rows.
        #[test]
        fn groups_partition_and_rebuild_the_sequences(
            seqs in proptest::collection::vec(
                (0usize..4, proptest::collection::vec(0u32..3, 0..6)),
                1..30,
            ),
            max_rows in 2usize..40,
        ) {
            // a few shared beginnings, then random tails
            let stems: [&[u32]; 4] = [&[7, 8, 9, 10, 11], &[7, 8, 9], &[5], &[]];
            let seqs: Vec<Vec<u32>> = seqs
                .into_iter()
                .map(|(s, tail)| [stems[s], &tail[..]].concat())
                .filter(|s| s.len() >= 2)
                .collect();
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let groups = group_prefixes(&refs, max_rows);
            let mut seen = vec![0; seqs.len()];
            for (members, g) in &groups {
                proptest::prop_assert!(members.windows(2).all(|w| w[0] < w[1]));
                proptest::prop_assert!(members.len() == 1 || g.len() <= max_rows);
                let total: usize = members.iter().map(|&i| seqs[i].len()).sum();
                proptest::prop_assert_eq!(g.len() + g.saved_rows(), total);
                let (rows, targets) = g.scoring_rows();
                proptest::prop_assert_eq!(g.scoring_row_count(), rows.len());
                for ((&i, m), t) in members.iter().zip(g.members()).zip(g.per_member(&targets)) {
                    seen[i] += 1;
                    proptest::prop_assert_eq!(&m.tokens, &seqs[i]);
                    proptest::prop_assert_eq!(&t[..], &seqs[i][1..]);
                }
            }
            proptest::prop_assert!(seen.iter().all(|&n| n == 1));
            let firsts: Vec<usize> = groups.iter().map(|g| g.0[0]).collect();
            proptest::prop_assert!(firsts.windows(2).all(|w| w[0] < w[1]));
        }
    }

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
