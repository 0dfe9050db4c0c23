//! Generation on the engine (or greedy on the CPU reference), with memory budgets: for
//! `--prompt` flags, or as a job over a JSONL file of prompts.
//!
//! ```text
//! cargo run --release --example generate -- --model PATH --prompt "The capital of France is"
//!     [--prompt "..." ...] [--max-new-tokens 16] [--backend engine|reference]
//!     [--device auto|cpu|wgpu] [--gpu-mem SIZE] [--cpu-mem SIZE] [--offload-dir DIR]
//!     [--policy FILE.toml]
//! cargo run --release --example generate -- --model PATH --input PROMPTS.jsonl --output OUT.jsonl
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
//! README.md, "Generating"). `--resume`, `--shard` and `--shards` work as for `score`. Exit
//! status: 0 all records generated, 3 some failed, 2 usage or model error before any record
//! was read, 1 an I/O error during the job.

mod common;

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use common::{open_job_input, open_output, print_placement, required, Flags};
use ferrogen::cpu::ReferenceModel;
use ferrogen::device::DeviceKind;
use ferrogen::engine::{default_profile, Engine, EngineOptions, Placement};
use ferrogen::generation::{generate_jsonl, GenOptions, GenSummary};
use ferrogen::model::ModelFiles;
use ferrogen::parse_size;
use ferrogen::policy::Policy;
use ferrogen::score::Shard;
use ferrogen::{Error, Result};

#[derive(Default)]
struct Args {
    model: Option<PathBuf>,
    prompts: Vec<String>,
    input: Option<String>,
    output: Option<String>,
    job: GenOptions,
    resume: bool,
    shard: Option<Shard>,
    shards: Option<usize>,
    prompt_len: Option<usize>,
    backend: Option<String>,
    policy: Option<PathBuf>,
    offload_dir: Option<PathBuf>,
    gpu_mem: Option<u64>,
    cpu_mem: Option<u64>,
    device: DeviceKind,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        job: GenOptions::default(),
        ..Args::default()
    };
    a.job.defaults.max_tokens = 16;
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        let d = &mut a.job.defaults;
        match flag.as_str() {
            "--model" => a.model = Some(PathBuf::from(flags.value(&flag)?)),
            "--prompt" => a.prompts.push(flags.value(&flag)?),
            "--input" => a.input = Some(flags.value(&flag)?),
            "--output" => a.output = Some(flags.value(&flag)?),
            "--max-new-tokens" | "--max-tokens" => d.max_tokens = flags.parse(&flag)?,
            "--temperature" => d.temperature = flags.parse(&flag)?,
            "--top-p" => d.top_p = flags.parse(&flag)?,
            "--top-k" => d.top_k = flags.parse(&flag)?,
            "--seed" => d.seed = flags.parse(&flag)?,
            "--stop" => d.stop.push(flags.value(&flag)?),
            "--resume" => a.resume = true,
            "--shard" => a.shard = Some(Shard::parse(&flags.value(&flag)?)?),
            "--shards" => a.shards = Some(flags.positive(&flag)?),
            "--batch-records" => a.job.batch_records = flags.positive(&flag)?,
            "--prompt-len" => a.prompt_len = Some(flags.positive(&flag)?),
            "--backend" => a.backend = Some(flags.value(&flag)?),
            "--device" => a.device = flags.value(&flag)?.parse()?,
            "--policy" => a.policy = Some(PathBuf::from(flags.value(&flag)?)),
            "--offload-dir" => a.offload_dir = Some(PathBuf::from(flags.value(&flag)?)),
            "--gpu-mem" => a.gpu_mem = Some(parse_size(&flags.value(&flag)?, &flag)?),
            "--cpu-mem" => a.cpu_mem = Some(parse_size(&flags.value(&flag)?, &flag)?),
            other => return Err(Error::invalid(other, "unknown flag (see the file's doc)")),
        }
    }
    Ok(a)
}

/// The engine for these flags; `rows` and `gen_len` size the search's workload.
fn open_engine(a: &Args, files: ModelFiles, rows: usize, prompt_len: usize) -> Result<Engine> {
    let gen_len = a.job.defaults.max_tokens + 1;
    let placement = match &a.policy {
        Some(path) => Placement::Policy(Policy::from_toml_file(path)?),
        None if a.gpu_mem.is_none() && a.cpu_mem.is_none() => {
            Placement::Policy(Policy::all_on_gpu(rows.max(1)))
        }
        None => Placement::Search {
            hardware: default_profile()?,
            prompt_len,
            gen_len,
            compress_weight: false,
            compress_cache: false,
        },
    };
    let options = EngineOptions::new(placement)
        .gpu_budget(a.gpu_mem.unwrap_or(u64::MAX))
        .cpu_budget(a.cpu_mem.unwrap_or(u64::MAX))
        .offload_dir(a.offload_dir.clone())
        .device(match (a.backend.as_deref(), a.device) {
            (Some("wgpu"), DeviceKind::Auto) => DeviceKind::Wgpu,
            (_, d) => d,
        });
    let engine = Engine::open_with(files, options)?;
    print_placement(&engine);
    Ok(engine)
}

/// `--prompt` mode: continuations printed after their prompts.
fn run_prompts(a: &Args, model: PathBuf) -> Result<()> {
    let files = ModelFiles::open(&model)?;
    let eos = files.config.eos_token_id();
    let tokenizer = files.tokenizer()?;
    let ids: Vec<Vec<u32>> = a
        .prompts
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<Result<_>>()?;
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let max_new = a.job.defaults.max_tokens;
    let memory =
        a.gpu_mem.is_some() || a.cpu_mem.is_some() || a.policy.is_some() || a.offload_dir.is_some();
    let outputs: Vec<Vec<u32>> = match a.backend.as_deref() {
        Some("reference") | None if !memory => {
            ReferenceModel::load(&files)?.generate_greedy(&refs, max_new, eos)?
        }
        Some("reference") => {
            return Err(Error::invalid(
                "--backend",
                "memory flags are the engine's: drop --backend reference",
            ))
        }
        Some("engine" | "wgpu") | None => {
            let longest = refs.iter().map(|p| p.len()).max().unwrap_or(1);
            let engine = open_engine(a, ModelFiles::open(&model)?, refs.len(), longest)?;
            // stop after the end-of-sequence token, as the reference does
            let stop: Vec<u32> = eos.into_iter().collect();
            engine
                .generate(&refs, max_new, &stop)?
                .into_iter()
                .map(|r| r.tokens)
                .collect()
        }
        Some(other) => {
            return Err(Error::invalid(
                "--backend",
                format!("`{other}` (engine or reference)"),
            ))
        }
    };
    for (prompt, out) in a.prompts.iter().zip(outputs) {
        println!("{prompt}{}", tokenizer.decode(&out)?);
    }
    Ok(())
}

/// The JSONL job: exit status 2 when it cannot start, 1 on an I/O error during it, 3 when
/// some records failed.
fn run_job(a: &Args, model: PathBuf, input: &str) -> ExitCode {
    let prepared = (|| -> Result<_> {
        let output = required(a.output.clone(), "--output")?;
        if a.backend.as_deref() == Some("reference") {
            return Err(Error::invalid(
                "--backend",
                "the generation job runs on the engine: drop --backend reference",
            ));
        }
        let job_input = open_job_input(input, &output, a.shard, a.shards, a.resume)?;
        let files = ModelFiles::open(&model)?;
        files.tokenizer()?;
        let rows = a.job.batch_records;
        let engine = open_engine(a, files, rows, a.prompt_len.unwrap_or(256))?;
        let mut options = a.job.clone();
        options.skip_records = job_input.answered;
        options.shard = job_input.shard;
        let out = open_output(&output, a.resume)?;
        Ok((engine, job_input.reader, out, options))
    })();
    let (engine, reader, out, options) = match prepared {
        Ok(p) => p,
        Err(e) => return common::exit_status(Err(e)),
    };
    let Ok(tokenizer) = engine.files().tokenizer() else {
        return common::exit_status(Err(Error::invalid("--model", "no tokenizer")));
    };
    let progress = |s: &GenSummary| {
        eprintln!(
            "generated {} of {} records ({} failed), {} tokens, {:.1} tokens/s",
            s.generated,
            s.records - s.skipped,
            s.failed,
            s.new_tokens,
            s.tokens_per_second()
        )
    };
    let reader = BufReader::new(reader);
    let summary = match generate_jsonl(&engine, tokenizer, reader, out, &options, progress) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let skipped = if summary.skipped > 0 {
        format!(" ({} answered before, skipped)", summary.skipped)
    } else {
        String::new()
    };
    eprintln!(
        "done: {} records{skipped}, {} generated, {} failed; {} prompt tokens, {} new tokens \
         in {:.2} s = {:.1} generated tokens/s",
        summary.records,
        summary.generated,
        summary.failed,
        summary.prompt_tokens,
        summary.new_tokens,
        summary.seconds,
        summary.tokens_per_second()
    );
    if summary.failed > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => return common::exit_status(Err(e)),
    };
    let model = match required(args.model.clone(), "--model") {
        Ok(m) => m,
        Err(e) => return common::exit_status(Err(e)),
    };
    match (&args.input, args.prompts.is_empty()) {
        (Some(_), false) => common::exit_status(Err(Error::invalid(
            "--prompt",
            "give prompts with --prompt or --input, not both",
        ))),
        (Some(input), true) => run_job(&args, model, input),
        (None, true) => common::exit_status(Err(Error::invalid(
            "--prompt",
            "give at least one (or --input PROMPTS.jsonl)",
        ))),
        (None, false) => common::exit_status(run_prompts(&args, model)),
    }
}
