//! The pipelined executor: runs a [`ZigzagPlan`](crate::schedule::ZigzagPlan) over weights
//! placed across GPU, CPU and disk, with I/O on worker threads overlapped with compute.

pub mod executor;
pub mod trace;
pub mod weights;

pub use executor::{SeqResult, Task};
pub use trace::{Span, Trace, Track};
