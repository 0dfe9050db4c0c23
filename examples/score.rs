//! Scores a JSONL dataset: per-record log-likelihood and perplexity, or lm-eval's
//! context/continuation requests (see README.md, "Scoring a dataset").
//!
//! ```text
//! cargo run --release --example score -- --model PATH --input IN.jsonl --output OUT.jsonl
//!     [--resume] [--shard K/N | --shards N] [--per-token] [--backend engine|reference] [--device auto|cpu|wgpu] [--batch-tokens N]
//!     [--window N] [--stride S]
//!     [--gpu-mem SIZE] [--cpu-mem SIZE] [--offload-dir DIR] [--keep-offload]
//!     [--policy FILE.toml | --hardware PROFILE.toml [--prompt-len N]]
//!     [--compress-weight] [--compress-cache] [--no-share-prefixes] [--trace FILE.json]
//! ```
//! The engine runs by default, on the device `--device` names (auto: a discrete or integrated
//! GPU through WebGPU when there is one, else the native CPU device; on the CPU device
//! `--cpu-mem` budgets all of RAM and `--gpu-mem` is an error). `--backend reference` runs the
//! f32 CPU oracle instead (`--backend wgpu`, the old spelling, means `--device wgpu`). With `--policy` the file's placement is used (checked against any budgets);
//! with budgets and no policy the LP search picks one for the hardware profile (by default the
//! one calibrated on the CI machine, `policies/lavapipe-2core.toml`); with neither, everything
//! stays on the GPU. `--trace` writes a Chrome trace (open it in Perfetto) of every load,
//! compute and store. A record longer than `--window` tokens (default: the model's context)
//! is scored in lm-eval's rolling windows, or with `--stride S` in windows that advance by `S`
//! tokens and score only their last `S`. `-` reads stdin / writes stdout. Ids must be unique (a
//! duplicate is an error before any work). `--resume` continues an interrupted job: the records
//! its output already answers are skipped, a torn last line is cut and redone, and the rest is
//! appended. `--shard K/N` scores every N-th record from the K-th (from 0); without it, a Slurm
//! job array's or a Kubernetes Indexed Job's environment names the shard (`--shards N` gives an
//! Indexed Job's count), and the `merge` example joins the shards' outputs. Records that begin
//! alike (a question's endings) are scored as prefix groups, the common part computed once;
//! `--no-share-prefixes` computes every record whole. Exit status: 0 all records scored, 3 some failed, 2 usage or model error before
//! any record was read, 1 an I/O error during the job.

mod common;

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use common::{open_job_input, open_output, print_placement, required, Flags};
use ferrogen::cpu::ReferenceModel;
use ferrogen::device::DeviceKind;
use ferrogen::engine::{default_profile, Engine, EngineOptions, Placement};
use ferrogen::model::ModelFiles;
use ferrogen::policy::{HardwareProfile, Policy};
use ferrogen::score::{score_jsonl, ScoreOptions, Scorer, Shard};
use ferrogen::storage::Tier;
use ferrogen::{format_size, parse_size};
use ferrogen::{Error, Result};

#[derive(Default)]
struct Args {
    model: PathBuf,
    input: String,
    output: String,
    backend: Option<String>,
    device: DeviceKind,
    options: ScoreOptions,
    gpu_mem: Option<u64>,
    cpu_mem: Option<u64>,
    offload_dir: Option<PathBuf>,
    keep_offload: bool,
    /// Skip the records an earlier run's output already answers.
    resume: bool,
    /// Score one shard of the input (`--shard K/N`).
    shard: Option<Shard>,
    /// How many shards a Kubernetes Indexed Job has (`--shards N`).
    shards: Option<usize>,
    policy: Option<PathBuf>,
    hardware: Option<PathBuf>,
    prompt_len: usize,
    trace: Option<PathBuf>,
    /// FlexGen 4-bit weights.
    compress_weight: bool,
    /// FlexGen 4-bit KV cache.
    compress_cache: bool,
    /// Compute every record whole, without prefix groups.
    no_share_prefixes: bool,
}

fn parse_args() -> Result<Args> {
    let (mut model, mut input, mut output) = (None, None, None);
    let mut a = Args {
        prompt_len: 256,
        ..Args::default()
    };
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(flags.value(&flag)?)),
            "--input" => input = Some(flags.value(&flag)?),
            "--output" => output = Some(flags.value(&flag)?),
            "--per-token" => a.options.per_token = true,
            "--resume" => a.resume = true,
            "--shard" => a.shard = Some(Shard::parse(&flags.value(&flag)?)?),
            "--shards" => a.shards = Some(flags.positive(&flag)?),
            "--compress-weight" => a.compress_weight = true,
            "--compress-cache" => a.compress_cache = true,
            "--no-share-prefixes" => a.no_share_prefixes = true,
            "--backend" => a.backend = Some(flags.value(&flag)?),
            "--device" => a.device = flags.value(&flag)?.parse()?,
            "--batch-tokens" => a.options.batch_tokens = Some(flags.positive(&flag)?),
            "--window" => a.options.window = Some(flags.positive(&flag)?),
            "--stride" => a.options.stride = Some(flags.positive(&flag)?),
            "--gpu-mem" => a.gpu_mem = Some(parse_size(&flags.value(&flag)?, &flag)?),
            "--cpu-mem" => a.cpu_mem = Some(parse_size(&flags.value(&flag)?, &flag)?),
            "--offload-dir" => a.offload_dir = Some(PathBuf::from(flags.value(&flag)?)),
            "--keep-offload" => a.keep_offload = true,
            "--policy" => a.policy = Some(PathBuf::from(flags.value(&flag)?)),
            "--hardware" => a.hardware = Some(PathBuf::from(flags.value(&flag)?)),
            "--prompt-len" => a.prompt_len = flags.positive(&flag)?,
            "--trace" => a.trace = Some(PathBuf::from(flags.value(&flag)?)),
            "-h" | "--help" => {
                return Err(Error::invalid(
                    "--help",
                    "usage: score --model PATH --input IN.jsonl --output OUT.jsonl [--resume] \
                     [--shard K/N | --shards N] [--per-token] \
                     [--backend engine|reference] [--device auto|cpu|wgpu] [--batch-tokens N] [--window N] \
                     [--stride S] [--gpu-mem SIZE] \
                     [--cpu-mem SIZE] [--offload-dir DIR] [--keep-offload] [--policy FILE.toml | \
                     --hardware PROFILE.toml [--prompt-len N]] [--compress-weight] \
                     [--compress-cache] [--trace FILE.json]",
                ))
            }
            other => return Err(Error::invalid(other, "unknown flag (try --help)")),
        }
    }
    a.model = required(model, "--model")?;
    a.input = required(input, "--input")?;
    a.output = required(output, "--output")?;
    Ok(a)
}

impl Args {
    fn memory_flag(&self) -> Option<&'static str> {
        [
            (self.gpu_mem.is_some(), "--gpu-mem"),
            (self.cpu_mem.is_some(), "--cpu-mem"),
            (self.offload_dir.is_some(), "--offload-dir"),
            (self.policy.is_some(), "--policy"),
            (self.hardware.is_some(), "--hardware"),
            (self.trace.is_some(), "--trace"),
        ]
        .into_iter()
        .find_map(|(set, flag)| set.then_some(flag))
    }

    /// How the engine places the model.
    fn placement(&self) -> Result<Placement> {
        if let Some(path) = &self.policy {
            if self.hardware.is_some() {
                return Err(Error::invalid(
                    "--hardware",
                    "give a policy or a hardware profile, not both",
                ));
            }
            let mut p = Policy::from_toml_file(path)?;
            p.compress_weight |= self.compress_weight;
            p.compress_cache |= self.compress_cache;
            return Ok(Placement::Policy(p));
        }
        if self.gpu_mem.is_none() && self.cpu_mem.is_none() && self.hardware.is_none() {
            let mut p = Policy::all_on_gpu(64);
            p.compress_weight = self.compress_weight;
            p.compress_cache = self.compress_cache;
            return Ok(Placement::Policy(p));
        }
        let hardware = match &self.hardware {
            Some(path) => HardwareProfile::from_toml_file(path)?,
            None => default_profile()?,
        };
        Ok(Placement::Search {
            hardware,
            prompt_len: self.prompt_len,
            gen_len: 1,
            compress_weight: self.compress_weight,
            compress_cache: self.compress_cache,
        })
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
    /// Records answered by an earlier run (`--resume`).
    answered: usize,
    /// The records this process scores.
    shard: Option<Shard>,
}

/// Opens input, model and output (any failure here exits with status 2).
fn prepare(args: &Args) -> Result<Job> {
    let input = open_job_input(
        &args.input,
        &args.output,
        args.shard,
        args.shards,
        args.resume,
    )?;
    let model = match args.backend.as_deref() {
        Some("reference") => {
            if let Some(flag) = args.memory_flag() {
                return Err(Error::invalid(
                    flag,
                    "memory placement is the engine's: drop --backend reference",
                ));
            }
            if args.compress_weight || args.compress_cache {
                return Err(Error::invalid(
                    "--compress-weight/--compress-cache",
                    "are the engine's: drop --backend reference",
                ));
            }
            let files = ModelFiles::open(&args.model)?;
            Backend::Reference(ReferenceModel::load(&files)?, files)
        }
        Some("engine" | "wgpu") | None => {
            let placement = args.placement()?;
            let files = ModelFiles::open(&args.model)?;
            // `--backend wgpu` (the old spelling) is the engine on WebGPU
            let device = match (args.backend.as_deref(), args.device) {
                (Some("wgpu"), DeviceKind::Auto) => DeviceKind::Wgpu,
                (_, d) => d,
            };
            let options = EngineOptions::new(placement)
                .gpu_budget(args.gpu_mem.unwrap_or(u64::MAX))
                .cpu_budget(args.cpu_mem.unwrap_or(u64::MAX))
                .offload_dir(args.offload_dir.clone())
                .keep_offload(args.keep_offload)
                .trace(args.trace.is_some())
                .share_prefixes(!args.no_share_prefixes)
                .device(device);
            let engine = Engine::open_with(files, options)?;
            print_placement(&engine);
            Backend::Engine(engine)
        }
        Some(other) => {
            return Err(Error::invalid(
                "--backend",
                format!("`{other}` (choose engine or reference)"),
            ))
        }
    };
    // --window and --stride against the model's context, before the output is created
    args.options.windows(model.scorer().config())?;
    Ok(Job {
        model,
        input: input.reader,
        output: open_output(&args.output, args.resume)?,
        answered: input.answered,
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
    let tokenizer = match &job.model {
        Backend::Engine(e) => e.files().tokenizer(),
        Backend::Reference(_, files) => files.tokenizer(),
    };
    let mut options = args.options.clone();
    options.skip_records = job.answered;
    options.shard = job.shard;
    let result = score_jsonl(
        job.model.scorer(),
        tokenizer,
        BufReader::new(job.input),
        BufWriter::new(job.output),
        &options,
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
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
            if s.failed > 0 {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
