//! Scores a JSONL dataset: per-record log-likelihood and perplexity, or lm-eval's
//! context/continuation requests (see README.md, "Scoring a dataset").
//!
//! ```text
//! ferrogen score --model PATH --input IN.jsonl --output OUT.jsonl
//!     [--resume] [--shard K/N | --shards N] [--per-token] [--backend engine|reference]
//!     [--device auto|cpu|wgpu] [--batch-tokens N] [--window N] [--stride S]
//!     [--gpu-mem SIZE] [--cpu-mem SIZE] [--offload-dir DIR] [--keep-offload]
//!     [--policy FILE.toml | --hardware PROFILE.toml [--prompt-len N]]
//!     [--compress-weight] [--compress-cache] [--no-share-prefixes] [--trace FILE.json]
//! ```
//! `--help` describes every flag. The engine runs by default, on the device `--device` names
//! (auto: a discrete or integrated GPU through WebGPU when there is one, else the native CPU
//! device; on the CPU device `--cpu-mem` budgets all of RAM and `--gpu-mem` is an error).
//! `--backend reference` runs the f32 CPU oracle instead. With `--policy` the file's placement
//! is used (checked against any budgets); with budgets and no policy the LP search picks one
//! for the hardware profile (by default the one calibrated on the CI machine,
//! `policies/lavapipe-2core.toml`); with neither, everything stays in device memory. A record
//! longer than `--window` tokens (default: the model's context) is scored in lm-eval's rolling
//! windows, or with `--stride S` in windows that advance by `S` tokens and score only their
//! last `S`. `-` reads stdin / writes stdout. Ids must be unique (a duplicate is an error
//! before any work). `--resume` continues an interrupted job: the records its output already
//! answers are skipped, a torn last line is cut and redone, and the rest is appended.
//! `--shard K/N` scores every N-th record from the K-th (from 0); without it, a Slurm job
//! array's or a Kubernetes Indexed Job's environment names the shard (`--shards N` gives an
//! Indexed Job's count), and the `merge` example joins the shards' outputs. Records that begin
//! alike (a question's endings) are scored as prefix groups, the common part computed once.
//!
//! Progress goes to stderr: a bar (records, tokens/s, ETA) when stderr is a terminal, else a
//! line every 2 s. Exit status: 0 all records scored, 3 some failed, 2 usage or model error
//! before any record was read, 1 an I/O error during the job.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use super::common::{finish_job, job_meta, open_job_input, open_output, positive, print_placement};
use super::common::{in_flags, BackendKind, Counts, Progress};
use super::common::{DeviceArgs, JobArgs};
use crate::arch::ModelFiles;
use crate::engine::{Engine, Placement};
use crate::format_size;
use crate::job::Shard;
use crate::policy::HardwareProfile;
use crate::reference::ReferenceModel;
use crate::score::{score_jsonl, ScoreOptions, ScoreSummary, Scorer};
use crate::Tier;
use crate::{Error, Result};
use clap::Parser;

/// Scores a JSONL dataset: per-record log-likelihood and perplexity, or lm-eval's
/// context/continuation requests. Exit status: 0 all records scored, 3 some failed, 2 usage or
/// model error before any record was read, 1 an I/O error during the job.
#[derive(Parser, Debug)]
#[command(name = "score")]
pub(crate) struct Args {
    /// The model: a GGUF file, or a safetensors directory with config.json and tokenizer.json.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// The records, one JSON object per line (`-`: stdin).
    #[arg(long, value_name = "IN.jsonl")]
    input: String,
    /// Where the answers go, one line per record in input order (`-`: stdout).
    #[arg(long, value_name = "OUT.jsonl")]
    output: String,
    #[command(flatten)]
    job: JobArgs,
    /// Also write each scored token's logprob.
    #[arg(long)]
    per_token: bool,
    /// What computes the scores.
    #[arg(long, value_enum, default_value = "engine")]
    backend: BackendKind,
    /// Tokens per batch (default: the policy's capacity).
    #[arg(long, value_name = "N", value_parser = positive)]
    batch_tokens: Option<usize>,
    /// Longest window scored at once (default: the model's context); longer records are
    /// scored in lm-eval's rolling windows.
    #[arg(long, value_name = "N", value_parser = positive)]
    window: Option<usize>,
    /// Windows advance by S tokens and score only their last S (Hugging Face's strided
    /// perplexity).
    #[arg(long, value_name = "S", value_parser = positive)]
    stride: Option<usize>,
    #[command(flatten)]
    memory: DeviceArgs,
    /// Keep the offload file for a later run to reuse.
    #[arg(long)]
    keep_offload: bool,
    /// A hardware profile for the policy search (default: the built-in one).
    #[arg(long, value_name = "PROFILE.toml", conflicts_with = "policy")]
    hardware: Option<PathBuf>,
    /// The prompt length the policy search plans for.
    #[arg(long, value_name = "N", default_value = "256", value_parser = positive)]
    prompt_len: usize,
    /// Compute every record whole, without prefix groups.
    #[arg(long)]
    no_share_prefixes: bool,
    /// Write a Chrome trace (open it in Perfetto) of every load, compute and store.
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// Before the job, read every weight once and stop with an error naming the first tensor
    /// that holds a NaN or an infinity.
    #[arg(long)]
    check_weights: bool,
}

impl Args {
    /// The scoring options these flags give.
    fn score_options(&self) -> ScoreOptions {
        ScoreOptions {
            per_token: self.per_token,
            batch_tokens: self.batch_tokens,
            window: self.window,
            stride: self.stride,
            ..ScoreOptions::default()
        }
    }

    /// The job's meta record: the flags that change its answers.
    fn meta(&self) -> crate::job::JobMeta {
        let m = &self.memory;
        job_meta(
            "score",
            &[
                ("--per-token", self.per_token.to_string()),
                ("--window", format!("{:?}", self.window)),
                ("--stride", format!("{:?}", self.stride)),
                ("--backend", format!("{:?}", self.backend)),
                ("--compress-weight", m.compress_weight.to_string()),
                ("--compress-cache", m.compress_cache.to_string()),
                ("--f16-cache", m.f16_cache.to_string()),
            ],
        )
    }

    /// A flag that places memory (the engine's), if any is given.
    fn memory_flag(&self) -> Option<&'static str> {
        self.memory.places_memory().or_else(|| {
            [
                (self.hardware.is_some(), "--hardware"),
                (self.trace.is_some(), "--trace"),
                (self.keep_offload, "--keep-offload"),
            ]
            .into_iter()
            .find_map(|(set, flag)| set.then_some(flag))
        })
    }

    /// How the engine places the model (all resident: blocks of 64 records).
    fn placement(&self) -> Result<Placement> {
        let hardware = match &self.hardware {
            Some(path) => Some(HardwareProfile::from_toml_file(path)?),
            None => None,
        };
        self.memory.placement(64, self.prompt_len, 1, hardware)
    }
}

/// The model a job runs on.
#[allow(clippy::large_enum_variant)] // one per process
enum Backend {
    Reference(ReferenceModel, ModelFiles),
    Engine(Engine),
}

impl Backend {
    fn scorer(&self) -> &dyn Scorer {
        match self {
            Backend::Reference(m, _) => m,
            Backend::Engine(e) => e,
        }
    }
}

/// A job ready to run: everything that can fail before the first record is read has succeeded.
struct Job {
    model: Backend,
    input: Box<dyn Read>,
    output: Box<dyn Write>,
    /// The locked output file (`None` for stdout), renamed into place when the job ends.
    output_file: Option<crate::job::JobOutput>,
    /// Records answered by an earlier run (`--resume`).
    answered: usize,
    /// Records this run answers.
    remaining: usize,
    /// The records this process scores.
    shard: Option<Shard>,
}

/// Opens input, model and output (any failure here exits with status 2).
fn prepare(args: &Args) -> Result<Job> {
    let mut input = open_job_input(
        &args.input,
        &args.output,
        &args.job,
        &args.model,
        args.meta(),
    )?;
    let model = match args.backend {
        BackendKind::Reference => {
            if let Some(flag) = args.memory_flag() {
                return Err(Error::invalid(
                    flag,
                    "is the engine's flag: drop --backend reference",
                ));
            }
            let files = ModelFiles::open(&args.model)?;
            Backend::Reference(ReferenceModel::load(&files)?, files)
        }
        BackendKind::Engine | BackendKind::Wgpu => {
            let placement = args.placement()?;
            let files = ModelFiles::open(&args.model)?;
            let options = args
                .memory
                .engine_options(placement)
                .keep_offload(args.keep_offload)
                .trace(args.trace.is_some())
                .share_prefixes(!args.no_share_prefixes)
                .device(BackendKind::engine_device(
                    Some(args.backend),
                    args.memory.device,
                ));
            let engine = Engine::open_with(files, options)?;
            print_placement(&engine);
            Backend::Engine(engine)
        }
    };
    // --window and --stride against the model's context, before the output is created
    args.score_options().windows(model.scorer().config())?;
    if args.check_weights {
        let files = match &model {
            Backend::Engine(e) => e.files(),
            Backend::Reference(_, files) => files,
        };
        files.check_finite()?;
        eprintln!("weights: every value is finite");
    }
    let output_file = input.output.take();
    Ok(Job {
        model,
        input: input.reader,
        output: open_output(
            &args.output,
            output_file.as_ref(),
            &input.meta,
            args.job.resume,
        )?,
        output_file,
        answered: input.answered,
        remaining: input.remaining,
        shard: input.shard,
    })
}

/// After the job: memory peaks against the budgets, how full the blocks were, and the trace
/// file.
fn report(args: &Args, model: &Backend) -> Result<()> {
    let Backend::Engine(engine) = model else {
        return Ok(());
    };
    let peaks = engine.peaks();
    // on the CPU device the GPU tier is RAM: one line for both
    let tiers: &[Tier] = if engine.on_host() {
        &[Tier::Cpu, Tier::Disk]
    } else {
        &Tier::ALL
    };
    let line: Vec<String> = tiers
        .iter()
        .map(|&t| {
            let budget = engine.ledger().budget(t);
            let budget = if budget == u64::MAX {
                "unlimited".to_string()
            } else {
                format_size(budget)
            };
            let name = if engine.on_host() && t == Tier::Cpu {
                "RAM".to_string()
            } else {
                t.to_string()
            };
            format!("{name} {} of {budget}", format_size(peaks[t.index()]))
        })
        .collect();
    eprintln!("memory peaks: {}", line.join(", "));
    let b = engine.block_stats();
    let capacity = if b.token_capacity > 0 {
        format!("{} tokens", b.token_capacity)
    } else {
        format!("{} sequences", b.sequence_capacity)
    };
    let shared = if b.shared_tokens > 0 {
        format!(
            "; prefix groups saved {} tokens, {:.0}% of the records'",
            b.shared_tokens,
            100.0 * b.shared_tokens as f64 / (b.tokens + b.shared_tokens) as f64
        )
    } else {
        String::new()
    };
    eprintln!(
        "blocks: {} ({} sequences, {} tokens), {:.0}% full (capacity {capacity}){shared}",
        b.blocks,
        b.sequences,
        b.tokens,
        100.0 * b.fill()
    );
    if let (Some(path), Some(trace)) = (&args.trace, engine.trace()) {
        std::fs::write(path, trace.to_chrome_json()).map_err(|e| Error::io(path, e))?;
        eprintln!("trace: {} spans in {}", trace.spans.len(), path.display());
    }
    Ok(())
}

/// A summary's counts for the progress display.
fn counts(s: &ScoreSummary) -> Counts {
    Counts {
        done: s.scored + s.failed,
        failed: s.failed,
        tokens: s.tokens,
        tokens_per_second: s.tokens_per_second(),
        seconds: s.seconds,
    }
}

pub(crate) fn main(args: Args) -> ExitCode {
    crate::job::stop_on_signals();
    let mut job = match prepare(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {}", in_flags(&e));
            return ExitCode::from(2);
        }
    };
    let tokenizer = match &job.model {
        Backend::Engine(e) => e.files().tokenizer(),
        Backend::Reference(_, files) => files.tokenizer(),
    };
    let progress = Progress::new(job.remaining, "scored", args.job.progress_every);
    let mut options = args.score_options();
    options.skip_records = job.answered;
    options.shard = job.shard;
    options.progress_every = progress.every();
    options.interrupt = Some(crate::job::received_signal);
    let result = score_jsonl(
        job.model.scorer(),
        tokenizer,
        BufReader::new(job.input),
        BufWriter::new(job.output),
        &options,
        |s| progress.update(counts(s)),
    );
    if let Ok(s) = &result {
        progress.finish(counts(s));
        let skipped = if s.skipped > 0 {
            format!(" ({} answered before, skipped)", s.skipped)
        } else {
            String::new()
        };
        eprintln!(
            "done: {} records{skipped}, {} scored, {} failed; {} tokens in {:.2} s = {:.1} \
             tokens/s; corpus perplexity {:.4} over {} scored tokens",
            s.records,
            s.scored,
            s.failed,
            s.tokens,
            s.seconds,
            s.tokens_per_second(),
            s.corpus_ppl(),
            s.scored_tokens
        );
        if let Err(e) = report(&args, &job.model) {
            eprintln!("error: {}", in_flags(&e));
        }
    }
    let status = finish_job(result.map(|s| s.failed), job.output_file.take());
    // the engine (and its offload files) goes before the process does
    drop(job.model);
    status
}
