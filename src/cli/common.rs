//! What the subcommands share: clap value parsers and flag groups, the JSONL jobs' input,
//! output and progress display; public for programs built like them (the benchmarks).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::device::DeviceKind;
use crate::engine::{default_profile, EngineOptions, Placement};
use crate::job::Shard;
use crate::job::{JobMeta, JobOutput};
use crate::policy::{HardwareProfile, Policy};
use crate::{Error, Result};

/// A library error as a clap value parser's message: the reason alone (clap names the flag).
fn reason(e: Error) -> String {
    match e {
        Error::InvalidArgument { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// Parses a memory size such as `512MiB`, `2GiB` or `1.5GB` (a clap value parser).
pub fn size(text: &str) -> std::result::Result<u64, String> {
    crate::parse_size(text, "SIZE").map_err(reason)
}

/// Parses a count that must be at least 1 (a clap value parser).
pub fn positive(text: &str) -> std::result::Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a whole number")),
    }
}

/// Parses `auto`, `cpu` or `wgpu` (a clap value parser).
pub fn device(text: &str) -> std::result::Result<DeviceKind, String> {
    text.parse().map_err(reason)
}

/// Parses a non-negative number of seconds, e.g. `0.5` (a clap value parser).
pub fn seconds(text: &str) -> std::result::Result<Duration, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("`{text}` is not a number of seconds"))
}

/// Parses a number of seconds above 0, e.g. `0.5` (a clap value parser).
pub fn positive_seconds(text: &str) -> std::result::Result<Duration, String> {
    match seconds(text)? {
        d if d.is_zero() => Err("must be more than 0 seconds (e.g. 0.5)".into()),
        d => Ok(d),
    }
}

/// Parses `K/N`, shard K (from 0) of N (a clap value parser).
pub fn shard(text: &str) -> std::result::Result<Shard, String> {
    Shard::parse(text).map_err(reason)
}

/// What computes a job (`--backend`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum BackendKind {
    /// The engine: placement, budgets, offloading, on the `--device`.
    Engine,
    /// The f32 CPU oracle: no memory flags (and in `generate`, greedy, `--prompt` only).
    Reference,
    /// The old spelling of `--device wgpu`.
    #[value(hide = true)]
    Wgpu,
}

impl BackendKind {
    /// The engine's device: `device`, or WebGPU for the old `--backend wgpu` with
    /// `--device auto`.
    pub fn engine_device(backend: Option<Self>, device: DeviceKind) -> DeviceKind {
        match (backend, device) {
            (Some(Self::Wgpu), DeviceKind::Auto) => DeviceKind::Wgpu,
            (_, d) => d,
        }
    }
}

/// Where the engine computes and the memory it may use: the flags `score`, `generate` and the
/// generation benchmark share.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// The compute device: auto (a discrete or integrated GPU through WebGPU when there is
    /// one, else the native CPU device), cpu or wgpu.
    #[arg(long, value_name = "auto|cpu|wgpu", default_value = "auto", value_parser = device)]
    pub device: DeviceKind,
    /// GPU memory budget, e.g. 512MiB (an error on the CPU device, whose one memory is RAM).
    #[arg(long, value_name = "SIZE", value_parser = size, allow_hyphen_values = true)]
    pub gpu_mem: Option<u64>,
    /// CPU RAM budget, e.g. 2GiB (on the CPU device: all of its memory).
    #[arg(long, value_name = "SIZE", value_parser = size, allow_hyphen_values = true)]
    pub cpu_mem: Option<u64>,
    /// Directory for the disk tier's offload file (default: the system's temp directory).
    #[arg(long, value_name = "DIR")]
    pub offload_dir: Option<PathBuf>,
    /// A placement policy file (checked against the budgets) instead of the policy search.
    #[arg(long, value_name = "FILE.toml")]
    pub policy: Option<PathBuf>,
    /// Keep the KV cache in FlexGen's 4-bit groups (about 7x less memory and cache traffic
    /// than f32; the numbers move slightly). Also applies to a --policy file.
    #[arg(long)]
    pub compress_cache: bool,
    /// Keep the KV cache in f16 (half the memory and cache traffic of f32; values rounded to
    /// 11 significant bits), on either device. Also applies to a --policy file.
    #[arg(long, conflicts_with = "compress_cache")]
    pub f16_cache: bool,
    /// Keep the weights in FlexGen's 4-bit groups, requantized from the file's format. Also
    /// applies to a --policy file.
    #[arg(long)]
    pub compress_weight: bool,
}

impl DeviceArgs {
    /// The engine's flag that is given, if any: a budget, an offload directory, a policy or a
    /// compressed format.
    pub fn places_memory(&self) -> Option<&'static str> {
        [
            (self.gpu_mem.is_some(), "--gpu-mem"),
            (self.cpu_mem.is_some(), "--cpu-mem"),
            (self.offload_dir.is_some(), "--offload-dir"),
            (self.policy.is_some(), "--policy"),
            (self.compress_cache, "--compress-cache"),
            (self.f16_cache, "--f16-cache"),
            (self.compress_weight, "--compress-weight"),
        ]
        .into_iter()
        .find_map(|(set, flag)| set.then_some(flag))
    }

    /// The placement these flags ask for: the policy file's; with no budgets, everything in
    /// device memory for `rows` sequences; else the policy search's on `hardware` (the
    /// built-in profile when `None`) for the workload (`prompt_len`, `gen_len` tokens). The
    /// compress flags apply to each.
    pub fn placement(
        &self,
        rows: usize,
        prompt_len: usize,
        gen_len: usize,
        hardware: Option<HardwareProfile>,
    ) -> Result<Placement> {
        let compressed = |mut p: Policy| {
            p.compress_weight |= self.compress_weight;
            p.compress_cache |= self.compress_cache;
            p.f16_cache |= self.f16_cache;
            Placement::Policy(p)
        };
        Ok(match &self.policy {
            Some(path) => compressed(Policy::from_toml_file(path)?),
            None if self.gpu_mem.is_none() && self.cpu_mem.is_none() && hardware.is_none() => {
                compressed(Policy::all_on_gpu(rows.max(1)))
            }
            None => Placement::Search {
                hardware: match hardware {
                    Some(h) => h,
                    None => default_profile()?,
                },
                prompt_len,
                gen_len,
                compress_weight: self.compress_weight,
                compress_cache: self.compress_cache,
                f16_cache: self.f16_cache,
            },
        })
    }

    /// The disk tier's directory: `--offload-dir`, else the system's temp directory (the
    /// files there are named by process or by model and placement, so runs can share it).
    pub fn offload_dir(&self) -> PathBuf {
        self.offload_dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// Engine options for `placement` under these flags' device, budgets and offload
    /// directory.
    pub fn engine_options(&self, placement: Placement) -> EngineOptions {
        EngineOptions::new(placement)
            .gpu_budget(self.gpu_mem.unwrap_or(u64::MAX))
            .cpu_budget(self.cpu_mem.unwrap_or(u64::MAX))
            .offload_dir(self.offload_dir())
            .device(self.device)
    }
}

/// Resuming, sharding and reporting a JSONL job: the flags `score` and `generate` share.
#[derive(clap::Args, Debug, Clone)]
pub struct JobArgs {
    /// Continue an interrupted job: skip the records its output already answers, cut a torn
    /// last line, append the rest.
    #[arg(long)]
    pub resume: bool,
    /// Run every N-th record from the K-th (from 0). Without it, a Slurm job array's or a
    /// Kubernetes Indexed Job's environment names the shard.
    #[arg(long, value_name = "K/N", value_parser = shard)]
    pub shard: Option<Shard>,
    /// How many shards a Kubernetes Indexed Job has (its environment gives only the index).
    #[arg(long, value_name = "N", value_parser = positive, conflicts_with = "shard")]
    pub shards: Option<usize>,
    /// Seconds between progress lines when stderr is not a terminal (a terminal shows a bar).
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = positive_seconds)]
    pub progress_every: Duration,
}

/// The library's option names that its errors give, and the flags that set them here.
const OPTION_FLAGS: [(&str, &str); 4] = [
    ("EngineOptions::gpu_budget", "--gpu-mem"),
    ("EngineOptions::cpu_budget", "--cpu-mem"),
    ("EngineOptions::offload_dir", "--offload-dir"),
    ("ScoreOptions::window", "--window"),
];

/// An error as the command line tells it: the library names its options
/// (`EngineOptions::gpu_budget`), the user of this tool typed flags (`--gpu-mem`).
pub fn in_flags(e: &Error) -> String {
    OPTION_FLAGS
        .iter()
        .fold(e.to_string(), |text, (option, flag)| {
            text.replace(option, flag)
        })
}

/// The exit status of an example's `run()`: 0, or the error on stderr and status 2.
pub fn exit_status(result: Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", in_flags(&e));
            std::process::ExitCode::from(2)
        }
    }
}

/// The median of `v` (NaN when empty): benchmarks quote medians of several runs.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A JSONL job's input, opened for its run, and where its answers go.
pub struct JobInput {
    /// The input, from its start (read twice: stdin is held in memory).
    pub reader: Box<dyn std::io::Read>,
    /// This process's shard (the flag, else the scheduler's environment).
    pub shard: Option<crate::job::Shard>,
    /// Records of the shard already answered in the output (0 unless resuming).
    pub answered: usize,
    /// Records of the shard this run answers (the progress display's total).
    pub remaining: usize,
    /// The output file, locked (`None` for stdout).
    pub output: Option<JobOutput>,
    /// What the answers depend on, written beside the output when it is opened.
    pub meta: JobMeta,
}

/// Opens a JSONL job: refuses an `output` that is the input or the model (through links),
/// locks it (one job per output), opens `input` (`-`: stdin), checks its ids are unique (an
/// error before any work), finds this process's shard (`--shard`, else Slurm's or Kubernetes'
/// environment, `--shards` giving an Indexed Job's count) and, with `--resume`, checks that
/// the output was made by the same work (`meta`: the job's kind and its answer-changing
/// flags; the input's and model's fingerprints are added here) and how many of its records
/// it answers already (cutting a torn last line).
pub fn open_job_input(
    input: &str,
    output: &str,
    flags: &JobArgs,
    model: &std::path::Path,
    mut meta: JobMeta,
) -> Result<JobInput> {
    use crate::job::{fingerprint_bytes, fingerprint_file, refuse_overwriting_inputs};
    use crate::job::{read_ids, resume_point};
    use std::io::Read;
    if flags.resume && output == "-" {
        return Err(Error::invalid("--resume", "needs --output to be a file"));
    }
    let job_output = if output == "-" {
        None
    } else {
        let mut inputs = vec![("the model", model)];
        if input != "-" {
            inputs.push(("the input", input.as_ref()));
        }
        refuse_overwriting_inputs("--output", output.as_ref(), &inputs)?;
        Some(JobOutput::prepare(output.as_ref(), flags.resume)?)
    };
    let (ids, reader, fingerprint): (_, Box<dyn Read>, _) = if input == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io("<stdin>", e))?;
        let ids = read_ids(bytes.as_slice(), "<stdin>")?;
        let fingerprint = fingerprint_bytes(&bytes);
        (ids, Box::new(std::io::Cursor::new(bytes)), fingerprint)
    } else {
        let open = || std::fs::File::open(input).map_err(|e| Error::io(input, e));
        (
            read_ids(std::io::BufReader::new(open()?), input)?,
            Box::new(open()?),
            fingerprint_file(input.as_ref())?,
        )
    };
    meta.input = fingerprint;
    meta.model = crate::model::fingerprint(model)?;
    let shard = match flags.shard {
        Some(s) => Some(s),
        None => Shard::from_env(|v| std::env::var(v).ok(), flags.shards)?,
    };
    if let Some(s) = shard {
        meta.flags
            .insert("--shard".into(), format!("{}/{}", s.index, s.count));
    }
    let ids: Vec<_> = match shard {
        Some(s) => {
            eprintln!(
                "shard {} of {}: every {}th record from record {}",
                s.index, s.count, s.count, s.index
            );
            ids.into_iter()
                .enumerate()
                .filter(|(i, _)| s.takes(*i))
                .map(|(_, id)| id)
                .collect()
        }
        None => ids,
    };
    let answered = match (&job_output, flags.resume) {
        (Some(out), true) => {
            meta.check_resume(output.as_ref())?;
            let answered = resume_point(out.partial(), &ids)?;
            eprintln!(
                "resume: {answered} of {} records already answered in {output}",
                ids.len()
            );
            answered
        }
        _ => 0,
    };
    Ok(JobInput {
        reader,
        shard,
        answered,
        remaining: ids.len().saturating_sub(answered),
        output: job_output,
        meta,
    })
}

/// A job's output: stdout for `-`, else the locked output's partial file (created anew, or
/// appended to when resuming), after writing the job's meta file beside the output.
pub fn open_output(
    path: &str,
    output: Option<&JobOutput>,
    meta: &JobMeta,
    resume: bool,
) -> Result<Box<dyn std::io::Write>> {
    Ok(match output {
        None => Box::new(std::io::stdout()),
        Some(out) => {
            meta.write(path.as_ref())?;
            Box::new(out.open(resume)?)
        }
    })
}

/// A job's meta record before the input and model are fingerprinted: its kind and the flags
/// that change its answers (`(flag, value as given)`).
pub fn job_meta(job: &str, flags: &[(&str, String)]) -> JobMeta {
    JobMeta {
        job: job.to_string(),
        input: String::new(),
        model: String::new(),
        flags: flags
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

/// How a job that ran ends: the output renamed into place when the job finished (its
/// records answered, some perhaps with errors), else the error reported; the exit status:
/// 0, 3 when records failed, 128 + the signal's number when stopped by one (the answers so
/// far kept for `--resume`), 1 for an I/O error.
pub fn finish_job(result: Result<usize>, output: Option<JobOutput>) -> std::process::ExitCode {
    use std::process::ExitCode;
    match result {
        Ok(failed) => {
            if let Some(out) = output {
                if let Err(e) = out.finish() {
                    eprintln!("error: {}", in_flags(&e));
                    return ExitCode::from(1);
                }
            }
            if failed > 0 {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(Error::Interrupted { signal }) => {
            eprintln!(
                "stopped by signal {signal}: the answers so far are kept; continue with --resume"
            );
            ExitCode::from(crate::job::signal_exit_status(signal))
        }
        Err(e) => {
            eprintln!("error: {}", in_flags(&e));
            ExitCode::from(1)
        }
    }
}

/// A long job's progress on stderr: on a terminal a bar (records done of all, failures,
/// tokens/s, ETA), redrawn in place; otherwise (a log file, a batch scheduler) a plain line
/// every few seconds.
pub struct Progress {
    /// The bar, when drawing one.
    bar: Option<ProgressBar>,
    /// Records this run answers.
    total: usize,
    /// What is done to a record, in the plain lines ("scored", "generated").
    verb: &'static str,
    /// Time between plain lines.
    line_every: Duration,
}

/// One report of a job's progress.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    /// Records answered in this run (including failures).
    pub done: usize,
    /// Records answered with an error.
    pub failed: usize,
    /// Tokens run (scored, or generated).
    pub tokens: usize,
    /// Tokens per second of wall time.
    pub tokens_per_second: f64,
    /// Wall time so far.
    pub seconds: f64,
}

impl Progress {
    /// A bar when stderr is a terminal, else plain lines every `line_every`; `total` records
    /// to answer.
    pub fn new(total: usize, verb: &'static str, line_every: Duration) -> Self {
        let target = std::io::stderr()
            .is_terminal()
            .then(ProgressDrawTarget::stderr);
        Self::with_target(total, verb, line_every, target)
    }

    /// A bar drawn to `target`, or plain lines every `line_every` when `None`.
    pub fn with_target(
        total: usize,
        verb: &'static str,
        line_every: Duration,
        target: Option<ProgressDrawTarget>,
    ) -> Self {
        let bar = target.map(|target| {
            let bar = ProgressBar::with_draw_target(Some(total as u64), target);
            // the template is fixed: it parses
            if let Ok(style) = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {pos}/{len} records{msg}, ETA {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(", starting");
            // redraw twice a second, so that the clock and ETA move while a batch computes
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Self {
            bar,
            total,
            verb,
            line_every,
        }
    }

    /// How often the job should report: often for a bar (5 times a second), else the lines'
    /// interval.
    pub fn every(&self) -> Duration {
        match self.bar {
            Some(_) => Duration::from_millis(200),
            None => self.line_every,
        }
    }

    /// Shows `counts`: moves the bar, or prints a line.
    pub fn update(&self, counts: Counts) {
        match &self.bar {
            Some(bar) => {
                bar.set_message(Self::message(&counts));
                bar.set_position(counts.done as u64);
            }
            None => eprintln!("{}", self.line(&counts)),
        }
    }

    /// Draws the last counts and leaves the bar on screen (nothing more for plain lines: the
    /// job's summary follows).
    pub fn finish(&self, counts: Counts) {
        if let Some(bar) = &self.bar {
            bar.set_message(Self::message(&counts));
            bar.set_position(counts.done as u64);
            bar.abandon();
            // the bar stays on screen; what follows starts on a line of its own
            eprintln!();
        }
    }

    /// The bar's text after the record count: failures, when any, and the rate.
    fn message(c: &Counts) -> String {
        let failed = match c.failed {
            0 => String::new(),
            n => format!(" ({n} failed)"),
        };
        format!("{failed}, {:.1} tokens/s", c.tokens_per_second)
    }

    /// A plain progress line: records done of all, failures, tokens, rate and ETA (the time
    /// left at the rate so far: `seconds * (total - done) / done`).
    pub fn line(&self, c: &Counts) -> String {
        let eta = if c.done == 0 {
            "unknown".to_string()
        } else {
            let left = c.seconds * self.total.saturating_sub(c.done) as f64 / c.done as f64;
            format_duration(left)
        };
        format!(
            "{} {} of {} records ({} failed), {} tokens, {:.1} tokens/s, ETA {eta}",
            self.verb, c.done, self.total, c.failed, c.tokens, c.tokens_per_second
        )
    }
}

/// `seconds` as `1h02m03s`, `2m03s` or `3s`.
pub fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// Prints the engine's device and where the policy put the weights, cache and activations
/// (on the CPU device, whose one memory is RAM, as RAM and disk).
pub fn print_placement(engine: &crate::Engine) {
    use crate::format_size;
    let w = engine.weight_bytes();
    eprintln!("device: {}", engine.device());
    let p = engine.policy();
    let reused = if engine.reused_offload() {
        format!(
            " (offload file reused, checksums verified in {:.3} s)",
            engine.offload_check_seconds()
        )
    } else {
        String::new()
    };
    if engine.rewrote_damaged_offload() {
        eprintln!(
            "offload: the kept file for this model and placement was damaged (a checksum \
             failed): written anew"
        );
    }
    let overlap = if p.overlap { "" } else { ", overlap off" };
    if engine.on_host() {
        eprintln!(
            "policy: gbs {} x nb {}, weights {}/{} RAM/disk{reused}, cache {:.0}% RAM, \
             activations {:.0}% RAM{overlap}",
            p.gpu_batch_size,
            p.num_gpu_batches,
            format_size(w[0] + w[1]),
            format_size(w[2]),
            p.cache_gpu_percent + p.cache_cpu_percent,
            p.act_gpu_percent + p.act_cpu_percent,
        );
    } else {
        eprintln!(
            "policy: gbs {} x nb {}, weights {}/{}/{} GPU/CPU/disk{reused}, cache \
             {:.0}%/{:.0}% GPU/CPU, activations {:.0}%/{:.0}% GPU/CPU{overlap}",
            p.gpu_batch_size,
            p.num_gpu_batches,
            format_size(w[0]),
            format_size(w[1]),
            format_size(w[2]),
            p.cache_gpu_percent,
            p.cache_cpu_percent,
            p.act_gpu_percent,
            p.act_cpu_percent,
        );
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn errors_name_the_flags_that_set_the_options_they_name() {
        let e = Error::invalid(
            "EngineOptions::gpu_budget",
            "budget it with EngineOptions::cpu_budget; or EngineOptions::offload_dir",
        );
        let text = in_flags(&e);
        assert_eq!(
            text,
            "invalid --gpu-mem: budget it with --cpu-mem; or --offload-dir"
        );
    }

    use super::*;
    use clap::Parser;
    use indicatif::InMemoryTerm;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        job: JobArgs,
        #[arg(long, value_parser = positive)]
        count: Option<usize>,
    }

    fn parse(args: &[&str]) -> std::result::Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("cli").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags_parse_and_errors_name_the_flag() {
        let cli = parse(&["--cpu-mem", "1.5GiB", "--device", "cpu", "--shard", "2/4"]).unwrap();
        assert_eq!(cli.device.cpu_mem, Some(3 << 29));
        assert_eq!(cli.device.device, DeviceKind::Cpu);
        assert_eq!(cli.device.places_memory(), Some("--cpu-mem"));
        let shard = cli.job.shard.unwrap();
        assert_eq!(cli.job.progress_every, Duration::from_secs(2));
        assert_eq!((shard.index, shard.count), (2, 4));
        assert_eq!(parse(&[]).unwrap().device.device, DeviceKind::Auto);
        for (args, needles) in [
            (&["--gpu-mem", "lots"][..], &["--gpu-mem", "`lots`"][..]),
            (&["--device", "tpu"], &["--device", "auto, cpu or wgpu"]),
            (&["--shard", "4/4"], &["--shard"]),
            (&["--shard", "x"], &["--shard", "K/N"]),
            (&["--count", "0"], &["--count", "at least 1"]),
            (&["--count", "three"], &["--count", "`three`"]),
            (&["--progress-every=-1"], &["--progress-every", "`-1`"]),
            (
                &["--progress-every", "0"],
                &["--progress-every", "more than 0"],
            ),
            (
                &["--progress-every", "soon"],
                &["--progress-every", "`soon`"],
            ),
            (
                &["--shard", "0/2", "--shards", "2"],
                &["--shards", "--shard"],
            ),
            // a misspelled flag gets a suggestion
            (&["--cpu-meme", "1GiB"], &["--cpu-meme", "--cpu-mem"]),
        ] {
            let e = parse(args).unwrap_err();
            assert!(needles.iter().all(|n| e.contains(n)), "{args:?}: {e}");
        }
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn progress_lines_and_bar_show_records_rate_and_eta() {
        let lines = Progress::with_target(1000, "scored", Duration::from_secs(2), None);
        let counts = Counts {
            done: 250,
            failed: 2,
            tokens: 9000,
            tokens_per_second: 150.0,
            seconds: 60.0,
        };
        // 60 s for 250 records leaves 750 records: 180 s
        assert_eq!(
            lines.line(&counts),
            "scored 250 of 1000 records (2 failed), 9000 tokens, 150.0 tokens/s, ETA 3m00s"
        );
        assert!(lines.line(&Counts::default()).ends_with("ETA unknown"));
        assert_eq!(lines.every(), Duration::from_secs(2));
        assert_eq!(format_duration(3725.4), "1h02m05s");
        assert_eq!(format_duration(7.0), "7s");

        let term = InMemoryTerm::new(4, 100);
        let target = ProgressDrawTarget::term_like(Box::new(term.clone()));
        let bar = Progress::with_target(1000, "scored", Duration::ZERO, Some(target));
        assert!(bar.every() < Duration::from_secs(1));
        bar.finish(counts);
        let screen = term.contents();
        assert!(
            screen.contains("250/1000 records (2 failed), 150.0 tokens/s, ETA")
                && screen.contains("=>"),
            "{screen}"
        );
    }
}
