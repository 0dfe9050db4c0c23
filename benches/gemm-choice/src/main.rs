//! Which GEMM crate the CPU device uses: `y [m, n] = x [m, k] · w [n, k]^T` (weights row-major,
//! as the CPU device holds a decoded panel) with matrixmultiply, gemm and faer, f32 and f16
//! weights, on all cores, medians of `--runs` calls. Also a memcpy of the f32 weight as the
//! bandwidth yardstick for m = 1.
//!
//! ```text
//! cargo run --release --manifest-path benches/gemm-choice/Cargo.toml -- [--runs 5]
//! ```

use std::time::Instant;

use faer::{Accum, MatMut, MatRef, Par};
use half::f16;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    println!("threads {threads}, runs {runs}; GFLOP/s (m = 1: also GB/s of weight bytes read)");
    println!("| m | k | n | matrixmultiply f32 | gemm f32 | faer f32 | gemm f16 | memcpy GB/s |");
    println!("|---|---|---|---|---|---|---|---|");
    let shapes: Vec<(usize, usize)> = match std::env::var("SHAPES").ok().as_deref() {
        Some("small") => vec![(576, 1536)],
        _ => vec![(576, 1536), (2048, 2048), (4096, 4096)],
    };
    for &(k, n) in &shapes {
        for m in [1usize, 8, 64, 512] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 11) as f32 * 0.1 - 0.5).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let mut y = vec![0.0f32; m * n];
            let mut yh = vec![f16::ZERO; m * n];
            let flops = 2.0 * (m * n * k) as f64;
            let rate = |s: f64| flops / s / 1e9;
            let mm = time(runs, || unsafe {
                matrixmultiply::sgemm(
                    m, k, n, 1.0, x.as_ptr(), k as isize, 1, w.as_ptr(), 1, k as isize, 0.0,
                    y.as_mut_ptr(), n as isize, 1,
                )
            });
            let par = gemm::Parallelism::Rayon(threads);
            // gemm's convention: dst = alpha dst + beta lhs rhs; column stride, row stride
            let ge = time(runs, || unsafe {
                gemm::gemm(
                    m, n, k, y.as_mut_ptr(), 1, n as isize, false, x.as_ptr(), 1, k as isize,
                    w.as_ptr(), k as isize, 1, 0.0f32, 1.0f32, false, false, false, par,
                )
            });
            let fa = time(runs, || {
                let lhs = MatRef::from_row_major_slice(&x, m, k);
                let rhs = MatRef::from_row_major_slice(&w, n, k).transpose();
                let dst = MatMut::from_row_major_slice_mut(&mut y, m, n);
                faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::rayon(threads));
            });
            let gh = time(runs, || unsafe {
                gemm::gemm(
                    m, n, k, yh.as_mut_ptr(), 1, n as isize, false, xh.as_ptr(), 1, k as isize,
                    wh.as_ptr(), k as isize, 1, f16::ZERO, f16::ONE, false, false, false, par,
                )
            });
            let mut dst = vec![0.0f32; n * k];
            let cp = time(runs, || dst.copy_from_slice(std::hint::black_box(&w)));
            let bw = |s: f64, bytes: usize| bytes as f64 / s / 1e9;
            if m == 1 {
                println!(
                    "| {m} | {k} | {n} | {:.1} ({:.1} GB/s) | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.1} |",
                    rate(mm), bw(mm, 4 * n * k), rate(ge), bw(ge, 4 * n * k), rate(fa),
                    bw(fa, 4 * n * k), rate(gh), bw(gh, 2 * n * k), bw(cp, 8 * n * k)
                );
            } else {
                println!(
                    "| {m} | {k} | {n} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    rate(mm), rate(ge), rate(fa), rate(gh), bw(cp, 8 * n * k)
                );
            }
        }
    }
}
