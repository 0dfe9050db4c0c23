//! Where bytes live: the three [`Tier`]s, byte-exact [`placement`] of weights (by rows) and of
//! the KV cache and activations (by sequence), the disk tier's [`offload`] files read with
//! aligned direct I/O, the [`ledger`] that keeps every tier inside its budget, and the
//! allocator setting ([`heap`]) that lets the process's memory follow the ledger.

pub mod direct;
pub mod heap;
pub mod ledger;
pub mod offload;
pub mod placement;

pub use ledger::{MemoryLedger, Reservation};
pub use offload::{AlignedBuf, OffloadFile};
pub use placement::{split_sequences, RowSplit, WeightPlacer};

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
