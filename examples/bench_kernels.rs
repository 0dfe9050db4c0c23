//! Matrix-product kernels on the WebGPU device against ndarray on the CPU, in the same run.
//!
//! ```text
//! cargo run --release --example bench_kernels -- [--runs 3] [--sizes 2048,4096] [--rows 1,8,64,512]
//! ```
//! For each `K = N` in `--sizes` and `M` in `--rows`: GFLOP/s of the f32 kernel, of the 4-bit
//! kernel (FlexGen groups), and of ndarray's f32 `dot`; for `M = 1`, also the weight bandwidth
//! the product reaches next to a plain copy kernel's (bytes read + written per second).

use std::time::Instant;

use ferrogen::cli::Flags;
use ferrogen::gpu::kernels::elementwise::{Elementwise, Op};
use ferrogen::gpu::kernels::matmul::MatmulF32;
use ferrogen::gpu::kernels::matmul_q::{GpuPackedWeight, MatmulQ, PackedWeight};
use ferrogen::gpu::{GpuContext, GpuTensor};
use ferrogen::quant::group4::Group4;
use ferrogen::{Error, Result};
use ndarray::Array2;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn list(text: &str, flag: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| Error::invalid(flag, format!("`{s}` is not a number")))
        })
        .collect()
}

/// Median seconds of `runs` timed calls of `f` (after one warm-up call).
fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn run() -> Result<()> {
    let (mut runs, mut sizes, mut rows) = (3, vec![2048, 4096], vec![1, 8, 64, 512]);
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--runs" => runs = flags.positive(&flag)?,
            "--sizes" => sizes = list(&flags.value(&flag)?, &flag)?,
            "--rows" => rows = list(&flags.value(&flag)?, &flag)?,
            other => return Err(Error::invalid(other, "unknown flag")),
        }
    }
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.describe());
    let (f32_kernel, q_kernel, ew) = (
        MatmulF32::new(&ctx),
        MatmulQ::new(&ctx),
        Elementwise::new(&ctx)?,
    );

    // copy bandwidth over 64 MiB: 2 x bytes (read + write) per second
    let n = 16 << 20;
    let (a, b) = (GpuTensor::zeros(&ctx, &[n])?, GpuTensor::zeros(&ctx, &[n])?);
    let copy_s = time(runs, || {
        ew.binary(&ctx, Op::Copy, &a, &b)?;
        ctx.wait()
    })?;
    let copy_gbs = 2.0 * (n * 4) as f64 / copy_s / 1e9;
    println!("copy kernel: {copy_gbs:.1} GB/s (read + write)");
    println!("| K = N | M | f32 kernel GFLOP/s | 4-bit kernel GFLOP/s | ndarray f32 GFLOP/s | f32 / ndarray | 4-bit / ndarray |");
    println!("|---|---|---|---|---|---|---|");
    for &kn in &sizes {
        let w: Vec<f32> = (0..kn * kn)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let wt = GpuTensor::upload(&ctx, &w, &[kn, kn])?;
        let packed = PackedWeight::from_group4(&Group4::quantize(&w, &[kn, kn], 1, 64)?)?;
        let packed_bytes = packed.stored_bytes();
        let wq = GpuPackedWeight::upload(&ctx, packed)?;
        let wa = Array2::from_shape_vec((kn, kn), w)
            .map_err(|e| Error::invalid("bench", e.to_string()))?;
        for &m in &rows {
            let xv: Vec<f32> = (0..m * kn)
                .map(|i| ((i * 31) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let x = GpuTensor::upload(&ctx, &xv, &[m, kn])?;
            let y = GpuTensor::zeros(&ctx, &[m, kn])?;
            let flops = 2.0 * (m * kn * kn) as f64;
            let t_f32 = time(runs, || {
                f32_kernel.run(&ctx, &x, &wt, &y, 0)?;
                ctx.wait()
            })?;
            let t_q = time(runs, || {
                q_kernel.run(&ctx, &x, &wq, &y, 0)?;
                ctx.wait()
            })?;
            let xa = Array2::from_shape_vec((m, kn), xv)
                .map_err(|e| Error::invalid("bench", e.to_string()))?;
            let t_cpu = time(runs, || {
                std::hint::black_box(xa.dot(&wa.t()));
                Ok(())
            })?;
            let g = |t: f64| flops / t / 1e9;
            println!(
                "| {kn} | {m} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
                g(t_f32),
                g(t_q),
                g(t_cpu),
                t_cpu / t_f32,
                t_cpu / t_q
            );
            if m == 1 {
                let bw = |bytes: usize, t: f64| bytes as f64 / t / 1e9;
                println!(
                    "|  | matvec weight bandwidth: f32 {:.1} GB/s ({:.0}% of copy), 4-bit {:.1} GB/s ({:.0}% of copy) | | | | | |",
                    bw(kn * kn * 4, t_f32),
                    100.0 * bw(kn * kn * 4, t_f32) / copy_gbs,
                    bw(packed_bytes, t_q),
                    100.0 * bw(packed_bytes, t_q) / copy_gbs
                );
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    ferrogen::cli::exit_status(run())
}
