//! The crate's single error type.
//!
//! Every variant names what went wrong and, where there is one, the file or input that caused it,
//! so a message can be shown to a user as it is.

use crate::tier::Tier;
use std::path::PathBuf;

/// Result with ferrogen's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in ferrogen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error on a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A model or weight file whose structure is broken (truncated, lying header, bad magic...).
    #[error("{}: malformed file: {reason}", path.display())]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A model configuration that is missing fields or holds impossible values.
    #[error("{}: bad model configuration: {reason}", path.display())]
    Config {
        /// The configuration file (config.json or the GGUF file).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A tensor the architecture needs is absent from the weight files.
    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor {
        /// The weight file (or directory) searched.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },

    /// A tensor whose shape differs from what the configuration implies.
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?}", path.display())]
    TensorShape {
        /// The weight file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape implied by the model configuration.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },

    /// A tensor stored in an element type ferrogen cannot read.
    #[error(
        "{}: {dtype} is not supported (tensor {name}); ferrogen reads F32, F16, BF16 and, in \
         GGUF, Q8_0, Q4_0 and Q4_1",
        path.display()
    )]
    UnsupportedDType {
        /// The weight file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The element type as the file names it.
        dtype: String,
    },

    /// A model feature ferrogen does not implement (yet).
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is not supported, and where it was met.
        what: String,
    },

    /// The tokenizer could not be built or could not encode or decode.
    #[error("tokenizer: {reason}")]
    Tokenizer {
        /// What went wrong.
        reason: String,
    },

    /// A token id outside the model's vocabulary.
    #[error(
        "token id {token} at position {position} is outside the vocabulary (size {vocab_size})"
    )]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// Its position in the sequence.
        position: usize,
        /// The model's vocabulary size.
        vocab_size: usize,
    },

    /// A sequence longer than the model's context window.
    #[error("sequence of {len} tokens is longer than the model's context of {max} tokens")]
    SequenceTooLong {
        /// The sequence length (including any cached prefix).
        len: usize,
        /// The model's maximum context.
        max: usize,
    },

    /// A sequence with too few tokens for the requested operation.
    #[error("sequence has {len} tokens; {needed} at least are needed to {what}")]
    SequenceTooShort {
        /// The sequence length.
        len: usize,
        /// The minimum length.
        needed: usize,
        /// The operation that needs them.
        what: &'static str,
    },

    /// A bad argument: a command-line flag or a parameter of a public function.
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// The flag or parameter name (e.g. `--gpu-mem`).
        name: String,
        /// Why it is invalid and what to do instead.
        reason: String,
    },

    /// Something does not fit the memory budgets (a policy search, or an allocation).
    #[error("does not fit in memory: {detail}")]
    Infeasible {
        /// The tier that is short (on the CPU device, whose memory is RAM, [`Tier::Cpu`]).
        tier: Tier,
        /// By how many bytes it is short (for the smallest batch).
        short_bytes: u64,
        /// A sentence for the user.
        detail: String,
    },

    /// The WebGPU device refused or lost something: out of memory, a shader that did not
    /// compile, a rejected submission, or the device itself lost.
    #[error("WebGPU device error in {what}: {message}")]
    Device {
        /// What was being done (an allocation, a kernel's compilation, a submission).
        what: String,
        /// The device's message.
        message: String,
    },

    /// No usable WebGPU adapter or device.
    #[error("no WebGPU device: {reason}")]
    NoAdapter {
        /// Why, and what to do.
        reason: String,
    },

    /// A job stopped by a signal (SIGINT, SIGTERM or SIGHUP) between batches; its answers so
    /// far are written.
    #[error("stopped by signal {signal}: the answers so far are kept (continue with --resume)")]
    Interrupted {
        /// The signal's number.
        signal: i32,
    },

    /// A feature that exists in the interface but is not built yet.
    #[error("{what} is not built yet")]
    NotBuilt {
        /// The feature.
        what: String,
    },
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A [`Error::Config`] for `path`.
    pub fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::InvalidArgument`].
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
