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

use clap::Parser;
use common::{exit_status, positive, DeviceArgs};
use ferrogen::arch::ModelFiles;
use ferrogen::engine::Engine;
use ferrogen::exec::trace::Track;
use ferrogen::format_size;
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

/// Batch generation throughput on the engine under memory budgets.
#[derive(Parser, Debug)]
#[command(name = "bench_generate")]
struct Cli {
    /// The model.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// The text cut into prompts (back-to-back windows).
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// How many prompts.
    #[arg(long, value_name = "N", default_value = "256", value_parser = positive)]
    prompts: usize,
    /// Tokens per prompt.
    #[arg(long, value_name = "N", default_value = "64", value_parser = positive)]
    prompt_len: usize,
    /// Greedy tokens generated per prompt.
    #[arg(long, value_name = "N", default_value = "64", value_parser = positive)]
    new_tokens: usize,
    #[command(flatten)]
    memory: DeviceArgs,
    /// Keep the offload file for a later run to reuse.
    #[arg(long)]
    keep_offload: bool,
    /// Write the generation's Chrome trace (open it in chrome://tracing or Perfetto) and
    /// print each track's busy seconds over decode.
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
}

fn run(cli: Cli) -> Result<()> {
    let Cli {
        model,
        text,
        prompts,
        prompt_len,
        new_tokens,
        memory,
        keep_offload,
        trace,
    } = cli;
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
    let placement = memory.placement(prompts, prompt_len, new_tokens + 1, None)?;
    let options = memory
        .engine_options(placement)
        .max_block_sequences(prompts)
        .keep_offload(keep_offload)
        .trace(true);
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
    if let (Some(path), Some(t)) = (trace, engine.trace()) {
        std::fs::write(&path, t.to_chrome_json()).map_err(|e| Error::io(&path, e))?;
        for track in Track::ALL {
            eprintln!("busy {:?}: {:.2} s", track, t.busy_seconds(track));
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    exit_status(run(Cli::parse()))
}
