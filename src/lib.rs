//! ferrogen: throughput-oriented LLM inference with limited memory.
pub mod cpu;
pub mod error;
pub mod model;
pub mod quant;

pub use error::{Error, Result};
