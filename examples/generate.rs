//! Greedy generation on the engine (or the CPU reference), with memory budgets.
//!
//! ```text
//! cargo run --release --example generate -- --model PATH --prompt "The capital of France is"
//!     [--prompt "..." ...] [--max-new-tokens 16] [--backend engine|reference]
//!     [--device auto|cpu|wgpu] [--gpu-mem SIZE] [--cpu-mem SIZE] [--offload-dir DIR]
//!     [--policy FILE.toml]
//! ```
//! Several prompts run as one block. The engine runs on the device `--device` names (auto: a
//! discrete or integrated GPU through WebGPU when there is one, else the native CPU device,
//! whose one memory budget is `--cpu-mem`): with a policy file its placement, with budgets
//! alone the policy search's on the built-in profile, with neither everything in device
//! memory. `--backend reference` runs the f32 CPU oracle (`--backend wgpu`, the old spelling,
//! means `--device wgpu`). A continuation stops at the model's end-of-sequence token.

mod common;

use std::path::PathBuf;

use common::{required, Flags};
use ferrogen::cpu::ReferenceModel;
use ferrogen::device::DeviceKind;
use ferrogen::engine::{default_profile, Engine, EngineOptions, Placement};
use ferrogen::model::ModelFiles;
use ferrogen::parse_size;
use ferrogen::policy::Policy;
use ferrogen::{Error, Result};

fn run() -> Result<()> {
    let (mut model, mut prompts, mut max_new) = (None, Vec::new(), 16usize);
    let (mut backend, mut policy, mut offload_dir) = (None, None, None);
    let (mut gpu_mem, mut cpu_mem) = (None, None);
    let mut device = DeviceKind::Auto;
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(flags.value(&flag)?)),
            "--prompt" => prompts.push(flags.value(&flag)?),
            "--max-new-tokens" => max_new = flags.parse(&flag)?,
            "--backend" => backend = Some(flags.value(&flag)?),
            "--device" => device = flags.value(&flag)?.parse()?,
            "--policy" => policy = Some(PathBuf::from(flags.value(&flag)?)),
            "--offload-dir" => offload_dir = Some(PathBuf::from(flags.value(&flag)?)),
            "--gpu-mem" => gpu_mem = Some(parse_size(&flags.value(&flag)?, &flag)?),
            "--cpu-mem" => cpu_mem = Some(parse_size(&flags.value(&flag)?, &flag)?),
            other => return Err(Error::invalid(other, "unknown flag (see the file's doc)")),
        }
    }
    let model = required(model, "--model")?;
    if prompts.is_empty() {
        return Err(Error::invalid("--prompt", "give at least one"));
    }
    let files = ModelFiles::open(&model)?;
    let eos = files.config.eos_token_id();
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| files.tokenizer()?.encode(p))
        .collect::<Result<_>>()?;
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let memory =
        gpu_mem.is_some() || cpu_mem.is_some() || policy.is_some() || offload_dir.is_some();
    let decode = |files: &ModelFiles, outputs: Vec<Vec<u32>>| -> Result<Vec<String>> {
        let tokenizer = files.tokenizer()?;
        outputs.iter().map(|o| tokenizer.decode(o)).collect()
    };
    let texts: Vec<String> = match backend.as_deref() {
        Some("reference") | None if !memory => {
            let out = ReferenceModel::load(&files)?.generate_greedy(&refs, max_new, eos)?;
            decode(&files, out)?
        }
        Some("reference") => {
            return Err(Error::invalid(
                "--backend",
                "memory flags are the engine's: drop --backend reference",
            ))
        }
        Some("engine" | "wgpu") | None => {
            let placement = match &policy {
                Some(path) => Placement::Policy(Policy::from_toml_file(path)?),
                None if gpu_mem.is_none() && cpu_mem.is_none() => {
                    Placement::Policy(Policy::all_on_gpu(refs.len()))
                }
                None => Placement::Search {
                    hardware: default_profile()?,
                    prompt_len: refs.iter().map(|p| p.len()).max().unwrap_or(1),
                    gen_len: max_new + 1,
                    compress_weight: false,
                    compress_cache: false,
                },
            };
            let options = EngineOptions::new(placement)
                .gpu_budget(gpu_mem.unwrap_or(u64::MAX))
                .cpu_budget(cpu_mem.unwrap_or(u64::MAX))
                .offload_dir(offload_dir)
                .device(match (backend.as_deref(), device) {
                    (Some("wgpu"), DeviceKind::Auto) => DeviceKind::Wgpu,
                    (_, d) => d,
                });
            let engine = Engine::open_with(files, options)?;
            eprintln!("device: {}", engine.device());
            // stop after the end-of-sequence token, as the reference does
            let stop: Vec<u32> = eos.into_iter().collect();
            let out = engine
                .generate(&refs, max_new, &stop)?
                .into_iter()
                .map(|r| r.tokens)
                .collect();
            decode(engine.files(), out)?
        }
        Some(other) => {
            return Err(Error::invalid(
                "--backend",
                format!("`{other}` (engine or reference)"),
            ))
        }
    };
    for (prompt, text) in prompts.iter().zip(texts) {
        println!("{prompt}{text}");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    common::exit_status(run())
}
