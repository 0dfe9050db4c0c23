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

use clap::Parser;
use common::{median, positive};
use ferrogen::arch::ModelFiles;
use ferrogen::reference::ReferenceModel;
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

/// Scoring throughput of the CPU reference, with an f32 GEMM as the yardstick.
#[derive(Parser, Debug)]
#[command(name = "bench_reference")]
struct Cli {
    /// The model.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// The text whose first tokens are scored.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Tokens scored per run.
    #[arg(long, value_name = "N", default_value = "2048", value_parser = positive)]
    tokens: usize,
    /// Tokens per record.
    #[arg(long, value_name = "N", default_value = "512", value_parser = positive)]
    chunk: usize,
    /// Timed runs (the median is quoted).
    #[arg(long, value_name = "N", default_value = "5", value_parser = positive)]
    runs: usize,
}

fn run(cli: Cli) -> Result<()> {
    let Cli {
        model,
        text,
        tokens,
        chunk,
        runs,
    } = cli;
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
    common::exit_status(run(Cli::parse()))
}
