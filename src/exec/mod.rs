//! The pipelined executor: runs a [`ZigzagPlan`](crate::schedule::ZigzagPlan) over weights
//! placed across GPU, CPU and disk, with I/O on worker threads overlapped with compute.
//!
//! - `placer`: weights placed by rows in the run-time layout over the tiers, the offload file;
//! - `weights`: the placed weights, streamed into weight slots;
//! - `executor`: blocks of sequences, the plan's steps, compute and the output unit;
//! - `cache`: the KV cache over the tiers, and attention on the CPU;
//! - `activations`: hidden rows between units over the tiers;
//! - `resident`: a model with every weight on one device ([`ResidentModel`]);
//! - `state`: what the executor holds for the engine's life and for one block;
//! - `io_workers`: the threads that run loads and stores beside compute, one per track;
//! - [`trace`]: the timeline.

mod activations;
mod cache;
pub(crate) mod executor;
mod io_workers;
pub(crate) mod placer;
mod resident;
pub(crate) mod state;
pub mod trace;
pub(crate) mod weights;

pub use executor::{SeqResult, Task};
pub use resident::{GpuModel, ResidentCache, ResidentModel};
pub use trace::{Span, Trace, Track};
