//! # ferrogen
//!
//! Throughput-oriented LLM inference with limited memory: score a dataset or generate for
//! thousands of prompts with a model that does not fit in GPU memory, or even in RAM.
//!
//! Data flows one way: model file -> weights -> plan -> placement -> executor -> results
//! (ARCHITECTURE.md in the repository maps the floors). The public modules:
//!
//! - [`engine`]: the entry point: open a model with a policy or budgets ([`Placement`]), score
//!   or generate;
//! - [`score`] and [`generation`]: the JSONL scoring and generation jobs, over [`job`] (shards,
//!   resume, merge, ids as written, a job's files kept safe, signals);
//! - [`arch`]: one file per architecture (Llama, OPT): its configuration (Hugging Face
//!   `config.json`, GGUF metadata), tensor list, how its tensors form the schedule's units,
//!   heads, cost-model sizes and forward pass over the device seam; [`ModelFiles`] opens a
//!   model path; built-in shapes and seeded random weights;
//! - [`model`]: model files as formats: memory-mapped weight sources (safetensors, sharded or
//!   not; GGUF with F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors) and tokenizers;
//! - [`reference`](mod@reference): the f32 reference forward pass (ragged prefill, KV-cache decode, log-softmax,
//!   greedy generation), checked against Hugging Face transformers: the oracle for everything;
//! - [`policy`]: [`Policy`], [`HardwareProfile`], FlexGen's cost model generalized, and the LP
//!   policy search; [`calibrate`] measures a machine into a profile;
//! - [`device`] and [`gpu`]: the compute devices (the native CPU device, WebGPU) behind one
//!   seam; [`exec`]: the executor, and [`ResidentModel`](exec::ResidentModel) for a model held
//!   whole on one device;
//! - [`schedule`]: FlexGen's zig-zag block schedule as a printable, testable plan;
//! - `quant` (inside): GGUF block formats and FlexGen's 4-bit group format, decoded in the kernels;
//! - [`sampling`]: greedy and sampled token choice, stop reasons;
//! - `cli` (feature `cli`, on by default): the `ferrogen` command line;
//! - [`parse_size`] and [`format_size`]: byte sizes as the command lines take and print them.
//!
//! The options structs and [`Error`] are `#[non_exhaustive]`: build options with their
//! constructors and setters (`EngineOptions::new(placement).gpu_budget(..)`), and match errors
//! with a wildcard arm.
//!
//! ```
//! use ferrogen::reference::ReferenceModel;
//! use ferrogen::arch::ModelFiles;
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
//!
//! The same model placed across the tiers by the [`engine`]: 70% of the weights streamed from
//! RAM and disk, the KV cache split between GPU and RAM, two GPU batches per block:
//!
//! ```
//! use ferrogen::engine::{Engine, EngineOptions, Placement};
//! use ferrogen::gpu::GpuContext;
//! use ferrogen::arch::ModelFiles;
//! use ferrogen::policy::Policy;
//!
//! # fn main() -> ferrogen::Result<()> {
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama-tied");
//! let Ok(ctx) = GpuContext::new() else { return Ok(()) }; // needs a WebGPU adapter
//! let policy = Policy {
//!     num_gpu_batches: 2,
//!     w_gpu_percent: 30.0,
//!     w_cpu_percent: 30.0,
//!     cache_gpu_percent: 50.0,
//!     cache_cpu_percent: 50.0,
//!     ..Policy::all_on_gpu(1)
//! };
//! let offload = tempfile::tempdir().map_err(|e| ferrogen::Error::io("temp dir", e))?;
//! let options = EngineOptions::new(Placement::Policy(policy))
//!     .offload_dir(offload.path().to_path_buf())
//!     .gpu_budget(64 << 20)
//!     .cpu_budget(64 << 20);
//! let engine = Engine::open_files(ctx, ModelFiles::open(dir.as_ref())?, options)?;
//! let logprobs = engine.token_logprobs(&[&[1, 17, 42, 7], &[3, 9]])?;
//! assert_eq!(logprobs[1].len(), 1);
//! let generated = engine.generate(&[&[1, 17, 42]], 4, &[])?;
//! assert_eq!(generated[0].tokens.len(), 4);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod arch;
mod batch;
mod bytes;
pub mod calibrate;
#[cfg(feature = "cli")]
pub mod cli;
pub mod device;
pub mod engine;
pub mod error;
pub mod exec;
pub mod generation;
pub mod gpu;
pub mod job;
pub(crate) mod layout;
pub mod model;
mod plan;
pub mod policy;
pub(crate) mod quant;
pub mod reference;
pub mod sampling;
pub mod schedule;
pub mod score;
mod scorer;
pub(crate) mod storage;
mod tier;

pub use arch::ModelFiles;
pub use batch::{PrefixGroup, TokenScores};
pub use bytes::{format_size, parse_size};
pub use device::DeviceKind;
pub use engine::{BlockStats, Engine, EngineOptions, Placement};
pub use error::{Error, Result};
pub use exec::SeqResult;
pub use layout::{RunOptions, WeightFormat};
pub use policy::{HardwareProfile, Policy};
pub use tier::{Tier, TierSplit};

/// The crate's internals that its own tests and benchmarks reach (block formats, the CPU
/// device's kernels): not part of the API, and may change in any release.
#[doc(hidden)]
pub mod internals {
    pub use crate::device::cpu::matmul::{linear_into, WeightRows};
    pub use crate::layout::RowFormat;
    pub use crate::model::weights::decode_to_f32;
    pub use crate::quant::{ggml, group4};
    pub use crate::reference::ops::log_softmax_at;
}
