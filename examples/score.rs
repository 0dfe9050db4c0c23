//! Scores a JSONL dataset: per-record log-likelihood and perplexity (see DESIGN.md, "score").
//!
//! ```text
//! cargo run --release --example score -- --model PATH --input IN.jsonl --output OUT.jsonl
//!     [--per-token] [--backend reference|wgpu] [--compress-weight] [--compress-cache]
//!     [--batch-tokens N]
//!     (default backend: reference, until the wgpu kernels are tuned; on wgpu, GGUF Q4_0/Q4_1/Q8_0
//!     weights run natively; --compress-weight / --compress-cache use FlexGen's 4-bit groups)
//!     [--gpu-mem SIZE --cpu-mem SIZE --offload-dir DIR | --policy FILE.toml]
//! ```
//! `-` reads stdin / writes stdout. Exit status: 0 all records scored, 3 some failed, 2 usage or
//! model error before any record was read, 1 an I/O error during the job.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use ferrogen::bytes::parse_size;
use ferrogen::cli::{required, Flags};
use ferrogen::cpu::ReferenceModel;
use ferrogen::gpu::model::{GpuModel, GpuOptions, WeightFormat};
use ferrogen::gpu::GpuContext;
use ferrogen::model::ModelFiles;
use ferrogen::score::{score_jsonl, ScoreOptions, Scorer};
use ferrogen::{Error, Result};

struct Args {
    model: PathBuf,
    input: String,
    output: String,
    backend: Option<String>,
    options: ScoreOptions,
    memory_flags: Vec<String>,
    /// FlexGen 4-bit weights on the wgpu backend.
    compress_weight: bool,
    /// FlexGen 4-bit KV cache on the wgpu backend.
    compress_cache: bool,
}

fn parse_args() -> Result<Args> {
    let (mut model, mut input, mut output, mut backend) = (None, None, None, None);
    let mut options = ScoreOptions::default();
    let mut memory_flags = Vec::new();
    let (mut compress_weight, mut compress_cache) = (false, false);
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(flags.value(&flag)?)),
            "--input" => input = Some(flags.value(&flag)?),
            "--output" => output = Some(flags.value(&flag)?),
            "--per-token" => options.per_token = true,
            "--compress-weight" => compress_weight = true,
            "--compress-cache" => compress_cache = true,
            "--backend" => backend = Some(flags.value(&flag)?),
            "--batch-tokens" => options.batch_tokens = flags.positive(&flag)?,
            "--gpu-mem" | "--cpu-mem" => {
                parse_size(&flags.value(&flag)?, &flag)?;
                memory_flags.push(flag);
            }
            "--offload-dir" | "--policy" => {
                flags.value(&flag)?;
                memory_flags.push(flag);
            }
            "-h" | "--help" => {
                return Err(Error::invalid(
                    "--help",
                    "usage: score --model PATH --input IN.jsonl --output OUT.jsonl [--per-token] \
                     [--backend reference|wgpu] [--batch-tokens N]",
                ))
            }
            other => return Err(Error::invalid(other, "unknown flag (try --help)")),
        }
    }
    Ok(Args {
        model: required(model, "--model")?,
        input: required(input, "--input")?,
        output: required(output, "--output")?,
        backend,
        options,
        memory_flags,
        compress_weight,
        compress_cache,
    })
}

/// A job ready to run: everything that can fail before the first record is read has succeeded.
struct Job {
    files: ModelFiles,
    model: Box<dyn Scorer>,
    input: Box<dyn Read>,
    output: Box<dyn Write>,
}

/// Opens input, model and output (any failure here exits with status 2).
fn prepare(args: &Args) -> Result<Job> {
    // The contract's default is wgpu when an adapter exists; until its kernels are tuned
    // (on lavapipe it is ~20x slower than the reference today) the default stays the reference.
    let backend = args.backend.as_deref().or(Some("reference"));
    if !matches!(backend, None | Some("reference") | Some("wgpu")) {
        return Err(Error::invalid(
            "--backend",
            format!(
                "`{}` (choose reference or wgpu)",
                backend.unwrap_or_default()
            ),
        ));
    }
    if let Some(flag) = args.memory_flags.first() {
        return Err(Error::NotBuilt {
            what: format!("memory budgets and offloading ({flag})"),
        });
    }
    let input: Box<dyn Read> = if args.input == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(File::open(&args.input).map_err(|e| Error::io(&args.input, e))?)
    };
    let files = ModelFiles::open(&args.model)?;
    let options = GpuOptions {
        weights: if args.compress_weight {
            WeightFormat::Group4
        } else {
            WeightFormat::Native
        },
        compress_cache: args.compress_cache,
    };
    let model: Box<dyn Scorer> = match backend {
        Some("wgpu") => Box::new(GpuModel::load(GpuContext::new()?, &files, options)?),
        _ if args.compress_weight || args.compress_cache => {
            return Err(Error::invalid(
                "--compress-weight/--compress-cache",
                "need --backend wgpu",
            ))
        }
        _ => Box::new(ReferenceModel::load(&files)?),
    };
    let output: Box<dyn Write> = if args.output == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(File::create(&args.output).map_err(|e| Error::io(&args.output, e))?)
    };
    Ok(Job {
        files,
        model,
        input,
        output,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let job = match prepare(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = score_jsonl(
        job.model.as_ref(),
        job.files.tokenizer(),
        BufReader::new(job.input),
        BufWriter::new(job.output),
        &args.options,
        |s| {
            eprintln!(
                "scored {} records ({} failed), {} tokens, {:.1} tokens/s",
                s.scored,
                s.failed,
                s.tokens,
                s.tokens_per_second()
            )
        },
    );
    match result {
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Ok(s) => {
            eprintln!(
                "done: {} records, {} scored, {} failed; {} tokens in {:.2} s = {:.1} tokens/s; \
                 corpus perplexity {:.4} over {} scored tokens",
                s.records,
                s.scored,
                s.failed,
                s.tokens,
                s.seconds,
                s.tokens_per_second(),
                s.corpus_ppl(),
                s.scored_tokens
            );
            if s.failed > 0 {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
