//! The three memory tiers ([`Tier`]) and how one kind of data is split over them
//! ([`TierSplit`]): the vocabulary every floor above shares, so it depends on nothing.

use std::fmt;

/// A memory tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// GPU memory (host memory on lavapipe).
    Gpu,
    /// CPU RAM.
    Cpu,
    /// Files in the offload directory.
    Disk,
}

impl Tier {
    /// All tiers, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Gpu, Tier::Cpu, Tier::Disk];

    /// Index into per-tier arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Gpu => "GPU",
            Tier::Cpu => "CPU",
            Tier::Disk => "disk",
        })
    }
}

/// GPU / CPU / disk fractions (0-1) of one kind of data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierSplit {
    /// On the GPU.
    pub gpu: f64,
    /// In CPU RAM.
    pub cpu: f64,
    /// On disk.
    pub disk: f64,
}

impl TierSplit {
    pub(crate) fn from_percent(gpu: f64, cpu: f64) -> Self {
        let (gpu, cpu) = (gpu / 100.0, cpu / 100.0);
        Self {
            gpu,
            cpu,
            disk: (1.0 - gpu - cpu).max(0.0),
        }
    }

    /// Whole items of `n` per tier (GPU, CPU, disk), as the executor places a block's
    /// sequences: the first `round(gpu * n)` on the GPU, up to `round((gpu + cpu) * n)` in
    /// RAM, the rest on disk.
    pub fn whole(&self, n: usize) -> [usize; 3] {
        let gpu = ((self.gpu * n as f64).round() as usize).min(n);
        let gpu_cpu = (((self.gpu + self.cpu) * n as f64).round() as usize).clamp(gpu, n);
        [gpu, gpu_cpu - gpu, n - gpu_cpu]
    }

    /// The fractions of [`TierSplit::whole`] items of `n` (`self` when `n` is 0).
    pub fn rounded_to(&self, n: usize) -> Self {
        if n == 0 {
            return *self;
        }
        let [gpu, cpu, disk] = self.whole(n).map(|k| k as f64 / n as f64);
        Self { gpu, cpu, disk }
    }
}
