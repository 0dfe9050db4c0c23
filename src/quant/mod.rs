//! Quantized formats.
//!
//! - [`ggml`]: the GGUF block formats (Q4_0, Q4_1, Q8_0) that model files arrive in, decoded
//!   exactly to f32 for the CPU reference.
//!
//! FlexGen's 4-bit group format (runtime compression of weights and KV cache) joins this module
//! with the WebGPU backend.

pub mod ggml;
