//! Where bytes live on the three tiers: byte-exact [`placement`] of weights (by rows) and of
//! the KV cache and activations (by sequence), the disk tier's [`offload`] files read with
//! aligned direct I/O, the [`ledger`] that keeps every tier inside its budget, and the
//! allocator setting ([`heap`]) that lets the process's memory follow the ledger.

pub mod direct;
pub mod heap;
pub mod ledger;
pub mod offload;
pub mod placement;

pub use ledger::{MemoryLedger, Reservation};
pub use offload::OffloadFile;
pub use placement::{split_sequences, RowSplit, WeightPlacer};

pub(crate) use crate::tier::Tier;
