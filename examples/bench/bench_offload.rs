//! Offloading benchmark: all weights on disk (read back with O_DIRECT, the page cache bypassed),
//! a block of `gbs x nb` sequences generating `gen_len` tokens, with overlap on and off.
//!
//! ```text
//! cargo run --release --example bench_offload -- (--model PATH | --config opt-1.3b [--seed N])
//!     [--gbs 1] [--nb 2] [--prompt-len 8] [--gen-len 4] [--compress-weight]
//!     [--offload-dir DIR] [--hardware PROFILE.toml] [--runs 2] [--overlap on|off|both]
//!     [--gpu-mem SIZE] [--cpu-mem SIZE] [--no-sep-layer] [--device auto|cpu|wgpu]
//!     [--cpu-threads N] [--trace FILE.json]
//! ```
//! `--trace` writes the last run's Chrome trace of each overlap mode (`FILE.json` with `on` or
//! `off` before the extension; open it in Perfetto).
//! On the CPU device (`--device cpu`) the budget is `--cpu-mem` alone, and the cost model's
//! prediction is the host device's (calibrated CPU kernel rates, no host-device copies).
//! Reports, per overlap mode, the median decode step (token 1 onwards) and the time per track,
//! the cost model's per-term prediction for the same policy beside the measured terms, the
//! overlap efficiency (the overlapped step over max(I/O alone, compute alone), both measured in
//! the overlap-off run), throughput, and the ledger's peaks and the process's peak resident
//! memory (VmHWM) against the budgets.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use common::{device, median, positive, size};
use ferrogen::arch::builtin::builtin_config;
use ferrogen::arch::random::RandomWeights;
use ferrogen::arch::ModelFiles;
use ferrogen::device::DeviceKind;
use ferrogen::engine::{default_profile, Engine, EngineOptions, Placement};
use ferrogen::exec::{Trace, Track};
use ferrogen::format_size;
use ferrogen::policy::{CostModel, HardwareProfile, Policy, Workload};
use ferrogen::{Error, Result};

/// Which overlap modes to run.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum Overlap {
    /// I/O overlapped with compute.
    On,
    /// I/O and compute one after the other.
    Off,
    /// On, then off.
    Both,
}

/// Offloading benchmark: all weights on disk, a block of `gbs x nb` sequences, overlap on
/// and off, against the cost model's prediction.
#[derive(Parser, Debug)]
#[command(name = "bench_offload")]
#[command(group = clap::ArgGroup::new("shape").required(true).args(["model", "config"]))]
struct Args {
    /// The model.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// A built-in shape with random weights instead of a file (e.g. opt-1.3b).
    #[arg(long, value_name = "NAME")]
    config: Option<String>,
    /// The random weights' seed (with --config).
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Sequences per GPU batch.
    #[arg(long, value_name = "N", default_value = "1", value_parser = positive)]
    gbs: usize,
    /// GPU batches per block.
    #[arg(long, value_name = "N", default_value = "2", value_parser = positive)]
    nb: usize,
    /// Prompt tokens per sequence.
    #[arg(long, value_name = "N", default_value = "8", value_parser = positive)]
    prompt_len: usize,
    /// Tokens generated per sequence (at least 2: decode steps are measured).
    #[arg(long, value_name = "N", default_value = "4", value_parser = positive)]
    gen_len: usize,
    /// FlexGen 4-bit weights.
    #[arg(long)]
    compress_weight: bool,
    /// Directory for the offload file.
    #[arg(long, value_name = "DIR", default_value_os_t = std::env::temp_dir().join("ferrogen-bench-offload"))]
    offload_dir: PathBuf,
    /// Hardware profile for the cost model's prediction (default: the built-in one).
    #[arg(long, value_name = "PROFILE.toml")]
    hardware: Option<PathBuf>,
    /// Timed runs per overlap mode.
    #[arg(long, value_name = "N", default_value = "2", value_parser = positive)]
    runs: usize,
    /// Overlap modes to run.
    #[arg(long, value_enum, default_value = "both")]
    overlap: Overlap,
    /// Write each mode's last run as a Chrome trace (`on`/`off` before the extension).
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// GPU memory budget (WebGPU).
    #[arg(long, value_name = "SIZE", value_parser = size)]
    gpu_mem: Option<u64>,
    /// CPU RAM budget.
    #[arg(long, value_name = "SIZE", value_parser = size)]
    cpu_mem: Option<u64>,
    /// Compute each layer whole instead of attention and MLP as separate units.
    #[arg(long)]
    no_sep_layer: bool,
    /// The compute device: auto, cpu or wgpu.
    #[arg(long, value_name = "auto|cpu|wgpu", default_value = "auto", value_parser = device)]
    device: DeviceKind,
    /// The CPU device's compute threads (0: one per core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    cpu_threads: usize,
}

fn parse() -> Result<Args> {
    let a = Args::parse();
    if a.gen_len < 2 {
        return Err(Error::invalid(
            "--gen-len",
            "at least 2 (decode steps are measured)",
        ));
    }
    Ok(a)
}

impl Args {
    /// The overlap modes to run, in order.
    fn overlap_modes(&self) -> Vec<bool> {
        match self.overlap {
            Overlap::On => vec![true],
            Overlap::Off => vec![false],
            Overlap::Both => vec![true, false],
        }
    }
}

fn open_files(a: &Args) -> Result<ModelFiles> {
    match (&a.model, &a.config) {
        (Some(path), _) => ModelFiles::open(path),
        (None, Some(name)) => {
            let config = builtin_config(name)
                .ok_or_else(|| Error::invalid("--config", format!("unknown shape `{name}`")))?;
            Ok(RandomWeights::model_files(&config, a.seed))
        }
        (None, None) => Err(Error::invalid("--model/--config", "give one of them")),
    }
}

/// The token index `i` of a span named like `compute(i=3, j=2, k=0)`.
fn token_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("i=")? + 2..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?]
        .parse()
        .ok()
}

/// The unit index `j` of a span name.
fn unit_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("j=")? + 2..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?]
        .parse()
        .ok()
}

/// Per decode token (1..gen_len): wall seconds of the step, and busy seconds per track over the
/// layer units only (`layers`: unit indices of the transformer layers).
struct StepTimes {
    step: Vec<f64>,
    load_weight_layers: Vec<f64>,
    compute_layers: Vec<f64>,
    load_weight_all: Vec<f64>,
    compute_all: Vec<f64>,
}

fn step_times(trace: &Trace, gen_len: usize, layers: std::ops::Range<usize>) -> StepTimes {
    let end_of = |t: usize| {
        trace
            .spans
            .iter()
            .filter(|s| token_of(&s.name) == Some(t))
            .map(|s| s.start_us + s.dur_us)
            .fold(0f64, f64::max)
    };
    let busy = |t: usize, track: Track, only_layers: bool| {
        trace
            .spans
            .iter()
            .filter(|s| s.track == track && token_of(&s.name) == Some(t))
            .filter(|s| !only_layers || unit_of(&s.name).is_some_and(|j| layers.contains(&j)))
            .map(|s| s.dur_us)
            .sum::<f64>()
            / 1e6
    };
    let tokens = 1..gen_len;
    StepTimes {
        step: tokens
            .clone()
            .map(|t| (end_of(t) - end_of(t - 1)) / 1e6)
            .collect(),
        load_weight_layers: tokens
            .clone()
            .map(|t| busy(t, Track::LoadWeight, true))
            .collect(),
        compute_layers: tokens
            .clone()
            .map(|t| busy(t, Track::Compute, true))
            .collect(),
        load_weight_all: tokens
            .clone()
            .map(|t| busy(t, Track::LoadWeight, false))
            .collect(),
        compute_all: tokens.map(|t| busy(t, Track::Compute, false)).collect(),
    }
}

fn vm_hwm() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn run() -> Result<()> {
    let a = parse()?;
    let (gpu_mem, cpu_mem) = (a.gpu_mem.unwrap_or(u64::MAX), a.cpu_mem.unwrap_or(u64::MAX));
    let hardware: HardwareProfile = match &a.hardware {
        Some(p) => HardwareProfile::from_toml_file(p)?,
        None => default_profile()?,
    };
    let probe = open_files(&a)?;
    let config = probe.config.clone();
    drop(probe);
    let layers = config.num_layers();
    let vocab = config.vocab_size() as u32;
    // prompts: seeded token ids, the same for every run
    let prompts: Vec<Vec<u32>> = (0..a.gbs * a.nb)
        .map(|s| {
            (0..a.prompt_len)
                .map(|i| ((s * 7919 + i * 104_729 + 13) as u32) % vocab)
                .collect()
        })
        .collect();
    let prompt_refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    println!(
        "model {} ({} layers, hidden {}), block {} x {} sequences, prompt {}, gen {}, weights {}, \
         100% of weights on disk in {}",
        a.model.as_ref().map_or_else(
            || a.config.clone().unwrap_or_default(),
            |p| p.display().to_string()
        ),
        layers,
        config.hidden_size(),
        a.gbs,
        a.nb,
        a.prompt_len,
        a.gen_len,
        if a.compress_weight {
            "4-bit groups"
        } else {
            "native"
        },
        a.offload_dir.display(),
    );
    let mut results: Vec<(bool, StepTimes, f64)> = Vec::new();
    let mut predicted = None;
    for overlap in a.overlap_modes() {
        let policy = Policy {
            gpu_batch_size: a.gbs,
            num_gpu_batches: a.nb,
            w_gpu_percent: 0.0,
            w_cpu_percent: 0.0,
            overlap,
            sep_layer: !a.no_sep_layer,
            compress_weight: a.compress_weight,
            ..Policy::all_on_gpu(a.gbs)
        };
        let format = if a.compress_weight {
            ferrogen::WeightFormat::Group4
        } else {
            ferrogen::WeightFormat::Native
        };
        // the weights' bytes as the executor streams them (GGUF blocks as stored)
        let bytes_per_value = ferrogen::engine::runtime_bytes_per_value(&open_files(&a)?, format)?;
        let on_cpu = a.device == DeviceKind::Cpu;
        let options = EngineOptions::new(Placement::Policy(policy.clone()))
            .gpu_budget(if on_cpu { u64::MAX } else { gpu_mem })
            .cpu_budget(cpu_mem)
            .offload_dir(a.offload_dir.clone())
            .keep_offload(true)
            .trace(true)
            .io_chunk_bytes(hardware.io_chunk_bytes)
            .io_threads(hardware.io_threads)
            .cpu_threads(a.cpu_threads)
            .device(a.device);
        let t = Instant::now();
        let engine = Engine::open_with(open_files(&a)?, options)?;
        eprintln!(
            "device {}; opened in {:.1} s (offload file {}), {} streamed per token",
            engine.device(),
            t.elapsed().as_secs_f64(),
            if engine.reused_offload() {
                "reused"
            } else {
                "written"
            },
            format_size(engine.streamed_bytes_per_token()),
        );
        let workload = Workload {
            prompt_len: a.prompt_len,
            gen_len: a.gen_len,
        };
        let prediction = if engine.on_host() {
            let hw = hardware.clone().for_host_device(bytes_per_value);
            CostModel::new(config.shape(), hw, workload)
                .with_weight_bytes(bytes_per_value)
                .with_activation_bytes(4.0)
                .on_host_device()
                .predict(&policy.clone().on_host())
        } else {
            CostModel::new(config.shape(), hardware.clone(), workload)
                .with_weight_bytes(bytes_per_value)
                .predict(&policy)
        };
        let mut steps = StepTimes {
            step: vec![],
            load_weight_layers: vec![],
            compute_layers: vec![],
            load_weight_all: vec![],
            compute_all: vec![],
        };
        let mut tok_s = Vec::new();
        for run in 0..a.runs {
            let before = engine.trace().map_or(0, |t| t.spans.len());
            let t = Instant::now();
            let out = engine.generate(&prompt_refs, a.gen_len, &[])?;
            let secs = t.elapsed().as_secs_f64();
            let generated: usize = out.iter().map(|r| r.tokens.len()).sum();
            tok_s.push(generated as f64 / secs);
            let mut trace = engine.trace().unwrap_or_default();
            trace.spans.drain(..before);
            if let (Some(path), true) = (&a.trace, run + 1 == a.runs) {
                let path = path.with_extension(if overlap { "on.json" } else { "off.json" });
                std::fs::write(&path, trace.to_chrome_json()).map_err(|e| Error::io(&path, e))?;
            }
            let layer_units = 1..1 + if !a.no_sep_layer { 2 * layers } else { layers };
            let s = step_times(&trace, a.gen_len, layer_units);
            eprintln!(
                "overlap {}: run {run}: {:.2} s, {:.2} tok/s, decode steps {:?} s",
                if overlap { "on" } else { "off" },
                secs,
                generated as f64 / secs,
                s.step
                    .iter()
                    .map(|x| (x * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>()
            );
            steps.step.extend(s.step);
            steps.load_weight_layers.extend(s.load_weight_layers);
            steps.compute_layers.extend(s.compute_layers);
            steps.load_weight_all.extend(s.load_weight_all);
            steps.compute_all.extend(s.compute_all);
        }
        let peaks = engine.peaks();
        println!(
            "overlap {:<3}: decode step median {:.3} s (weights load {:.3} s, compute {:.3} s busy; \
             layers only: load {:.3} s, compute {:.3} s); {:.2} tok/s median; ledger peaks GPU {} CPU {} disk {}",
            if overlap { "on" } else { "off" },
            median(steps.step.clone()),
            median(steps.load_weight_all.clone()),
            median(steps.compute_all.clone()),
            median(steps.load_weight_layers.clone()),
            median(steps.compute_layers.clone()),
            median(tok_s.clone()),
            format_size(peaks[0]),
            format_size(peaks[1]),
            format_size(peaks[2]),
        );
        results.push((overlap, steps, median(tok_s)));
        predicted.get_or_insert((overlap, prediction));
    }
    if let Some((overlap, p)) = predicted {
        let l = layers as f64;
        let d = p.decode;
        println!(
            "cost model, decode step of the {layers} layers and the head: ctog {:.3} s + dtoc {:.3} s \
             (weights I/O), comp {:.3} s, step {:.3} s (overlap {})",
            d.ctog * l,
            d.dtoc * l,
            d.comp * l,
            d.layer * l,
            if overlap { "on" } else { "off" }
        );
        if let Some((_, off, _)) = results.iter().find(|r| !r.0) {
            // the prediction spreads the output head over the layers: compare it with every
            // unit's time (the embedding's lookup is a small part of it)
            let (io, comp) = (
                median(off.load_weight_all.clone()),
                median(off.compute_all.clone()),
            );
            println!(
                "measured (overlap off), all units: weights I/O {io:.3} s, compute {comp:.3} s \
                 (the layers alone: {:.3} s, {:.3} s); predicted / measured: I/O {:.2}, \
                 compute {:.2}",
                median(off.load_weight_layers.clone()),
                median(off.compute_layers.clone()),
                d.dtoc * l / io,
                d.comp * l / comp
            );
        }
    }
    if let (Some((_, on, on_tps)), Some((_, off, off_tps))) =
        (results.iter().find(|r| r.0), results.iter().find(|r| !r.0))
    {
        let io = median(off.load_weight_all.clone());
        let comp = median(off.compute_all.clone());
        let step_on = median(on.step.clone());
        println!(
            "overlap efficiency: {:.3} s / max(I/O {:.3} s, compute {:.3} s) = {:.2} (goal <= 1.15); \
             overlap speedup {:.2}x ({:.2} vs {:.2} tok/s)",
            step_on,
            io,
            comp,
            step_on / io.max(comp),
            on_tps / off_tps,
            on_tps,
            off_tps
        );
    }
    let budget = |b: u64| {
        if b == u64::MAX {
            "unlimited".into()
        } else {
            format_size(b)
        }
    };
    println!(
        "peak resident memory (VmHWM) {} with budgets GPU {} + CPU {} (+200 MiB allowed)",
        vm_hwm().map_or("?".into(), format_size),
        budget(gpu_mem),
        budget(cpu_mem)
    );
    let _ = std::fs::remove_dir_all(&a.offload_dir);
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
