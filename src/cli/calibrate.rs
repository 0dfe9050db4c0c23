//! Measures this machine and writes a HardwareProfile (TOML) for the cost model.
//!
//! ```text
//! ferrogen calibrate [--offload-dir DIR] [--output FILE.toml]
//!     [--base PROFILE.toml] [--gpu-mem SIZE] [--cpu-mem SIZE] [--disk SIZE] [--quick]
//! ```
//! Disk reads use O_DIRECT on a scratch file in the offload directory (64 KiB to 8 MiB reads,
//! 1 to 8 threads; then weight loads as the executor issues them, in bursts of 256 KiB to
//! 16 MiB with the best reads and threads), then writes, memory copies, CPU matrix-product rates, and the CPU device's
//! own attention and linear kernels, weight format by weight format (the cost model's rates
//! when the engine computes on the CPU device).
//! GPU rows (upload, download, matmul and attention rates, memory bandwidth, 4-bit decode rate)
//! are measured on the WebGPU device; with `--base` they come from that profile instead, and
//! without any adapter from the CPU measurements. A real GPU needs `--gpu-mem` (wgpu does not
//! report memory sizes). Takes under 60 s.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::common::size;
use crate::calibrate::{
    available_memory_bytes, free_disk_bytes, measure_burst_reads, measure_cpu_device_attention,
    measure_cpu_layer_overhead, measure_cpu_linear, measure_disk_reads, measure_gpu,
    measure_matmul, measure_memcpy, write_scratch, write_text, GpuRates, Measured,
};
use crate::format_size;
use crate::gpu::{AdapterKind, GpuContext};
use crate::policy::hardware::BurstRead;
use crate::policy::hardware::GIB;
use crate::policy::{ByteSize, CpuLinear, DiskRead, HardwareProfile};
use crate::{Error, Result};
use clap::Parser;

/// Measures this machine and writes a hardware profile (TOML) for the cost model.
#[derive(Parser, Debug)]
#[command(name = "calibrate")]
pub(crate) struct Args {
    /// Directory for the disk measurements' scratch file.
    #[arg(long, value_name = "DIR", default_value_os_t = std::env::temp_dir())]
    offload_dir: PathBuf,
    /// Where the profile goes (`-`: stdout).
    #[arg(long, value_name = "FILE.toml", default_value = "-")]
    output: String,
    /// Take the GPU rows from this profile instead of measuring them.
    #[arg(long, value_name = "PROFILE.toml")]
    base: Option<PathBuf>,
    /// The GPU tier's capacity (required with a real GPU: wgpu does not report its memory;
    /// default on a CPU adapter: 25% of available RAM).
    #[arg(long, value_name = "SIZE", value_parser = size)]
    gpu_mem: Option<u64>,
    /// The CPU tier's capacity (default: 50% of available RAM).
    #[arg(long, value_name = "SIZE", value_parser = size)]
    cpu_mem: Option<u64>,
    /// The disk tier's capacity (default: 50% of the offload directory's free space).
    #[arg(long, value_name = "SIZE", value_parser = size)]
    disk: Option<u64>,
    /// Fewer trials and sizes.
    #[arg(long)]
    quick: bool,
}

/// The profile's notes, each also shown as it is measured.
struct Notes(Vec<String>);

impl Notes {
    fn line(&mut self, line: String) {
        eprintln!("{line}");
        self.0.push(line);
    }

    fn rate(&mut self, what: &str, m: &Measured, unit: &str) {
        self.line(format!("{what}: {m} {unit}"));
    }
}

/// The disk's rates: writes, reads by size and threads (the best of them), and weight loads
/// in bursts as the executor (staged reads) and the CPU device (one request) issue them.
struct DiskRates {
    write: Measured,
    reads: Vec<(DiskRead, Measured)>,
    best: DiskRead,
    bursts: Vec<(BurstRead, Measured)>,
    direct_bursts: Vec<(BurstRead, Measured)>,
}

fn measure_disk(dir: &Path, quick: bool, trials: usize, notes: &mut Notes) -> Result<DiskRates> {
    let file_size = if quick { 128u64 << 20 } else { 512 << 20 };
    let (scratch, write) = write_scratch(dir, file_size, trials)?;
    if !scratch.direct {
        eprintln!(
            "warning: {} refuses O_DIRECT; reads drop the page cache instead",
            dir.display()
        );
    }
    notes.rate("disk write, 4 MiB O_DIRECT", &write, "GiB/s");
    let chunks = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20];
    let threads = [1, 2, 4, 8];
    let reads = measure_disk_reads(&scratch, &chunks, &threads, file_size / 2, trials)?;
    for (row, m) in &reads {
        let what = format!(
            "disk read, {} x {} threads",
            format_size(row.chunk_bytes),
            row.threads
        );
        notes.rate(&what, m, "GiB/s");
    }
    let best = reads
        .iter()
        .max_by(|a, b| a.0.gib_s.total_cmp(&b.0.gib_s))
        .map(|(r, _)| *r)
        .ok_or_else(|| Error::invalid("calibrate", "no disk measurement"))?;
    let sizes = [256 << 10, 1 << 20, 4 << 20, 16 << 20];
    // weight loads as the executor issues them: a unit's weights at a time, in the best row's
    // reads and threads
    let (chunk, threads) = (best.chunk_bytes as usize, best.threads);
    let bursts = measure_burst_reads(&scratch, chunk, threads, &sizes, file_size / 4, trials)?;
    for (row, m) in &bursts {
        let what = format!(
            "disk weight loads, bursts of {} ({} reads x {} threads)",
            format_size(row.burst_bytes),
            format_size(best.chunk_bytes),
            best.threads
        );
        notes.rate(&what, m, "GiB/s");
    }
    // and as the CPU device loads them: each burst in one request, no staging
    let direct_bursts =
        measure_burst_reads(&scratch, usize::MAX / 2, 1, &sizes, file_size / 4, trials)?;
    for (row, m) in &direct_bursts {
        let what = format!(
            "disk weight loads, bursts of {} in one request",
            format_size(row.burst_bytes)
        );
        notes.rate(&what, m, "GiB/s");
    }
    Ok(DiskRates {
        write,
        reads,
        best,
        bursts,
        direct_bursts,
    })
}

/// The CPU's rates: memory copies, f32 matrix products, and the CPU device's attention,
/// per-layer cost and linear kernels format by format.
struct CpuRates {
    memcpy: Measured,
    matmul_prefill: Measured,
    matmul_decode: Measured,
    attention: Measured,
    layer_overhead: Measured,
    linear: Vec<CpuLinear>,
    /// A line per linear kernel (they join the notes last).
    linear_notes: Vec<String>,
}

fn measure_cpu(trials: usize, notes: &mut Notes) -> Result<CpuRates> {
    let memcpy = measure_memcpy(256 << 20, trials);
    notes.rate("memory copy", &memcpy, "GiB/s");
    let matmul_prefill = measure_matmul(512, 2048, 2048, trials);
    notes.rate("CPU f32 matmul 512x2048x2048", &matmul_prefill, "TFLOP/s");
    let matmul_decode = measure_matmul(8, 2048, 2048, trials);
    notes.rate("CPU f32 matmul 8x2048x2048", &matmul_decode, "TFLOP/s");
    let attention = measure_cpu_device_attention(32, 9, 64, 1024, trials);
    notes.rate(
        "CPU device decode attention, 32 sequences x 9 heads (GQA 3:1) x 64 over 1024",
        &attention,
        "TFLOP/s",
    );
    let layer_overhead = measure_cpu_layer_overhead(trials)?;
    let in_us = Measured {
        median: layer_overhead.median * 1e6,
        min: layer_overhead.min * 1e6,
        max: layer_overhead.max * 1e6,
    };
    notes.rate(
        "CPU device fixed cost of a layer for a GPU batch (tiny Llama, 12 rows)",
        &in_us,
        "us",
    );
    let (mut linear, mut linear_notes) = (Vec::new(), Vec::new());
    for (name, bits, group) in [
        ("f32", 32, 0),
        ("f16", 16, 64),
        ("Q8_0", 8, 32),
        ("Q4_0/Q4_1", 4, 32),
        ("FlexGen 4-bit", 4, 64),
    ] {
        let rate = measure_cpu_linear(bits, group, 0, trials)?;
        let line = format!(
            "CPU device linear, {name}: GEMM {:.3} TFLOP/s, panels decoded at {:.2} Gvalues/s \
             (from 64 and 512 x 2048 x 2048); few rows: {:.2} GiB/s of weights beyond {:.1} us \
             per call (1 x 256 and 1 x 4096), {:.1} rows per pass (8 x 4096)",
            rate.gemm_tflops,
            rate.panel_gvalues_s,
            rate.decode_gib_s,
            rate.call_s * 1e6,
            rate.rows_per_pass
        );
        eprintln!("{line}");
        linear_notes.push(line);
        linear.push(rate);
    }
    Ok(CpuRates {
        memcpy,
        matmul_prefill,
        matmul_decode,
        attention,
        layer_overhead,
        linear,
        linear_notes,
    })
}

/// The WebGPU device's rates (none with a base profile, or without an adapter).
fn measure_wgpu(
    base: bool,
    trials: usize,
    notes: &mut Notes,
) -> Result<Option<(GpuRates, AdapterKind)>> {
    if base {
        return Ok(None);
    }
    let ctx = match GpuContext::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("no WebGPU device ({e}): GPU rows will be the CPU measurements");
            return Ok(None);
        }
    };
    let g = measure_gpu(&ctx, trials)?;
    notes.rate("wgpu upload", &g.upload_gib_s, "GiB/s");
    notes.rate("wgpu download", &g.download_gib_s, "GiB/s");
    let rates = [
        ("wgpu f32 matmul 512x2048x2048", &g.matmul_prefill_tflops),
        ("wgpu f32 matmul 8x2048x2048", &g.matmul_decode_tflops),
        (
            "wgpu causal attention, 256 tokens, 8 x 64",
            &g.attention_prefill_tflops,
        ),
        (
            "wgpu decode attention, 32 x 8 x 64 over 1024",
            &g.attention_decode_tflops,
        ),
    ];
    for (what, m) in rates {
        notes.rate(what, m, "TFLOP/s");
    }
    notes.rate("wgpu copy kernel (read + write)", &g.memory_gib_s, "GiB/s");
    notes.rate(
        "wgpu 4-bit matvec decode",
        &g.dequant_gvalues_s,
        "Gvalues/s",
    );
    Ok(Some((g, ctx.kind())))
}

/// A profile's GPU rows (transfers, matrix products, attention, memory, 4-bit decoding) and
/// capacities, the CPU and disk rows left for [`run`] to fill.
struct GpuRows {
    upload: f64,
    download: f64,
    matmul: [f64; 2],
    attention: [f64; 2],
    memory_gib_s: f64,
    dequant_gvalues_s: f64,
    gpu_memory: u64,
}

fn gpu_profile(g: GpuRows, cpu_memory: u64, disk_space: u64) -> HardwareProfile {
    HardwareProfile {
        name: String::new(),
        cpu_to_gpu_gib_s: g.upload,
        gpu_to_cpu_gib_s: g.download,
        gpu_to_cpu_cache_gib_s: g.download,
        cpu_to_disk_gib_s: 0.0,
        cpu_to_disk_cache_gib_s: 0.0,
        disk_read: Vec::new(),
        disk_burst_read: Vec::new(),
        disk_direct_burst_read: Vec::new(),
        cpu_layer_overhead_s: 0.0,
        io_chunk_bytes: 0,
        io_threads: 0,
        gpu_matmul_tflops_prefill: g.matmul[0],
        gpu_matmul_tflops_decode: g.matmul[1],
        gpu_attention_tflops_prefill: g.attention[0],
        gpu_attention_tflops_decode: g.attention[1],
        cpu_attention_tflops: 0.0,
        cpu_matmul_tflops_prefill: 0.0,
        cpu_matmul_tflops_decode: 0.0,
        cpu_linear: Vec::new(),
        gpu_memory_gib_s: g.memory_gib_s,
        gpu_dequant_gvalues_s: g.dequant_gvalues_s,
        gpu_memory: ByteSize(g.gpu_memory),
        cpu_memory: ByteSize(cpu_memory),
        disk_space: ByteSize(disk_space),
        notes: Vec::new(),
    }
}

/// The profile's GPU rows and capacities: from `--base`, from the WebGPU device, or (without
/// one) from the CPU's own rates.
fn base_profile(
    cli: &Args,
    gpu: Option<(GpuRates, AdapterKind)>,
    cpu: &CpuRates,
    notes: &mut Notes,
) -> Result<HardwareProfile> {
    if let Some(path) = &cli.base {
        notes
            .0
            .push(format!("GPU rows and capacities from {}", path.display()));
        return HardwareProfile::from_toml_file(path);
    }
    let available = available_memory_bytes().unwrap_or(8 << 30);
    let free = free_disk_bytes(&cli.offload_dir).unwrap_or(16 << 30);
    let rows = match gpu {
        Some((g, kind)) => {
            let gpu_memory = match (cli.gpu_mem, kind) {
                (Some(v), _) => v,
                (None, AdapterKind::Cpu) => available / 4,
                (None, AdapterKind::Gpu) => {
                    return Err(Error::invalid(
                        "--gpu-mem",
                        "is required with a real GPU (wgpu does not report its memory size)",
                    ))
                }
            };
            notes.0.push(
                "capacities default to 25% (a CPU adapter's GPU tier) and 50% (CPU) of \
                 MemAvailable, 50% of free disk"
                    .into(),
            );
            GpuRows {
                upload: g.upload_gib_s.median,
                download: g.download_gib_s.median,
                matmul: [
                    g.matmul_prefill_tflops.median,
                    g.matmul_decode_tflops.median,
                ],
                attention: [
                    g.attention_prefill_tflops.median,
                    g.attention_decode_tflops.median,
                ],
                memory_gib_s: g.memory_gib_s.median / 2.0,
                dequant_gvalues_s: g.dequant_gvalues_s.median,
                gpu_memory,
            }
        }
        None => {
            notes.0.push(
                "no WebGPU device: GPU rows are the CPU measurements (as on lavapipe); \
                 capacities default to 25% (GPU) and 50% (CPU) of MemAvailable, 50% of free disk"
                    .into(),
            );
            let memcpy = cpu.memcpy.median;
            GpuRows {
                upload: memcpy,
                download: memcpy,
                matmul: [cpu.matmul_prefill.median, cpu.matmul_decode.median],
                attention: [cpu.matmul_prefill.median, cpu.attention.median],
                memory_gib_s: memcpy,
                // dequantizing reads ~0.56 and writes 2 bytes per value
                dequant_gvalues_s: memcpy * GIB / 2.6 / 1e9,
                gpu_memory: available / 4,
            }
        }
    };
    Ok(gpu_profile(rows, available / 2, free / 2))
}

fn run(cli: Args) -> Result<()> {
    check_writable(&cli.output)?;
    let started = Instant::now();
    let trials = if cli.quick { 2 } else { 3 };
    let mut notes = Notes(vec![format!(
        "measured by `calibrate` on {} cores; medians of {trials} trials, spreads in these notes",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )]);
    let disk = measure_disk(&cli.offload_dir, cli.quick, trials, &mut notes)?;
    let cpu = measure_cpu(trials, &mut notes)?;
    let gpu = measure_wgpu(cli.base.is_some(), trials, &mut notes)?;
    let mut profile = base_profile(&cli, gpu, &cpu, &mut notes)?;
    profile.name = format!("calibrated: {}", hostname());
    profile.cpu_to_disk_gib_s = disk.write.median;
    profile.cpu_to_disk_cache_gib_s = disk.write.median;
    profile.disk_read = disk.reads.iter().map(|(r, _)| *r).collect();
    profile.disk_burst_read = disk.bursts.iter().map(|(r, _)| *r).collect();
    profile.disk_direct_burst_read = disk.direct_bursts.iter().map(|(r, _)| *r).collect();
    profile.io_chunk_bytes = disk.best.chunk_bytes;
    profile.io_threads = disk.best.threads;
    profile.cpu_attention_tflops = cpu.attention.median;
    profile.cpu_matmul_tflops_prefill = cpu.matmul_prefill.median;
    profile.cpu_matmul_tflops_decode = cpu.matmul_decode.median;
    profile.cpu_linear = cpu.linear;
    profile.cpu_layer_overhead_s = cpu.layer_overhead.median;
    notes.0.extend(cpu.linear_notes);
    if let Some(v) = cli.gpu_mem {
        profile.gpu_memory = ByteSize(v);
    }
    if let Some(v) = cli.cpu_mem {
        profile.cpu_memory = ByteSize(v);
    }
    if let Some(v) = cli.disk {
        profile.disk_space = ByteSize(v);
    }
    notes
        .0
        .push(format!("took {:.1} s", started.elapsed().as_secs_f64()));
    profile.notes = notes.0;
    profile.validate(std::path::Path::new("<calibrated>"))?;
    write_text(&cli.output, &profile.to_toml())?;
    eprintln!("calibration took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Refuses an output the profile could not be written to (a directory, a missing or
/// read-only folder) before the measurements, not after them.
fn check_writable(output: &str) -> Result<()> {
    if output == "-" {
        return Ok(());
    }
    let path = std::path::Path::new(output);
    if path.is_dir() {
        return Err(crate::Error::invalid(
            "--output",
            format!("`{output}` is a directory: name a file such as {output}/profile.toml"),
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let probe = dir.join(format!(".ferrogen-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| {
        crate::Error::invalid(
            "--output",
            format!("cannot write in `{}`: {e}", dir.display()),
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map_or_else(|_| "this machine".into(), |h| h.trim().to_string())
}

pub(crate) fn main(args: Args) -> std::process::ExitCode {
    super::common::exit_status(run(args))
}
