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

use common::{required, Flags};
use ferrogen::cpu::ReferenceModel;
use ferrogen::device::{CpuDevice, DeviceKind, ResidentModel};
use ferrogen::engine::{default_profile, Engine, EngineOptions, Placement};
use ferrogen::gpu::model::GpuModel;
use ferrogen::gpu::GpuContext;
use ferrogen::model::ModelFiles;
use ferrogen::parse_size;
use ferrogen::{Error, Result};

fn list(text: &str) -> Vec<String> {
    text.split(',').map(|s| s.trim().to_string()).collect()
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn run() -> Result<()> {
    let (mut model, mut text, mut offload) = (None, None, None);
    let mut tokens = vec![2048usize, 8192];
    let mut paths = list("reference,cpu,wgpu,engine-cpu,engine");
    let (mut gpu_mem, mut cpu_mem) = (96u64 << 20, 128u64 << 20);
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(flags.value(&flag)?)),
            "--text" => text = Some(PathBuf::from(flags.value(&flag)?)),
            "--offload-dir" => offload = Some(PathBuf::from(flags.value(&flag)?)),
            "--tokens" => {
                tokens = list(&flags.value(&flag)?)
                    .iter()
                    .map(|s| s.parse().map_err(|_| Error::invalid("--tokens", s.clone())))
                    .collect::<Result<_>>()?
            }
            "--paths" => paths = list(&flags.value(&flag)?),
            "--gpu-mem" => gpu_mem = parse_size(&flags.value(&flag)?, &flag)?,
            "--cpu-mem" => cpu_mem = parse_size(&flags.value(&flag)?, &flag)?,
            other => return Err(Error::invalid(other, "unknown flag")),
        }
    }
    let model = required(model, "--model")?;
    let text = required(text, "--text")?;
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
            let (secs, got, extra) = match path.as_str() {
                "reference" => {
                    let t = Instant::now();
                    let lp = reference.token_logprobs(&[record])?.remove(0);
                    (t.elapsed().as_secs_f64(), lp, String::new())
                }
                "wgpu" => {
                    let gpu = GpuModel::load(GpuContext::new()?, &files, Default::default())?;
                    let t = Instant::now();
                    let lp = gpu.token_logprobs(&[record])?.remove(0);
                    (t.elapsed().as_secs_f64(), lp, String::new())
                }
                "cpu" => {
                    let cpu = ResidentModel::new(CpuDevice::new(0)?, &files, Default::default())?;
                    let t = Instant::now();
                    let lp = cpu.token_logprobs(&[record])?.remove(0);
                    (t.elapsed().as_secs_f64(), lp, String::new())
                }
                "engine" | "engine-cpu" => {
                    let on_cpu = path == "engine-cpu";
                    let dir = offload.clone().unwrap_or_else(std::env::temp_dir);
                    let options = EngineOptions::new(Placement::Search {
                        hardware: default_profile()?,
                        prompt_len: 256,
                        gen_len: 1,
                        compress_weight: false,
                        compress_cache: false,
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
                other => return Err(Error::invalid("--paths", format!("unknown path {other}"))),
            };
            let ppl = (-got.iter().map(|&v| f64::from(v)).sum::<f64>() / got.len() as f64).exp();
            let diff = want.as_ref().map_or(0.0, |w| worst(&got, w));
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
    common::exit_status(run())
}
