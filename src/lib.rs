//! ferrogen: throughput-oriented LLM inference with limited memory.
pub mod bytes;
pub mod cpu;
pub mod error;
pub mod model;
pub mod quant;
pub mod score;

pub use error::{Error, Result};
