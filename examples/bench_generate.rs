//! Batch generation throughput on the engine: `--prompts` prompts of `--prompt-len` tokens
//! (back-to-back windows of `--text`), `--new-tokens` greedy tokens each, under memory
//! budgets (the policy search picks the placement, or `--policy` gives it).
//!
//! ```text
//! cargo run --release --example bench_generate -- --model PATH --text FILE
//!     [--prompts 256] [--prompt-len 64] [--new-tokens 64] [--device auto|cpu|wgpu]
//!     [--gpu-mem SIZE] [--cpu-mem SIZE] [--offload-dir DIR] [--keep-offload]
//!     [--policy FILE.toml]
//! ```
//! Prints the policy, the time to open the model (which writes the offload file unless an
//! earlier `--keep-offload` run left one to reuse), and for the generation: the prefill time
//! (from the executor's timeline: until each block's first decode step), the decode time,
//! generated tokens per second over decode alone and over the whole generation, the memory
//! peaks per tier and the process's peak RSS.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::{exit_status, required, Flags};
use ferrogen::device::DeviceKind;
use ferrogen::engine::{default_profile, Engine, EngineOptions, Placement};
use ferrogen::exec::trace::Track;
use ferrogen::model::ModelFiles;
use ferrogen::policy::Policy;
use ferrogen::{format_size, parse_size};
use ferrogen::{Error, Result};

/// The process's peak resident set (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// Seconds spent in prefill: per block, from its first operation to its first decode
/// compute (token index > 0), the blocks found as runs of spans in time order.
fn prefill_seconds(trace: &ferrogen::exec::Trace) -> f64 {
    let mut spans: Vec<_> = trace.spans.iter().collect();
    spans.sort_by(|a, b| a.start_us.total_cmp(&b.start_us));
    let token = |name: &str| -> Option<usize> {
        let at = name.find("i=")? + 2;
        name[at..].split([',', ')']).next()?.parse().ok()
    };
    let (mut total, mut block_start, mut in_prefill) = (0.0, None, false);
    for s in spans {
        let Some(t) = token(&s.name) else { continue };
        match (t, in_prefill) {
            (0, false) => {
                block_start = Some(s.start_us);
                in_prefill = true;
            }
            (t, true) if t > 0 && s.track == Track::Compute => {
                total += s.start_us - block_start.unwrap_or(s.start_us);
                in_prefill = false;
            }
            _ => {}
        }
    }
    total / 1e6
}

fn run() -> Result<()> {
    let (mut model, mut text, mut policy, mut offload_dir) = (None, None, None, None);
    let (mut prompts, mut prompt_len, mut new_tokens) = (256usize, 64usize, 64usize);
    let (mut gpu_mem, mut cpu_mem) = (None, None);
    let (mut device, mut keep) = (DeviceKind::Auto, false);
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(flags.value(&flag)?)),
            "--text" => text = Some(PathBuf::from(flags.value(&flag)?)),
            "--prompts" => prompts = flags.positive(&flag)?,
            "--prompt-len" => prompt_len = flags.positive(&flag)?,
            "--new-tokens" => new_tokens = flags.positive(&flag)?,
            "--device" => device = flags.value(&flag)?.parse()?,
            "--gpu-mem" => gpu_mem = Some(parse_size(&flags.value(&flag)?, &flag)?),
            "--cpu-mem" => cpu_mem = Some(parse_size(&flags.value(&flag)?, &flag)?),
            "--offload-dir" => offload_dir = Some(PathBuf::from(flags.value(&flag)?)),
            "--keep-offload" => keep = true,
            "--policy" => policy = Some(PathBuf::from(flags.value(&flag)?)),
            other => return Err(Error::invalid(other, "unknown flag (see the file's doc)")),
        }
    }
    let model = required(model, "--model")?;
    let text = required(text, "--text")?;
    let files = ModelFiles::open(&model)?;
    let content = std::fs::read_to_string(&text).map_err(|e| Error::io(&text, e))?;
    let ids = files.tokenizer()?.encode(&content)?;
    if ids.len() < prompts * prompt_len {
        return Err(Error::invalid(
            "--prompts",
            format!(
                "{} has {} tokens, fewer than the prompts need",
                text.display(),
                ids.len()
            ),
        ));
    }
    let batch: Vec<&[u32]> = ids.chunks(prompt_len).take(prompts).collect();
    let placement = match &policy {
        Some(path) => Placement::Policy(Policy::from_toml_file(path)?),
        None if gpu_mem.is_none() && cpu_mem.is_none() => {
            Placement::Policy(Policy::all_on_gpu(prompts))
        }
        None => Placement::Search {
            hardware: default_profile()?,
            prompt_len,
            gen_len: new_tokens + 1,
            compress_weight: false,
            compress_cache: false,
        },
    };
    let options = EngineOptions::new(placement)
        .gpu_budget(gpu_mem.unwrap_or(u64::MAX))
        .cpu_budget(cpu_mem.unwrap_or(u64::MAX))
        .offload_dir(offload_dir)
        .keep_offload(keep)
        .trace(true)
        .device(device);
    let t = Instant::now();
    let engine = Engine::open_with(files, options)?;
    let open_s = t.elapsed().as_secs_f64();
    let w = engine.weight_bytes();
    eprintln!("device: {}", engine.device());
    eprintln!("policy: {:?}", engine.policy());
    eprintln!(
        "opened in {open_s:.1} s (offload file {}), weights {}/{}/{} GPU/CPU/disk",
        if engine.reused_offload() {
            "reused"
        } else {
            "written"
        },
        format_size(w[0]),
        format_size(w[1]),
        format_size(w[2])
    );
    let t = Instant::now();
    let out = engine.generate(&batch, new_tokens, &[])?;
    let gen_s = t.elapsed().as_secs_f64();
    let generated: usize = out.iter().map(|r| r.tokens.len()).sum();
    let prefill_s = engine.trace().map_or(0.0, |t| prefill_seconds(&t));
    let decode_s = gen_s - prefill_s;
    let peaks = engine.peaks();
    println!(
        "{prompts} prompts x {prompt_len} tokens, {new_tokens} new: generation {gen_s:.1} s \
         (prefill {prefill_s:.1} s, decode {decode_s:.1} s); generated tokens/s: {:.2} over \
         decode, {:.2} over the whole generation; prompt tokens/s in prefill {:.1}; open \
         {open_s:.1} s",
        prompts as f64 * (new_tokens - 1) as f64 / decode_s.max(1e-9),
        generated as f64 / gen_s,
        (prompts * prompt_len) as f64 / prefill_s.max(1e-9),
    );
    println!(
        "peaks: GPU {}, CPU {}, disk {}; peak RSS {}",
        format_size(peaks[0]),
        format_size(peaks[1]),
        format_size(peaks[2]),
        peak_rss().map_or("?".into(), format_size)
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    exit_status(run())
}
