//! Quantized formats.
//!
//! - [`ggml`]: the GGUF block formats (Q4_0, Q4_1, Q8_0) that model files arrive in, decoded
//!   exactly to f32 for the CPU reference.
//!
//! - [`group4`]: FlexGen's 4-bit asymmetric group format, for compressing weights and the KV
//!   cache at run time.

pub mod ggml;
pub mod group4;
