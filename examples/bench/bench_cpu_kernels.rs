//! The CPU device's linear kernels, format by format, against two yardsticks timed in the same
//! run: a multi-threaded memcpy (bytes read + written per second) and faer's f32 GEMM (the
//! fastest of matrixmultiply, gemm and faer here; the device's own AVX-512 GEMM replaced it
//! where AVX-512 is available).
//!
//! ```text
//! cargo run --release --example bench_cpu_kernels -- [--runs 5] [--sizes 2048,4096]
//!     [--rows 1,8,64,512] [--threads 0]
//! ```
//! For each `K = N` and `M`: GFLOP/s of `y = x W^T` for weights in f32, f16, Q8_0, Q4_0/Q4_1
//! (4-bit codes in groups of 32, one kernel for both), FlexGen 4-bit (groups of 64), and GGUF
//! blocks kept as stored (Q4_K, Q5_K, Q6_K, IQ4_XS, Q5_0; sizes that are whole blocks). For
//! `M = 1` also the packed weight bytes read per second and their share of the memcpy rate;
//! for `M = 512` the share of faer's f32 GEMM's GFLOP/s at M = 512. The weights rotate through
//! enough copies (at least 2 GiB in all, four times the largest last-level cache this
//! project's machines report; `BENCH_ROTATE_MIB` sets it, 0 keeps one copy in the caches)
//! that every call reads them from memory, not from the caches. Each case first runs untimed for 200 ms.

mod common;

use std::time::Instant;

use clap::Parser;
use common::{exit_status, median, positive, WEIGHT_FORMATS};
use ferrogen::calibrate::{synthetic_blocks, synthetic_weight};
use ferrogen::internals::ggml::BlockFormat;
use ferrogen::internals::RowFormat;
use ferrogen::internals::{linear_into, WeightRows};
use ferrogen::{Error, Result};
use rayon::prelude::*;

/// How long each case runs its kernel untimed before the timed runs.
const WARM_UP: std::time::Duration = std::time::Duration::from_millis(200);

/// The CPU device's linear kernels, format by format, against a memcpy and the f32 GEMM.
#[derive(Parser, Debug)]
#[command(name = "bench_cpu_kernels")]
struct Cli {
    /// Timed runs per case (the median is quoted).
    #[arg(long, value_name = "N", default_value = "5", value_parser = positive)]
    runs: usize,
    /// Square weight sizes K = N, comma-separated.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_value = "2048,4096", value_parser = positive)]
    sizes: Vec<usize>,
    /// Input rows M, comma-separated.
    #[arg(long, value_name = "M,...", value_delimiter = ',', default_value = "1,8,64,512", value_parser = positive)]
    rows: Vec<usize>,
    /// Threads (0: all cores).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
}

fn run(cli: Cli) -> Result<()> {
    let Cli {
        runs,
        sizes,
        rows,
        threads,
    } = cli;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::invalid("--threads", e.to_string()))?;
    println!(
        "threads: {}, runs: {runs} (medians)",
        pool.current_num_threads()
    );

    // yardstick 1: memcpy of 1 GiB (twice the last-level cache) on all threads, bytes read +
    // written per second
    let len = 256 << 20;
    let src: Vec<f32> = (0..len).map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; len];
    let mut copy_rates = Vec::new();
    // the first copy also maps the destination's pages: untimed
    for r in 0..runs + 1 {
        let t = Instant::now();
        pool.install(|| {
            dst.par_chunks_mut(1 << 20)
                .zip(src.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s))
        });
        if r > 0 {
            copy_rates.push(2.0 * (len * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    let copy = median(copy_rates);
    drop((src, dst));
    println!("memcpy: {copy:.1} GB/s (read + written)");
    println!();
    println!("| K = N | format | M | GFLOP/s | weight GB/s | share of memcpy / of faer's GEMM |");
    println!("|---|---|---|---|---|---|");

    for &kn in &sizes {
        let (n, k) = (kn, kn);
        // yardstick 2: faer's f32 GEMM at M = 512 (y = x W^T, W in the caches' reuse)
        let gemm_at_512 = {
            use faer::{Accum, MatMut, MatRef, Par};
            let m = 512;
            let x = input(m, k);
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5) % 11) as f32 * 0.1 - 0.5)
                .collect();
            let mut y = vec![0.0f32; m * n];
            let s = timed(runs, |_| {
                let lhs = MatRef::from_row_major_slice(&x, m, k);
                let rhs = MatRef::from_row_major_slice(&w, n, k).transpose();
                let dst = MatMut::from_row_major_slice_mut(&mut y, m, n);
                pool.install(|| {
                    faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0, Par::rayon(0))
                });
            });
            let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
            println!("| {kn} | faer f32 GEMM (yardstick) | {m} | {gflops:.1} | | |");
            gflops
        };
        let pool_bytes: usize = std::env::var("BENCH_ROTATE_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2048)
            << 20;
        let copies = |bytes: usize| (pool_bytes / bytes).max(1);
        let yardsticks = (copy, gemm_at_512);
        for &(name, bits, group) in &WEIGHT_FORMATS {
            let (format, _) = synthetic_weight(bits, group, 1, k, 0);
            let segments: Vec<Vec<Vec<u32>>> = (0..copies(n * format.row_bytes()))
                .map(|c| synthetic_weight(bits, group, n, k, c as u64 + 1).1)
                .collect();
            let case = Case { name, format, n };
            case.run(&pool, &segments, &rows, runs, yardsticks);
        }
        for &(name, block) in &BLOCK_FORMATS {
            let Some(block) = BlockFormat::from_ggml_type(block) else {
                continue;
            };
            if !k.is_multiple_of(block.block_len()) {
                continue;
            }
            let (format, _) = synthetic_blocks(block, 1, k, 0);
            let segments: Vec<Vec<Vec<u32>>> = (0..copies(n * format.row_bytes()))
                .map(|c| synthetic_blocks(block, n, k, c as u64 + 1).1)
                .collect();
            let case = Case { name, format, n };
            case.run(&pool, &segments, &rows, runs, yardsticks);
        }
    }
    Ok(())
}

/// GGUF block formats kept as stored, by ggml type id: the K-quants and IQ4 of the common
/// downloads (Q4_K_M, Q5_K_M, Q6_K, IQ4_XS mixes) and Q5_0, their fallback for rows that are
/// not whole super-blocks.
const BLOCK_FORMATS: [(&str, u32); 5] = [
    ("Q4_K", 12),
    ("Q5_K", 13),
    ("Q6_K", 14),
    ("IQ4_XS", 23),
    ("Q5_0", 6),
];

/// One weight layout at one size, timed at each `M`.
struct Case {
    name: &'static str,
    format: RowFormat,
    n: usize,
}

impl Case {
    /// Prints a table row per `M`: GFLOP/s, weight bytes per second, and the share of a
    /// yardstick (`copy` GB/s at M = 1, `gemm` GFLOP/s at M = 512).
    fn run(
        &self,
        pool: &rayon::ThreadPool,
        segments: &[Vec<Vec<u32>>],
        rows: &[usize],
        runs: usize,
        (copy, gemm): (f64, f64),
    ) {
        let (n, k) = (self.n, self.format.k());
        let bytes = n * self.format.row_bytes();
        for &m in rows {
            let x = input(m, k);
            let mut y = vec![0.0f32; m * n];
            let s = timed(runs, |call| {
                let seg: Vec<&[u32]> = segments[call % segments.len()]
                    .iter()
                    .map(|s| s.as_slice())
                    .collect();
                let w = WeightRows::new(self.format, &seg);
                linear_into(pool, &w, &x, m, &mut y, n, 0);
            });
            std::hint::black_box(&y);
            let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
            let gbs = bytes as f64 / s / 1e9;
            let share = match m {
                1 => format!("{:.0}% of memcpy", 100.0 * gbs / copy),
                512 => format!("{:.0}% of faer's f32 GEMM", 100.0 * gflops / gemm),
                _ => String::new(),
            };
            println!(
                "| {k} | {} | {m} | {gflops:.1} | {gbs:.1} | {share} |",
                self.name
            );
        }
    }
}

/// `m` rows of `k` inputs, the same in every case.
fn input(m: usize, k: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6)
        .collect()
}

/// The median seconds of `runs` timed calls of `call` (given the call's index), after calls
/// for at least [`WARM_UP`] (on a VM an idle core's first milliseconds of work run slowly).
fn timed(runs: usize, mut call: impl FnMut(usize)) -> f64 {
    let warm = Instant::now();
    let (mut times, mut calls) = (Vec::new(), 0usize);
    while warm.elapsed() < WARM_UP || times.len() < runs {
        let t = Instant::now();
        call(calls);
        if warm.elapsed() >= WARM_UP {
            times.push(t.elapsed().as_secs_f64());
        }
        calls += 1;
    }
    median(times)
}

fn main() -> std::process::ExitCode {
    exit_status(run(Cli::parse()))
}
