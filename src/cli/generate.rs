//! Generation on the engine (or greedy on the CPU reference), with memory budgets: for
//! `--prompt` flags, or as a job over a JSONL file of prompts.
//!
//! ```text
//! ferrogen generate --model PATH --prompt "The capital of France is"
//!     [--prompt "..." ...] [--max-tokens 16] [--backend engine|reference]
//!     [--device auto|cpu|wgpu] [--gpu-mem SIZE] [--cpu-mem SIZE] [--offload-dir DIR]
//!     [--policy FILE.toml]
//! ferrogen generate --model PATH --input PROMPTS.jsonl --output OUT.jsonl
//!     [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop TEXT ...]
//!     [--resume] [--shard K/N | --shards N] [--batch-records N] [--prompt-len N]
//!     [--device ...] [--gpu-mem SIZE] [--cpu-mem SIZE] [--offload-dir DIR] [--policy FILE.toml]
//! ```
//! The engine runs on the device `--device` names (auto: a discrete or integrated GPU through
//! WebGPU when there is one, else the native CPU device, whose one memory budget is
//! `--cpu-mem`): with a policy file its placement, with budgets alone the policy search's on
//! the built-in profile (for prompts of `--prompt-len` tokens, 256 by default, in the job),
//! with neither everything in device memory. `--backend reference` runs the f32 CPU oracle
//! (greedy, `--prompt` only). A continuation stops at the model's end-of-sequence token.
//!
//! The job reads records `{"id", "prompt" | "tokens", "max_tokens", "temperature", "top_p",
//! "top_k", "seed", "stop"}` (the flags give what a record leaves out) and writes `{"id",
//! "text", "tokens", "token_logprobs", "finish_reason"}` per record in input order (see
//! README.md, "Generating"). `--resume`, `--shard` and `--shards` work as for `score`, and
//! so does the progress display (a bar on a terminal, else a line every 2 s). `--help`
//! describes every flag. Exit status: 0 all records generated, 3 some failed, 2 usage or model
//! error before any record was read, 1 an I/O error during the job.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use super::common::{finish_job, job_meta, open_job_input, open_output, positive, print_placement};
use super::common::{BackendKind, Counts, Progress};
use super::common::{DeviceArgs, JobArgs};
use crate::arch::ModelFiles;
use crate::engine::Engine;
use crate::generation::{generate_jsonl, GenDefaults, GenOptions, GenSummary};
use crate::reference::ReferenceModel;
use crate::{Error, Result};
use clap::Parser;

/// Generation on the engine under memory budgets: for `--prompt` flags, or as a job over a
/// JSONL file of prompts. Exit status: 0 all records generated, 3 some failed, 2 usage or model
/// error before any record was read, 1 an I/O error during the job.
#[derive(Parser, Debug)]
#[command(name = "generate")]
#[command(group = clap::ArgGroup::new("prompts").required(true).args(["prompt", "input"]))]
pub(crate) struct Args {
    /// The model: a GGUF file, or a safetensors directory with config.json and tokenizer.json.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// A prompt to continue; its continuation is printed after it (repeat for more).
    #[arg(long, value_name = "TEXT")]
    prompt: Vec<String>,
    /// The job's records, one JSON object per line (`-`: stdin).
    #[arg(long, value_name = "PROMPTS.jsonl", requires = "output")]
    input: Option<String>,
    /// Where the job's answers go, in input order (`-`: stdout).
    #[arg(long, value_name = "OUT.jsonl", requires = "input")]
    output: Option<String>,
    /// New tokens at most (a record's `max_tokens` overrides it).
    #[arg(long, value_name = "N", default_value = "16", value_parser = positive, alias = "max-new-tokens")]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, value_name = "T", default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum to P (1: off).
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    top_p: f32,
    /// Keep the K most likely tokens (0: off).
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_k: usize,
    /// Mixed with each record's id into its seed when the record gives none.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    /// A stop string: generation ends where the text first contains it, and it is cut
    /// (repeat for more).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    #[command(flatten)]
    job: JobArgs,
    /// Records per batch (one engine call each; longest prompts first within it).
    #[arg(long, value_name = "N", default_value = "256", value_parser = positive)]
    batch_records: usize,
    /// The prompt length the policy search plans for in the job.
    #[arg(long, value_name = "N", default_value = "256", value_parser = positive)]
    prompt_len: usize,
    /// What generates (default: the engine; with `--prompt` and no memory flags, the
    /// reference).
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    #[command(flatten)]
    memory: DeviceArgs,
    /// Before the job, read every weight once and stop with an error naming the first tensor
    /// that holds a NaN or an infinity.
    #[arg(long)]
    check_weights: bool,
}

impl Args {
    /// The job's meta record: the flags that change its answers (a record's own fields
    /// override them, and the record is part of the input's fingerprint).
    fn meta(&self) -> crate::job::JobMeta {
        let m = &self.memory;
        job_meta(
            "generate",
            &[
                ("--max-tokens", self.max_tokens.to_string()),
                ("--temperature", self.temperature.to_string()),
                ("--top-p", self.top_p.to_string()),
                ("--top-k", self.top_k.to_string()),
                ("--seed", self.seed.to_string()),
                ("--stop", format!("{:?}", self.stop)),
                ("--compress-weight", m.compress_weight.to_string()),
                ("--compress-cache", m.compress_cache.to_string()),
                ("--f16-cache", m.f16_cache.to_string()),
            ],
        )
    }

    /// The job's options: the flags' defaults for what records leave out.
    fn job_options(&self) -> GenOptions {
        GenOptions {
            defaults: GenDefaults {
                max_tokens: self.max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
                stop: self.stop.clone(),
            },
            batch_records: self.batch_records,
            ..GenOptions::default()
        }
    }
}

/// The engine for these flags; `rows` (the most sequences at once) and `prompt_len` size the
/// search's workload.
fn open_engine(a: &Args, files: ModelFiles, rows: usize, prompt_len: usize) -> Result<Engine> {
    let placement = a
        .memory
        .placement(rows, prompt_len, a.max_tokens + 1, None)?;
    let options = a
        .memory
        .engine_options(placement)
        .max_block_sequences(rows)
        .device(BackendKind::engine_device(a.backend, a.memory.device));
    let engine = Engine::open_with(files, options)?;
    print_placement(&engine);
    Ok(engine)
}

/// `--prompt` mode: continuations printed after their prompts.
fn run_prompts(a: &Args) -> Result<()> {
    let memory = a.memory.places_memory();
    if let (Some(BackendKind::Reference), Some(flag)) = (a.backend, memory) {
        return Err(Error::invalid(
            flag,
            "is the engine's flag: drop --backend reference",
        ));
    }
    let files = ModelFiles::open(&a.model)?;
    let eos = files.config.eos_token_id();
    let tokenizer = files.tokenizer()?;
    let ids: Vec<Vec<u32>> = a
        .prompt
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<Result<_>>()?;
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let max_new = a.max_tokens;
    let outputs: Vec<Vec<u32>> = match (a.backend, memory) {
        (Some(BackendKind::Reference) | None, None) => {
            ReferenceModel::load(&files)?.generate_greedy(&refs, max_new, eos)?
        }
        _ => {
            let longest = refs.iter().map(|p| p.len()).max().unwrap_or(1);
            let engine = open_engine(a, ModelFiles::open(&a.model)?, refs.len(), longest)?;
            // stop after the end-of-sequence token, as the reference does
            let stop: Vec<u32> = eos.into_iter().collect();
            engine
                .generate(&refs, max_new, &stop)?
                .into_iter()
                .map(|r| r.tokens)
                .collect()
        }
    };
    for (prompt, out) in a.prompt.iter().zip(outputs) {
        println!("{prompt}{}", tokenizer.decode(&out)?);
    }
    Ok(())
}

/// A summary's counts for the progress display.
fn counts(s: &GenSummary) -> Counts {
    Counts {
        done: s.generated + s.failed,
        failed: s.failed,
        tokens: s.new_tokens,
        tokens_per_second: s.tokens_per_second(),
        seconds: s.seconds,
    }
}

/// The JSONL job: exit status 2 when it cannot start, 1 on an I/O error during it, 3 when
/// some records failed.
fn run_job(a: &Args, input: &str, output: &str) -> ExitCode {
    crate::job::stop_on_signals();
    let prepared = (|| -> Result<_> {
        if a.backend == Some(BackendKind::Reference) {
            return Err(Error::invalid(
                "--backend",
                "the generation job runs on the engine: drop --backend reference",
            ));
        }
        let mut job_input = open_job_input(input, output, &a.job, &a.model, a.meta())?;
        let files = ModelFiles::open(&a.model)?;
        files.tokenizer()?;
        if a.check_weights {
            files.check_finite()?;
            eprintln!("weights: every value is finite");
        }
        let context = files.config.max_context();
        if a.max_tokens > context {
            return Err(Error::invalid(
                "--max-tokens",
                format!(
                    "{} new tokens do not fit the model's context of {context} tokens (with \
                     the prompt): give fewer",
                    a.max_tokens
                ),
            ));
        }
        let engine = open_engine(a, files, a.batch_records, a.prompt_len)?;
        let job_output = job_input.output.take();
        let out = open_output(output, job_output.as_ref(), &job_input.meta, a.job.resume)?;
        Ok((engine, job_input, out, job_output))
    })();
    let (engine, job_input, out, job_output) = match prepared {
        Ok(p) => p,
        Err(e) => return super::common::exit_status(Err(e)),
    };
    let Ok(tokenizer) = engine.files().tokenizer() else {
        return super::common::exit_status(Err(Error::invalid("--model", "no tokenizer")));
    };
    let progress = Progress::new(job_input.remaining, "generated", a.job.progress_every);
    let mut options = a.job_options();
    options.skip_records = job_input.answered;
    options.shard = job_input.shard;
    options.progress_every = progress.every();
    options.interrupt = Some(crate::job::received_signal);
    let reader = BufReader::new(job_input.reader);
    let result = generate_jsonl(&engine, tokenizer, reader, out, &options, |s| {
        progress.update(counts(s))
    });
    if let Ok(summary) = &result {
        progress.finish(counts(summary));
        let skipped = if summary.skipped > 0 {
            format!(" ({} answered before, skipped)", summary.skipped)
        } else {
            String::new()
        };
        eprintln!(
            "done: {} records{skipped}, {} generated, {} failed; {} prompt tokens, {} new \
             tokens in {:.2} s = {:.1} generated tokens/s",
            summary.records,
            summary.generated,
            summary.failed,
            summary.prompt_tokens,
            summary.new_tokens,
            summary.seconds,
            summary.tokens_per_second()
        );
    }
    let status = finish_job(result.map(|s| s.failed), job_output);
    // the engine (and its offload files) goes before the process does
    drop(engine);
    status
}

pub(crate) fn main(args: Args) -> ExitCode {
    match (&args.input, &args.output) {
        (Some(input), Some(output)) => run_job(&args, input, output),
        // clap requires prompts or an input, and an output with an input
        _ => super::common::exit_status(run_prompts(&args)),
    }
}
