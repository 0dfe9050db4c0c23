//! One long record on every path: tokens/s of scoring `1 x N` tokens of a text with the CPU
//! reference, the resident model on each device (`cpu`, `wgpu`) and the engine under memory
//! budgets on each device (`engine-cpu` with one RAM budget `--cpu-mem`, `engine` on WebGPU
//! with both; the policy search picks the placement), each path's worst per-token difference
//! from the first path, and the engine's memory peaks. Long records are where position bugs live and where a workspace that
//! grows with the record would break a budget.
//!
//! ```text
//! cargo run --release --example bench_long -- --model PATH --text FILE [--tokens 2048,8192]
//!     [--paths reference,cpu,wgpu,engine-cpu,engine] [--gpu-mem 96MiB] [--cpu-mem 128MiB]
//!     [--offload-dir DIR]
//! ```

mod common;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use common::{positive, size};
use ferrogen::arch::ModelFiles;
use ferrogen::device::{CpuDevice, DeviceKind};
use ferrogen::engine::{default_profile, Engine, EngineOptions, Placement};
use ferrogen::exec::GpuModel;
use ferrogen::exec::ResidentModel;
use ferrogen::gpu::GpuContext;
use ferrogen::reference::ReferenceModel;
use ferrogen::{Error, Result};

fn worst(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A way of scoring the record.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Path {
    /// The f32 CPU reference.
    Reference,
    /// The resident model on the CPU device.
    Cpu,
    /// The resident model on WebGPU.
    Wgpu,
    /// The engine on the CPU device, under `--cpu-mem`.
    EngineCpu,
    /// The engine on WebGPU, under `--gpu-mem` and `--cpu-mem`.
    Engine,
}

/// One long record on every path: tokens/s, differences and the engine's memory peaks.
#[derive(Parser, Debug)]
#[command(name = "bench_long")]
struct Cli {
    /// The model.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// The text whose first tokens make the record.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Record lengths, comma-separated.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_value = "2048,8192", value_parser = positive)]
    tokens: Vec<usize>,
    /// The paths to time, comma-separated (the first is the others' yardstick).
    #[arg(
        long,
        value_name = "PATH,...",
        value_delimiter = ',',
        default_value = "reference,cpu,wgpu,engine-cpu,engine"
    )]
    paths: Vec<Path>,
    /// The WebGPU engine's GPU memory budget.
    #[arg(long, value_name = "SIZE", default_value = "96MiB", value_parser = size)]
    gpu_mem: u64,
    /// The engines' CPU RAM budget.
    #[arg(long, value_name = "SIZE", default_value = "128MiB", value_parser = size)]
    cpu_mem: u64,
    /// Directory for the engines' offload file.
    #[arg(long, value_name = "DIR")]
    offload_dir: Option<PathBuf>,
}

fn run(cli: Cli) -> Result<()> {
    let Cli {
        model,
        text,
        tokens,
        paths,
        gpu_mem,
        cpu_mem,
        offload_dir: offload,
    } = cli;
    let files = ModelFiles::open(&model)?;
    let content = std::fs::read_to_string(&text).map_err(|e| Error::io(&text, e))?;
    let ids = files.tokenizer()?.encode(&content)?;
    let reference = ReferenceModel::load(&files)?;
    for &n in &tokens {
        if ids.len() < n {
            return Err(Error::invalid(
                "--tokens",
                format!("{} has only {} tokens", text.display(), ids.len()),
            ));
        }
        let record = &ids[..n];
        let mut want: Option<Vec<f32>> = None;
        for path in &paths {
            let (secs, got, extra) = match path {
                Path::Reference => {
                    let t = Instant::now();
                    let lp = reference.token_logprobs(&[record])?.remove(0);
                    (t.elapsed().as_secs_f64(), lp, String::new())
                }
                Path::Wgpu => {
                    let gpu = GpuModel::load(GpuContext::new()?, &files, Default::default())?;
                    let t = Instant::now();
                    let lp = gpu.token_logprobs(&[record])?.remove(0);
                    (t.elapsed().as_secs_f64(), lp, String::new())
                }
                Path::Cpu => {
                    let cpu = ResidentModel::new(CpuDevice::new(0)?, &files, Default::default())?;
                    let t = Instant::now();
                    let lp = cpu.token_logprobs(&[record])?.remove(0);
                    (t.elapsed().as_secs_f64(), lp, String::new())
                }
                Path::Engine | Path::EngineCpu => {
                    let on_cpu = *path == Path::EngineCpu;
                    let dir = offload.clone().unwrap_or_else(std::env::temp_dir);
                    let options = EngineOptions::new(Placement::Search {
                        hardware: default_profile()?,
                        prompt_len: 256,
                        gen_len: 1,
                        compress_weight: false,
                        compress_cache: false,
                        f16_cache: false,
                    })
                    .gpu_budget(if on_cpu { u64::MAX } else { gpu_mem })
                    .cpu_budget(cpu_mem)
                    .offload_dir(dir)
                    .device(if on_cpu {
                        DeviceKind::Cpu
                    } else {
                        DeviceKind::Wgpu
                    });
                    let engine = Engine::open(&model, options)?;
                    let t = Instant::now();
                    let lp = engine.token_logprobs(&[record])?.remove(0);
                    let peaks = engine.peaks();
                    let mib = |b: u64| b as f64 / 1048576.0;
                    let extra = if on_cpu {
                        format!(
                            "; peak RAM {:.1} MiB of {:.0}; weights in RAM/disk {:?} B",
                            mib(peaks[1]),
                            mib(cpu_mem),
                            [
                                engine.weight_bytes()[0] + engine.weight_bytes()[1],
                                engine.weight_bytes()[2]
                            ]
                        )
                    } else {
                        format!(
                            "; peaks GPU {:.1} MiB of {:.0}, CPU {:.1} MiB of {:.0}; weights on \
                             GPU/CPU/disk {:?} B",
                            mib(peaks[0]),
                            mib(gpu_mem),
                            mib(peaks[1]),
                            mib(cpu_mem),
                            engine.weight_bytes()
                        )
                    };
                    (t.elapsed().as_secs_f64(), lp, extra)
                }
            };
            let ppl = (-got.iter().map(|&v| f64::from(v)).sum::<f64>() / got.len() as f64).exp();
            let diff = want.as_ref().map_or(0.0, |w| worst(&got, w));
            let path = path
                .to_possible_value()
                .map_or_else(String::new, |v| v.get_name().into());
            println!(
                "1 x {n} tokens, {path}: {secs:.1} s = {:.1} tokens/s, ppl {ppl:.4}, worst \
                 per-token diff from the first path {diff:.1e}{extra}",
                n as f64 / secs
            );
            want.get_or_insert(got);
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    common::exit_status(run(Cli::parse()))
}
