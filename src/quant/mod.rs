//! Quantized formats.
//!
//! - [`ggml`]: the GGUF block formats that model files arrive in (Q4_0, Q4_1, Q5_0, Q5_1,
//!   Q8_0, IQ4_NL, and through [`kquant`] the K-quants Q2_K..Q6_K and IQ4_XS), decoded
//!   exactly to f32.
//!
//! - [`group4`]: FlexGen's 4-bit asymmetric group format, for compressing weights and the KV
//!   cache at run time.

pub mod ggml;
pub mod group4;
pub mod kquant;
