//! Placement policies and how to choose them: [`Policy`], [`HardwareProfile`], the cost model
//! ([`cost`]) and the LP search ([`search`](mod@search)).

pub mod cost;
mod forms;
pub mod hardware;
#[allow(clippy::module_inception)]
pub mod policy;
pub mod search;
mod shape;

pub use cost::{CostModel, HeadBytes, Prediction, Workload};
pub use hardware::{ByteSize, CpuLinear, DiskRead, HardwareProfile};
pub use policy::{Policy, QuantConfig};
pub use search::{search, SearchOptions, SearchResult};
