//! # ferrogen
//!
//! Throughput-oriented LLM inference with limited memory: score a dataset or generate for
//! thousands of prompts with a model that does not fit in GPU memory, or even in RAM.
//!
//! Data flows one way: model file -> weights -> placement -> plan -> executor -> results.
//! What exists today:
//!
//! - [`model`]: OPT and Llama configurations (Hugging Face `config.json` or GGUF metadata, plus
//!   built-in shapes), memory-mapped weight sources (safetensors, sharded or not; GGUF with
//!   F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors), tokenizers, and each architecture's tensor list;
//! - [`cpu`]: the f32 reference forward pass (ragged prefill, KV-cache decode, log-softmax,
//!   greedy generation), checked against Hugging Face transformers: the oracle for everything;
//! - [`gpu`]: the WebGPU backend (wgpu): kernels and a whole-model forward with f32, native GGUF
//!   or FlexGen 4-bit weights and an f32 or 4-bit KV cache on the device;
//! - [`quant`]: GGUF block formats and FlexGen's 4-bit group format;
//! - [`policy`]: `Policy`, `HardwareProfile` and its calibration, FlexGen's cost model
//!   generalized, and the LP policy search;
//! - [`score`]: the JSONL dataset-scoring job behind the `score` example.
//!
//! ```
//! use ferrogen::cpu::ReferenceModel;
//! use ferrogen::model::ModelFiles;
//!
//! # fn main() -> ferrogen::Result<()> {
//! // A tiny random Llama checkpoint that ships with the tests.
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama-tied");
//! let files = ModelFiles::open(std::path::Path::new(dir))?;
//! let model = ReferenceModel::load(&files)?;
//!
//! // ln p(t_i | t_<i) for each of two sequences of different lengths, in one batch.
//! let logprobs = model.token_logprobs(&[&[1, 17, 42, 7], &[3, 9]])?;
//! assert_eq!(logprobs[0].len(), 3);
//! let ppl = (-logprobs[0].iter().sum::<f32>() / 3.0).exp();
//! assert!(ppl > 1.0);
//!
//! // Greedy continuation of a prompt.
//! let new_tokens = model.generate_greedy(&[&[1, 17, 42]], 4, None)?;
//! assert_eq!(new_tokens[0].len(), 4);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod batch;
pub mod bytes;
pub mod cli;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod exec;
pub mod gpu;
pub mod model;
pub mod policy;
pub mod quant;
pub mod schedule;
pub mod score;
pub mod storage;

pub use error::{Error, Result};
