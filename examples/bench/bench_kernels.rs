//! A compute device's linear kernels, format by format, through the same `Device` calls the
//! executor makes, against two yardsticks timed in the same run: the device's own row copy
//! (bytes read + written per second) and ndarray's f32 `dot` on the CPU.
//!
//! ```text
//! cargo run --release --example bench_kernels -- [--device wgpu|cpu] [--runs 3]
//!     [--sizes 2048,4096] [--rows 1,8,64,512]
//! ```
//! For each `K = N` in `--sizes` and `M` in `--rows`: GFLOP/s of `y = x W^T` for weights in
//! f32, f16, Q8_0, Q4_0/Q4_1 (4-bit codes in groups of 32) and FlexGen 4-bit (groups of 64),
//! and the ratio to ndarray's f32 product; for `M = 1`, also the weight bytes read per second
//! and their share of the copy rate. Every call ends with `Device::wait`, so a GPU's queued
//! work is counted. (`bench_cpu_kernels` times the CPU device's kernels without the seam, over
//! rotating copies that keep the weights out of the caches.)

mod common;

use std::time::Instant;

use clap::Parser;
use common::{device, exit_status, median, positive, WEIGHT_FORMATS};
use ferrogen::calibrate::synthetic_weight;
use ferrogen::device::{CpuDevice, Device, DeviceKind};
use ferrogen::gpu::{GpuContext, WgpuDevice};
use ferrogen::{Error, Result};
use ndarray::Array2;

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

/// Deterministic values in [-1, 1).
fn values(len: usize, step: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * step) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn bench<D: Device>(dev: &D, runs: usize, sizes: &[usize], rows: &[usize]) -> Result<()> {
    println!("device: {}, runs: {runs} (medians)", dev.describe());
    // the device's row copy over 64 MiB: 2 x bytes (read + written) per second
    let (copy_rows, width) = (16 << 10, 1024);
    let (a, b) = (
        dev.upload(&values(copy_rows * width, 7), copy_rows, width)?,
        dev.zeros(copy_rows, width)?,
    );
    let copy_s = time(runs, || {
        dev.copy_rows(&a, 0..copy_rows, &b, 0)?;
        dev.wait()
    })?;
    drop((a, b));
    let copy_gbs = 2.0 * (copy_rows * width * 4) as f64 / copy_s / 1e9;
    println!("row copy: {copy_gbs:.1} GB/s (read + written)");
    println!();
    println!("| K = N | format | M | GFLOP/s | ndarray f32 GFLOP/s | vs ndarray | weight GB/s (M = 1: share of copy) |");
    println!("|---|---|---|---|---|---|---|");
    for &kn in sizes {
        let (n, k) = (kn, kn);
        let wa = Array2::from_shape_vec((n, k), values(n * k, 7919))
            .map_err(|e| Error::invalid("bench", e.to_string()))?;
        let mut ndarray_s = Vec::with_capacity(rows.len());
        for &m in rows {
            let xa = Array2::from_shape_vec((m, k), values(m * k, 31))
                .map_err(|e| Error::invalid("bench", e.to_string()))?;
            ndarray_s.push(time(runs, || {
                std::hint::black_box(xa.dot(&wa.t()));
                Ok(())
            })?);
        }
        drop(wa);
        for &(name, bits, group) in &WEIGHT_FORMATS {
            let (format, segments) = synthetic_weight(bits, group, n, k, 1);
            let bytes: usize = segments.iter().map(|s| s.len() * 4).sum();
            let buffers = segments
                .iter()
                .map(|s| {
                    let buffer = dev.buffer((s.len() * 4) as u64)?;
                    dev.write_buffer(&buffer, 0, bytemuck::cast_slice(s))?;
                    Ok(buffer)
                })
                .collect::<Result<Vec<_>>>()?;
            let part = [(dev.part(format, n, buffers)?, 0)];
            for (&m, &t_cpu) in rows.iter().zip(&ndarray_s) {
                let x = dev.upload(&values(m * k, 31), m, k)?;
                let s = time(runs, || {
                    dev.linear(&x, &part, n)?;
                    dev.wait()
                })?;
                let g = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
                let gbs = bytes as f64 / s / 1e9;
                let share = if m == 1 {
                    format!("{gbs:.1} ({:.0}%)", 100.0 * gbs / copy_gbs)
                } else {
                    format!("{gbs:.1}")
                };
                println!(
                    "| {kn} | {name} | {m} | {:.1} | {:.1} | {:.2} | {share} |",
                    g(s),
                    g(t_cpu),
                    t_cpu / s
                );
            }
        }
    }
    Ok(())
}

/// A device's kernels, format by format, against the CPU reference's.
#[derive(Parser, Debug)]
#[command(name = "bench_kernels")]
struct Cli {
    /// The device whose kernels are timed: wgpu or cpu.
    #[arg(long, value_name = "wgpu|cpu", default_value = "wgpu", value_parser = device)]
    device: DeviceKind,
    /// Timed runs per case (the median is quoted).
    #[arg(long, value_name = "N", default_value = "3", value_parser = positive)]
    runs: usize,
    /// Square weight sizes K = N, comma-separated.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_value = "2048,4096", value_parser = positive)]
    sizes: Vec<usize>,
    /// Input rows M, comma-separated.
    #[arg(long, value_name = "M,...", value_delimiter = ',', default_value = "1,8,64,512", value_parser = positive)]
    rows: Vec<usize>,
}

fn run(cli: Cli) -> Result<()> {
    let Cli {
        device,
        runs,
        sizes,
        rows,
    } = cli;
    match device {
        DeviceKind::Cpu => bench(&CpuDevice::new(0)?, runs, &sizes, &rows),
        DeviceKind::Wgpu => bench(&WgpuDevice::new(GpuContext::new()?)?, runs, &sizes, &rows),
        DeviceKind::Auto => Err(Error::invalid("--device", "name one: wgpu or cpu")),
    }
}

fn main() -> std::process::ExitCode {
    exit_status(run(Cli::parse()))
}
