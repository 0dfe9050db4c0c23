//! Scoring throughput of the CPU reference, with ndarray's f32 GEMM timed in the same run as a
//! yardstick (this machine is shared and noisy: compare ratios, not raw figures across runs).
//!
//! ```text
//! cargo run --release --example bench_reference -- --model PATH --text FILE
//!     [--tokens 2048] [--chunk 512] [--runs 5]
//! ```
//! The text's first `--tokens` tokens are scored as records of `--chunk` tokens in one batch.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::{median, required, Flags};
use ferrogen::cpu::ReferenceModel;
use ferrogen::model::ModelFiles;
use ferrogen::{Error, Result};
use ndarray::Array2;

/// GFLOP/s of a `n x n` by `n x n` f32 product with ndarray.
fn gemm_gflops(n: usize) -> f64 {
    let a = Array2::from_shape_fn((n, n), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1);
    let b = Array2::from_shape_fn((n, n), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.1);
    let t = Instant::now();
    let c = a.dot(&b);
    let s = t.elapsed().as_secs_f64();
    std::hint::black_box(c);
    2.0 * (n as f64).powi(3) / s / 1e9
}

fn run() -> Result<()> {
    let (mut model, mut text) = (None, None);
    let (mut tokens, mut chunk, mut runs) = (2048usize, 512usize, 5usize);
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(flags.value(&flag)?)),
            "--text" => text = Some(PathBuf::from(flags.value(&flag)?)),
            "--tokens" => tokens = flags.positive(&flag)?,
            "--chunk" => chunk = flags.positive(&flag)?,
            "--runs" => runs = flags.positive(&flag)?,
            other => return Err(Error::invalid(other, "unknown flag")),
        }
    }
    let model = required(model, "--model")?;
    let text = required(text, "--text")?;
    let files = ModelFiles::open(&model)?;
    let t = Instant::now();
    let reference = ReferenceModel::load(&files)?;
    eprintln!(
        "loaded {} in {:.2} s",
        model.display(),
        t.elapsed().as_secs_f64()
    );
    let content = std::fs::read_to_string(&text).map_err(|e| Error::io(&text, e))?;
    let ids = files.tokenizer()?.encode(&content)?;
    if ids.len() < tokens {
        return Err(Error::invalid(
            "--tokens",
            format!("the text has only {} tokens", ids.len()),
        ));
    }
    let batch: Vec<&[u32]> = ids[..tokens].chunks(chunk).collect();

    let (mut model_rates, mut gemm_rates) = (Vec::new(), Vec::new());
    let mut ppl = 0.0;
    for run in 0..runs {
        gemm_rates.push(gemm_gflops(1024));
        let t = Instant::now();
        let lps = reference.token_logprobs(&batch)?;
        let secs = t.elapsed().as_secs_f64();
        model_rates.push(tokens as f64 / secs);
        let (sum, n) = lps
            .iter()
            .flatten()
            .fold((0.0, 0usize), |(s, n), &v| (s + f64::from(v), n + 1));
        ppl = (-sum / n as f64).exp();
        eprintln!(
            "run {run}: {:.1} tokens/s, ndarray 1024^3 GEMM {:.1} GFLOP/s",
            model_rates[run], gemm_rates[run]
        );
    }
    let (m, g) = (median(model_rates), median(gemm_rates));
    println!(
        "reference scoring, {tokens} tokens as {} x {chunk}: median {m:.1} tokens/s over {runs} runs; \
         ndarray GEMM yardstick {g:.1} GFLOP/s; ratio {:.2} tokens/s per GFLOP/s; ppl {ppl:.4}",
        batch.len(),
        m / g
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    common::exit_status(run())
}
