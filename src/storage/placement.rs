//! Byte-exact placement. Every weight tensor is split by rows across the tiers in the policy's
//! proportions (FlexGen places whole tensors, so its percentages are only approximate), with the
//! rounding error carried from tensor to tensor so that each tier's running total stays within
//! one row of its exact share. The KV cache and activations are split by sequence.

use std::ops::Range;

use super::Tier;
use crate::tier::TierSplit;

/// Rows of one tensor per tier, in order: the first `gpu` rows on the GPU, the next `cpu` in
/// RAM, the rest on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RowSplit {
    /// Rows on the GPU.
    pub gpu: usize,
    /// Rows in CPU RAM.
    pub cpu: usize,
    /// Rows on disk.
    pub disk: usize,
}

impl RowSplit {
    /// All rows.
    pub fn rows(&self) -> usize {
        self.gpu + self.cpu + self.disk
    }

    /// The row range each tier holds (empty ranges included).
    pub fn ranges(&self) -> [(Tier, Range<usize>); 3] {
        let (a, b) = (self.gpu, self.gpu + self.cpu);
        [
            (Tier::Gpu, 0..a),
            (Tier::Cpu, a..b),
            (Tier::Disk, b..self.rows()),
        ]
    }

    /// The part of this split (over items `0..rows()` in order) that falls in `range`: how
    /// many of those items each tier holds, e.g. the sequences of one batch of a block.
    pub fn within(&self, range: Range<usize>) -> RowSplit {
        let [gpu, cpu, disk] = self.ranges().map(|(_, t)| {
            t.end
                .min(range.end)
                .saturating_sub(t.start.max(range.start))
        });
        RowSplit { gpu, cpu, disk }
    }

    /// Rows on `tier`.
    pub fn on(&self, tier: Tier) -> usize {
        match tier {
            Tier::Gpu => self.gpu,
            Tier::Cpu => self.cpu,
            Tier::Disk => self.disk,
        }
    }
}

/// Splits tensors one after another so that, over all tensors placed so far, each tier holds
/// its share of the bytes to within one row.
#[derive(Debug, Clone)]
pub struct WeightPlacer {
    split: TierSplit,
    total: f64,
    placed: [f64; 3],
}

impl WeightPlacer {
    /// A placer for fractions `split` (which must sum to 1).
    pub fn new(split: TierSplit) -> Self {
        Self {
            split,
            total: 0.0,
            placed: [0.0; 3],
        }
    }

    /// The split of the next tensor: `rows` rows of `row_bytes` bytes each.
    ///
    /// With `B` the bytes placed so far including this tensor, GPU rows are
    /// `round((gpu * B - gpu bytes so far) / row_bytes)` and GPU + CPU rows
    /// `round(((gpu + cpu) * B - (gpu + cpu) bytes so far) / row_bytes)`, both clamped to the
    /// tensor: each tensor gets its proportional share, corrected by the error carried so far.
    pub fn place(&mut self, rows: usize, row_bytes: usize) -> RowSplit {
        let rb = row_bytes.max(1) as f64;
        self.total += (rows * row_bytes) as f64;
        let want = |frac: f64, have: f64| -> usize {
            let r = ((frac * self.total - have) / rb).round();
            r.clamp(0.0, rows as f64) as usize
        };
        let gpu = want(self.split.gpu, self.placed[0]);
        let gpu_cpu = want(
            self.split.gpu + self.split.cpu,
            self.placed[0] + self.placed[1],
        )
        .max(gpu);
        let out = RowSplit {
            gpu,
            cpu: gpu_cpu - gpu,
            disk: rows - gpu_cpu,
        };
        for tier in Tier::ALL {
            self.placed[tier.index()] += (out.on(tier) * row_bytes) as f64;
        }
        out
    }

    /// Bytes placed on each tier so far.
    pub fn placed(&self) -> [u64; 3] {
        self.placed.map(|b| b as u64)
    }
}

/// Sequences `0..n` of a block per tier: the first `round(gpu * n)` on the GPU, up to
/// `round((gpu + cpu) * n)` in RAM, the rest on disk ([`TierSplit::whole`]).
pub fn split_sequences(n: usize, split: TierSplit) -> RowSplit {
    let [gpu, cpu, disk] = split.whole(n);
    RowSplit { gpu, cpu, disk }
}

/// The tier of sequence `i` under a [`split_sequences`] split.
#[cfg(test)]
fn tier_of(split: &RowSplit, i: usize) -> Tier {
    if i < split.gpu {
        Tier::Gpu
    } else if i < split.gpu + split.cpu {
        Tier::Cpu
    } else {
        Tier::Disk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fractions() -> impl Strategy<Value = TierSplit> {
        (0u32..=100, 0u32..=100).prop_map(|(a, b)| {
            let gpu = f64::from(a.min(100)) / 100.0;
            let cpu = f64::from(b.min(100 - a.min(100))) / 100.0;
            TierSplit {
                gpu,
                cpu,
                disk: 1.0 - gpu - cpu,
            }
        })
    }

    #[test]
    fn splits_every_tensor_not_whole_tensors() {
        // FlexGen's issue #108: 4 equal tensors at 30/20/50 put whole tensors on tiers
        let mut p = WeightPlacer::new(TierSplit {
            gpu: 0.3,
            cpu: 0.2,
            disk: 0.5,
        });
        for _ in 0..4 {
            let s = p.place(100, 8);
            assert_eq!((s.gpu, s.cpu, s.disk), (30, 20, 50));
        }
        assert_eq!(p.placed(), [960, 640, 1600]);
    }

    proptest! {
        #[test]
        fn tier_totals_are_within_one_row_of_the_policy(
            split in fractions(),
            tensors in prop::collection::vec((1usize..300, 1usize..5000), 1..40),
        ) {
            let mut p = WeightPlacer::new(split);
            let mut total = 0u64;
            let mut max_row = 0u64;
            for &(rows, row_bytes) in &tensors {
                let s = p.place(rows, row_bytes);
                prop_assert_eq!(s.rows(), rows);
                total += (rows * row_bytes) as u64;
                max_row = max_row.max(row_bytes as u64);
                let placed = p.placed();
                prop_assert_eq!(placed.iter().sum::<u64>(), total);
                for (tier, frac) in [(0, split.gpu), (1, split.cpu), (2, split.disk)] {
                    let err = (placed[tier] as f64 - frac * total as f64).abs();
                    prop_assert!(err <= 1.5 * max_row as f64 + 1e-6,
                        "tier {} holds {} of {} (share {})", tier, placed[tier], total, frac);
                }
                // a tier with no share gets nothing; a tier with everything gets everything
                if split.gpu == 0.0 { prop_assert_eq!(s.gpu, 0); }
                if split.disk <= 1e-12 { prop_assert_eq!(s.disk, 0); }
            }
        }

        #[test]
        fn sequences_split_in_proportion(split in fractions(), n in 0usize..200) {
            let s = split_sequences(n, split);
            prop_assert_eq!(s.rows(), n);
            prop_assert!((s.gpu as f64 - split.gpu * n as f64).abs() <= 0.5 + 1e-9);
            prop_assert!(((s.gpu + s.cpu) as f64 - (split.gpu + split.cpu) * n as f64).abs() <= 0.5 + 1e-9);
            let (a, b) = (n / 3, n - n / 4);
            let part = s.within(a..b);
            prop_assert_eq!(part.rows(), b.saturating_sub(a));
            for (tier, r) in part.ranges() {
                prop_assert!((a..b).filter(|&i| tier_of(&s, i) == tier).count() == r.len());
            }
            for i in 0..n {
                let t = tier_of(&s, i);
                let r = &s.ranges()[t.index()].1;
                prop_assert!(r.contains(&i));
            }
        }
    }
}
