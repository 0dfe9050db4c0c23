//! Measuring this machine for a [`HardwareProfile`](crate::policy::HardwareProfile): disk reads
//! with O_DIRECT by read size and thread count, disk writes, memory copies, and CPU
//! matrix-product and attention rates. It drives the devices, so it sits above them.
//!
//! Every figure is the median of several trials, reported with its spread (min-max), because
//! shared machines are noisy.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::layout::RowFormat;
use crate::policy::hardware::{BurstRead, CpuLinear, DiskRead, GIB};
use crate::quant::ggml::BlockFormat;
pub use crate::storage::direct::free_disk_bytes;
use crate::storage::direct::{drop_cache, open_direct, read_exact_at, write_all_at};
use crate::storage::offload::{AlignedBuf, ALIGN};

/// Median and spread of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Median.
    pub median: f64,
    /// Smallest trial.
    pub min: f64,
    /// Largest trial.
    pub max: f64,
}

impl Measured {
    /// Summarizes trials (at least one).
    pub fn of(mut trials: Vec<f64>) -> Self {
        trials.sort_by(f64::total_cmp);
        Self {
            median: trials[trials.len() / 2],
            min: trials[0],
            max: trials[trials.len() - 1],
        }
    }
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3} (spread {:.3}-{:.3})",
            self.median, self.min, self.max
        )
    }
}

/// A scratch file in the offload directory, removed on drop.
pub struct ScratchFile {
    path: PathBuf,
    /// Whether reads bypass the page cache (O_DIRECT accepted by the file system).
    pub direct: bool,
    len: u64,
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes a `len`-byte scratch file in `dir` in 4 MiB O_DIRECT writes (falling back to
/// buffered writes where the file system refuses O_DIRECT), `trials` times.
/// Returns the file and the write bandwidth in GiB/s.
pub fn write_scratch(dir: &Path, len: u64, trials: usize) -> Result<(ScratchFile, Measured)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(format!("ferrogen-calibrate-{}.bin", std::process::id()));
    let chunk = 4 << 20;
    let len = len.div_ceil(chunk as u64) * chunk as u64;
    let mut buf = AlignedBuf::new(chunk);
    for (i, b) in buf.bytes_mut().iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8; // incompressible enough
    }
    let mut direct = true;
    let mut rates = Vec::new();
    for _ in 0..trials.max(1) {
        let file = match open_direct(&path, true, true) {
            Ok(f) => f,
            Err(_) => {
                direct = false;
                File::create(&path).map_err(|e| Error::io(&path, e))?
            }
        };
        let t = Instant::now();
        let mut off = 0;
        while off < len {
            write_all_at(&file, buf.bytes(), off).map_err(|e| Error::io(&path, e))?;
            off += chunk as u64;
        }
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        rates.push(len as f64 / t.elapsed().as_secs_f64() / GIB);
    }
    let scratch = ScratchFile { path, direct, len };
    Ok((scratch, Measured::of(rates)))
}

/// Reads `len` bytes at every offset of `reads` from `file`, on `threads` scoped threads:
/// thread `i` takes reads `i`, `i + threads`, ... in order, each thread with its own aligned
/// buffer.
fn read_spread(
    scratch: &ScratchFile,
    file: &File,
    reads: &[u64],
    len: usize,
    threads: usize,
) -> Result<()> {
    let threads = threads.max(1);
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                s.spawn(move || -> Result<()> {
                    let mut buf = AlignedBuf::new(len);
                    for &at in reads.iter().skip(i).step_by(threads) {
                        read_exact_at(file, buf.bytes_mut(), at)
                            .map_err(|e| Error::io(&scratch.path, e))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| Error::invalid("calibrate", "a reader thread panicked"))??;
        }
        Ok(())
    })
}

/// The scratch file opened for reading (O_DIRECT when it was written so).
fn open_scratch(scratch: &ScratchFile) -> Result<File> {
    if scratch.direct {
        open_direct(&scratch.path, false, false)
    } else {
        File::open(&scratch.path)
    }
    .map_err(|e| Error::io(&scratch.path, e))
}

/// Reads `bytes` of the scratch file with `threads` threads issuing `chunk`-byte reads, each
/// thread its own contiguous region; returns GiB/s.
fn read_once(scratch: &ScratchFile, chunk: usize, threads: usize, bytes: u64) -> Result<f64> {
    let per_thread = (bytes / threads as u64) / chunk as u64 * chunk as u64;
    let region = (scratch.len / threads as u64) / chunk as u64 * chunk as u64;
    let per_thread = per_thread.min(region).max(chunk as u64);
    let file = open_scratch(scratch)?;
    if !scratch.direct {
        drop_cache(&file);
    }
    // thread i reads its region i * region.. in order: read k of thread i at position
    // k * threads + i
    let reads: Vec<u64> = (0..per_thread / chunk as u64)
        .flat_map(|k| (0..threads as u64).map(move |i| i * region + k * chunk as u64))
        .collect();
    let t = Instant::now();
    read_spread(scratch, &file, &reads, chunk, threads)?;
    Ok((per_thread * threads as u64) as f64 / t.elapsed().as_secs_f64() / GIB)
}

/// Disk -> CPU bandwidth for every read size and thread count, `trials` times each, reading
/// about `bytes` per trial. Returns the profile rows (medians) and the spreads.
pub fn measure_disk_reads(
    scratch: &ScratchFile,
    chunks: &[usize],
    threads: &[usize],
    bytes: u64,
    trials: usize,
) -> Result<Vec<(DiskRead, Measured)>> {
    let mut rows = Vec::new();
    for &chunk in chunks {
        for &t in threads {
            let trials: Vec<f64> = (0..trials.max(1))
                .map(|_| read_once(scratch, chunk, t, bytes))
                .collect::<Result<_>>()?;
            let m = Measured::of(trials);
            rows.push((
                DiskRead {
                    chunk_bytes: chunk as u64,
                    threads: t,
                    gib_s: m.median,
                },
                m,
            ));
        }
    }
    Ok(rows)
}

/// Disk -> CPU rate of weight loads, for each burst size in `bursts`: the scratch file is read
/// a burst at a time, on through the file and around (as the executor loads one unit's weights
/// after another, every step), with reader threads started for each burst and
/// `min(threads, reads)` of them taking reads of `chunk` bytes (or the whole burst when
/// smaller) in turn (one thread: the calling one, into a buffer kept across bursts, as the
/// CPU device reads a unit in one request into its weight slot); about `bytes` per trial. GiB/s over the bursts' time, the median of
/// `trials`.
pub fn measure_burst_reads(
    scratch: &ScratchFile,
    chunk: usize,
    threads: usize,
    bursts: &[usize],
    bytes: u64,
    trials: usize,
) -> Result<Vec<(BurstRead, Measured)>> {
    let file = open_scratch(scratch)?;
    let align = |n: usize| n.max(ALIGN).div_ceil(ALIGN) * ALIGN;
    // where the next burst starts: on through the file, across bursts and trials
    let mut at = 0u64;
    let mut once = |burst: usize| -> Result<f64> {
        let read_len = align(chunk).min(burst);
        let count = (bytes / burst as u64).max(1);
        // one thread reads into a buffer that stays, like the executor's weight slots
        let mut own = (threads <= 1).then(|| AlignedBuf::new(read_len));
        if !scratch.direct {
            drop_cache(&file);
        }
        let (mut busy, mut read) = (0.0, 0u64);
        for _ in 0..count {
            if at + burst as u64 > scratch.len {
                at = 0;
            }
            let reads: Vec<u64> = (0..burst.div_ceil(read_len))
                .map(|r| at + (r * read_len) as u64)
                .filter(|&off| off + read_len as u64 <= scratch.len)
                .collect();
            at += burst as u64;
            let n = threads.clamp(1, reads.len().max(1));
            read += (reads.len() * read_len) as u64;
            let t = Instant::now();
            match own.as_mut() {
                Some(buf) => {
                    for &off in &reads {
                        read_exact_at(&file, buf.bytes_mut(), off)
                            .map_err(|e| Error::io(&scratch.path, e))?;
                    }
                }
                None => read_spread(scratch, &file, &reads, read_len, n)?,
            }
            busy += t.elapsed().as_secs_f64();
        }
        Ok(read as f64 / busy.max(1e-9) / GIB)
    };
    let mut rows = Vec::new();
    for &burst in bursts {
        let burst = align(burst);
        let rates = (0..trials.max(1))
            .map(|_| once(burst))
            .collect::<Result<Vec<_>>>()?;
        let m = Measured::of(rates);
        rows.push((
            BurstRead {
                burst_bytes: burst as u64,
                gib_s: m.median,
            },
            m,
        ));
    }
    Ok(rows)
}

/// The CPU device's fixed cost of one transformer layer for a GPU batch: the time of its
/// dozen kernel calls (norms, projections, RoPE, attention, activation, residual adds) with
/// almost no data, which the cost model's byte and FLOP terms leave out. Measured on a tiny
/// random Llama (hidden 64) scoring 4 sequences of 3 tokens, as (T(9 layers) - T(1 layer)) / 8;
/// in seconds.
pub fn measure_cpu_layer_overhead(trials: usize) -> Result<Measured> {
    use crate::arch::random::RandomWeights;
    use crate::arch::LlamaConfig;
    use crate::arch::ModelConfig;
    use crate::device::CpuDevice;
    use crate::exec::ResidentModel;
    let config = |layers: usize| {
        ModelConfig::Llama(LlamaConfig {
            num_key_value_heads: Some(2),
            max_position_embeddings: 64,
            rms_norm_eps: 1e-5,
            ..LlamaConfig::new(64, 64, 128, layers, 4)
        })
    };
    let device = CpuDevice::new(0)?;
    let models = [1usize, 9]
        .map(|layers| {
            let files = RandomWeights::model_files(&config(layers), 7);
            ResidentModel::new(device.clone(), &files, Default::default())
        })
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let batch: Vec<&[u32]> = vec![&[1, 2, 3], &[4, 5, 6], &[7, 8, 9], &[10, 11, 12]];
    let time = |m: &ResidentModel<CpuDevice>| -> Result<f64> {
        // the least of a few runs: the fixed cost without the machine's hiccups
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            std::hint::black_box(m.token_logprobs(&batch)?);
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let per_layer = (0..trials.max(1))
        .map(|_| Ok(((time(&models[1])? - time(&models[0])?) / 8.0).max(0.0)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Measured::of(per_layer))
}

/// Memory-copy bandwidth in GiB/s (bytes copied per second) over a `bytes`-sized buffer.
pub fn measure_memcpy(bytes: usize, trials: usize) -> Measured {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let rates = (0..trials.max(1))
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            bytes as f64 / t.elapsed().as_secs_f64() / GIB
        })
        .collect();
    Measured::of(rates)
}

/// f32 matrix product `[m, k] x [k, n]` with ndarray, in TFLOP/s.
pub fn measure_matmul(m: usize, k: usize, n: usize, trials: usize) -> Measured {
    let a = Array2::from_shape_fn((m, k), |(i, j)| ((i + 3 * j) % 7) as f32 * 0.1);
    let b = Array2::from_shape_fn((k, n), |(i, j)| ((5 * i + j) % 11) as f32 * 0.1);
    let rates = (0..trials.max(1))
        .map(|_| {
            let t = Instant::now();
            let c = a.dot(&b);
            std::hint::black_box(c);
            2.0 * (m * k * n) as f64 / t.elapsed().as_secs_f64() / 1e12
        })
        .collect();
    Measured::of(rates)
}

/// A synthetic `[n, k]` linear weight in the run-time layout: `bits` of 32 is plain f32, else
/// packed codes of `bits` (4, 8 or 16) in groups of `group` with scales that keep values near
/// `[-1, 1]`; returns the layout and its segments. Seeded, so runs compare.
pub fn synthetic_weight(
    bits: u32,
    group: usize,
    n: usize,
    k: usize,
    seed: u64,
) -> (RowFormat, Vec<Vec<u32>>) {
    let mut random = xorshift(seed);
    let mut next = move || random() as u32;
    if bits == 32 {
        let v: Vec<f32> = (0..n * k)
            .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        return (
            RowFormat::F32 { k },
            vec![bytemuck::cast_slice(&v).to_vec()],
        );
    }
    let padded_k = k.div_ceil(group) * group;
    let words = n * padded_k * bits as usize / 32;
    let half = |v: f32| u32::from(half::f16::from_f32(v).to_bits());
    let codes: Vec<u32> = if bits == 16 {
        (0..words)
            .map(|_| {
                let mut h = || half((next() % 2000) as f32 / 1000.0 - 1.0);
                h() | (h() << 16)
            })
            .collect()
    } else {
        (0..words).map(|_| next()).collect()
    };
    let (step, min) = if bits == 16 {
        (1.0, 0.0)
    } else {
        (2.0 / ((1u32 << bits) - 1) as f32, -1.0)
    };
    let scales = vec![half(step) | (half(min) << 16); n * padded_k / group];
    let format = RowFormat::Packed {
        k,
        padded_k,
        group,
        bits,
    };
    (format, vec![codes, scales])
}

/// Marsaglia's xorshift64 from `seed` (made odd): cheap, seeded bits for synthetic weights.
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// A random `[n, k]` weight of GGUF blocks of `format` kept as stored (`k` whole blocks),
/// from `seed`: random codes and sub-block scales, small finite f16 super-scales. For
/// benchmarks, whose speed does not depend on the values.
pub fn synthetic_blocks(
    format: BlockFormat,
    n: usize,
    k: usize,
    seed: u64,
) -> (RowFormat, Vec<Vec<u32>>) {
    let mut random = xorshift(seed);
    let mut next = move || (random() >> 24) as u8;
    let bb = format.block_bytes();
    let mut bytes: Vec<u8> = (0..n * format.bytes_for(k)).map(|_| next()).collect();
    let scale = half::f16::from_f32(1.0 / 1024.0).to_le_bytes();
    for block in bytes.chunks_exact_mut(bb) {
        for &at in format.scale_offsets() {
            block[at..at + 2].copy_from_slice(&scale);
        }
    }
    let (row, segments) = crate::layout::rows::as_blocks(format, &bytes, n, k);
    (
        row,
        segments
            .iter()
            .map(|s| bytemuck::pod_collect_to_vec(s))
            .collect(),
    )
}

/// The CPU device's linear kernel for one weight layout (`bits`, `group` as in
/// [`synthetic_weight`]) on `threads` threads (0: all cores). K = N = 2048 at 64 and 512 rows
/// of `x` (both past the GEMM threshold) give the per-call panel decoding and the GEMM rate,
/// from `t(M) = V / panel rate + 2 M V / GEMM rate` (V weight values); K = N = 4096 at one
/// row, through enough copies that every call reads from memory, gives the decode bandwidth.
pub fn measure_cpu_linear(
    bits: u32,
    group: usize,
    threads: usize,
    trials: usize,
) -> Result<CpuLinear> {
    use crate::device::cpu::matmul::{linear_into, WeightRows};
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::invalid("calibrate", e.to_string()))?;
    let time = |format: RowFormat,
                copies: &[Vec<Vec<u32>>],
                m: usize,
                k: usize,
                n: usize,
                trials: usize| {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6)
            .collect();
        let mut y = vec![0.0f32; m * n];
        let mut secs = Vec::new();
        for t in 0..=trials.max(1) {
            let segs: Vec<&[u32]> = copies[t % copies.len()].iter().map(Vec::as_slice).collect();
            let w = WeightRows::new(format, &segs);
            let start = Instant::now();
            linear_into(&pool, &w, &x, m, &mut y, n, 0);
            if t > 0 {
                secs.push(start.elapsed().as_secs_f64());
            }
        }
        std::hint::black_box(&y);
        Measured::of(secs).median
    };
    let values = 2048.0 * 2048.0;
    let (format, w) = synthetic_weight(bits, group, 2048, 2048, 1);
    let w = [w];
    let (t64, t512) = (
        time(format, &w, 64, 2048, 2048, trials),
        time(format, &w, 512, 2048, 2048, trials),
    );
    // t512 - t64 = 2 (512 - 64) V / GEMM; the rest of t64 is the panel decoding (noise can
    // make it look negative: then it is taken as small)
    let gemm = 2.0 * 448.0 * values / (t512 - t64).max(t512 * 0.1);
    let panel = (t64 - 2.0 * 64.0 * values / gemm).max(t64 * 0.02);
    // the few-rows path from memory: weights rotate through enough copies to leave the
    // caches. t(n) = call + B(n) / bw at 1 row for n = 256 (almost all fixed cost) and 4096
    // gives the fixed cost and the bandwidth; 8 rows at 4096 gives the rows one pass serves,
    // rows_per_pass = 8 (B / bw) / (t8 - call)
    let few_rows = |n: usize, seed: u64| {
        let (format, first) = synthetic_weight(bits, group, n, n, seed);
        let bytes: usize = first.iter().map(|s| s.len() * 4).sum();
        let copies: Vec<Vec<Vec<u32>>> = std::iter::once(first)
            .chain(
                (1..(256usize << 20).div_ceil(bytes).min(64))
                    .map(|c| synthetic_weight(bits, group, n, n, seed + 1 + c as u64).1),
            )
            .collect();
        (format, copies, bytes as f64)
    };
    // few-rows calls take at most a few ms and a VM's hiccups are as long: medians of many
    let few_trials = 8 * trials.max(1);
    let (format, copies, small_bytes) = few_rows(256, 100);
    let t_small = time(format, &copies, 1, 256, 256, few_trials);
    drop(copies);
    let (format, copies, bytes) = few_rows(4096, 2);
    let (t1, t8) = (
        time(format, &copies, 1, 4096, 4096, few_trials),
        time(format, &copies, 8, 4096, 4096, few_trials),
    );
    // noise can put the small call above the slope's line or the slope below zero
    let per_byte = ((t1 - t_small) / (bytes - small_bytes)).max(0.5 * t1 / bytes);
    let call = (t_small - small_bytes * per_byte).max(0.0);
    let rows_per_pass = (8.0 * bytes * per_byte / (t8 - call).max(1e-9)).clamp(1.0, 8.0);
    Ok(CpuLinear {
        bytes_per_value: bytes / (4096.0 * 4096.0),
        gemm_tflops: gemm / 1e12,
        panel_gvalues_s: values / panel / 1e9,
        decode_gib_s: 1.0 / per_byte / GIB,
        call_s: call,
        rows_per_pass,
    })
}

/// The CPU device's attention (the kernel the CPU device and `cpu_cache_compute` run):
/// `sequences` decode queries of `heads` heads of `head_dim` (GQA 3:1) over `context` cached
/// f32 rows each, `4 * context * head_dim` FLOPs per query head; in TFLOP/s.
pub fn measure_cpu_device_attention(
    sequences: usize,
    heads: usize,
    head_dim: usize,
    context: usize,
    trials: usize,
) -> Measured {
    use crate::device::cpu::attention::{attend, KvView};
    use crate::device::RowInfo;
    use crate::layout::HeadLayout;
    let layout = HeadLayout {
        heads,
        kv_heads: (heads / 3).max(1),
        head_dim,
    };
    let width = layout.kv_heads * head_dim;
    let kv: Vec<f32> = (0..sequences * context * width)
        .map(|i| (i % 5) as f32 * 0.1)
        .collect();
    let q = vec![0.01f32; sequences * heads * head_dim];
    let infos: Vec<RowInfo> = (0..sequences)
        .map(|s| RowInfo::new((s * context) as u32, context as u32))
        .collect();
    let mut o = vec![0.0f32; q.len()];
    let view = KvView::F32 {
        k: &kv,
        v: &kv,
        width,
    };
    let flops = 4.0 * (sequences * heads * context * head_dim) as f64;
    let rates = (0..=trials.max(1))
        .map(|_| {
            let t = Instant::now();
            attend(&q, &infos, view, layout, None, &mut o);
            flops / t.elapsed().as_secs_f64() / 1e12
        })
        .skip(1)
        .collect();
    Measured::of(rates)
}

/// What the WebGPU device measures: transfers, kernel rates and memory bandwidth.
#[derive(Debug, Clone)]
pub struct GpuRates {
    /// Adapter description.
    pub adapter: String,
    /// Host -> device, GiB/s.
    pub upload_gib_s: Measured,
    /// Device -> host, GiB/s.
    pub download_gib_s: Measured,
    /// f32 matrix product 512 x 2048 x 2048, TFLOP/s.
    pub matmul_prefill_tflops: Measured,
    /// f32 matrix product 8 x 2048 x 2048, TFLOP/s.
    pub matmul_decode_tflops: Measured,
    /// Causal attention, one sequence of 256 tokens, 8 heads of 64, TFLOP/s.
    pub attention_prefill_tflops: Measured,
    /// Decode attention, 32 sequences x 8 heads of 64 over 1024 cached tokens, TFLOP/s.
    pub attention_decode_tflops: Measured,
    /// Copy kernel, GiB/s of bytes read + written.
    pub memory_gib_s: Measured,
    /// 4-bit matrix-vector 2048 x 2048: billions of weight values decoded per second.
    pub dequant_gvalues_s: Measured,
}

/// Measures the WebGPU device (`trials` timed runs each, after a warm-up).
pub fn measure_gpu(ctx: &crate::gpu::GpuContext, trials: usize) -> Result<GpuRates> {
    use crate::gpu::kernels::attention::{Attention, RowInfo};
    use crate::gpu::kernels::elementwise::{Elementwise, Op};
    use crate::gpu::kernels::matmul::MatmulF32;
    use crate::gpu::kernels::matmul_q::{GpuPackedWeight, MatmulQ, PackedWeight};
    use crate::gpu::GpuTensor;
    use crate::quant::group4::Group4;
    use crate::reference::ops::HeadLayout;

    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<Vec<f64>> {
        f()?;
        (0..trials.max(1))
            .map(|_| {
                let t = Instant::now();
                f()?;
                ctx.wait()?;
                Ok(t.elapsed().as_secs_f64())
            })
            .collect()
    };
    let rate =
        |work: f64, secs: Vec<f64>| Measured::of(secs.into_iter().map(|s| work / s).collect());

    let n = 16 << 20; // 64 MiB of f32
    let host = vec![1f32; n];
    let big = GpuTensor::zeros(ctx, &[n])?;
    let upload = timed(&mut || {
        ctx.queue
            .write_buffer(&big.buffer, 0, bytemuck::cast_slice(&host));
        ctx.queue.submit([]);
        Ok(())
    })?;
    let download = timed(&mut || big.download(ctx).map(|_| ()))?;
    let ew = Elementwise::new(ctx)?;
    let other = GpuTensor::zeros(ctx, &[n])?;
    let copy = timed(&mut || ew.binary(ctx, Op::Copy, &big, &other))?;

    let kn = 2048;
    let w: Vec<f32> = (0..kn * kn)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let wt = GpuTensor::upload(ctx, &w, &[kn, kn])?;
    let mm = MatmulF32::new(ctx);
    let matmul = |m: usize| -> Result<Measured> {
        let x = GpuTensor::zeros(ctx, &[m, kn])?;
        let y = GpuTensor::zeros(ctx, &[m, kn])?;
        let secs = timed(&mut || mm.run(ctx, &x, &wt, &y, 0))?;
        Ok(rate(2.0 * (m * kn * kn) as f64 / 1e12, secs))
    };
    let (mm_prefill, mm_decode) = (matmul(512)?, matmul(8)?);
    let q = GpuPackedWeight::upload(
        ctx,
        PackedWeight::from_group4(&Group4::quantize(&w, &[kn, kn], 1, 64)?)?,
    )?;
    let x1 = GpuTensor::zeros(ctx, &[1, kn])?;
    let y1 = GpuTensor::zeros(ctx, &[1, kn])?;
    let mq = MatmulQ::new(ctx);
    let dequant = rate(
        (kn * kn) as f64 / 1e9,
        timed(&mut || mq.run(ctx, &x1, &q, &y1, 0))?,
    );

    let attention = Attention::new(ctx, 64)?;
    let layout = HeadLayout {
        heads: 8,
        kv_heads: 8,
        head_dim: 64,
    };
    let attend = |rows: usize, infos: Vec<RowInfo>, cache_rows: usize| -> Result<Vec<f64>> {
        let q = GpuTensor::zeros(ctx, &[rows, 512])?;
        let k = GpuTensor::zeros(ctx, &[cache_rows, 512])?;
        let o = GpuTensor::zeros(ctx, &[rows, 512])?;
        let info = Attention::upload_info(ctx, &infos);
        timed(&mut || attention.run(ctx, &q, &k, &k, &info, &o, layout, 0.125))
    };
    // prefill: 256 tokens of one sequence, causal: sum over rows of (row + 1) keys
    let prefill_infos = (0..256).map(|r| RowInfo::new(0, r + 1)).collect();
    let prefill_flops = 4.0 * 64.0 * 8.0 * (256.0 * 257.0 / 2.0);
    let attn_prefill = rate(prefill_flops / 1e12, attend(256, prefill_infos, 256)?);
    // decode: 32 sequences, one new token each, 1024 cached tokens
    let decode_infos = (0..32).map(|s| RowInfo::new(s * 1024, 1024)).collect();
    let decode_flops = 4.0 * 64.0 * 8.0 * 1024.0 * 32.0;
    let attn_decode = rate(decode_flops / 1e12, attend(32, decode_infos, 32 * 1024)?);

    let bytes = (n * 4) as f64 / GIB;
    Ok(GpuRates {
        adapter: ctx.describe(),
        upload_gib_s: rate(bytes, upload),
        download_gib_s: rate(bytes, download),
        matmul_prefill_tflops: mm_prefill,
        matmul_decode_tflops: mm_decode,
        attention_prefill_tflops: attn_prefill,
        attention_decode_tflops: attn_decode,
        memory_gib_s: rate(2.0 * bytes, copy),
        dequant_gvalues_s: dequant,
    })
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Writes `text` to `path`, or to stdout for `-`.
pub fn write_text(path: &str, text: &str) -> Result<()> {
    if path == "-" {
        std::io::stdout()
            .write_all(text.as_bytes())
            .map_err(|e| Error::io("<stdout>", e))
    } else {
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_file_reads_back_at_every_size_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (scratch, write) = write_scratch(dir.path(), 8 << 20, 1).unwrap();
        assert!(write.median > 0.0);
        let rows = measure_disk_reads(&scratch, &[64 << 10, 1 << 20], &[1, 2], 4 << 20, 2).unwrap();
        assert_eq!(rows.len(), 4);
        assert!(rows
            .iter()
            .all(|(r, m)| r.gib_s > 0.0 && m.min <= m.median && m.median <= m.max));
        // bursts round up to whole blocks; a burst larger than the file reads what there is
        let bursts = measure_burst_reads(
            &scratch,
            256 << 10,
            2,
            &[100 << 10, 1 << 20, 16 << 20],
            4 << 20,
            2,
        )
        .unwrap();
        let sizes: Vec<u64> = bursts.iter().map(|(b, _)| b.burst_bytes).collect();
        assert_eq!(sizes, [100 << 10, 1 << 20, 16 << 20]);
        assert!(bursts
            .iter()
            .all(|(b, m)| b.gib_s > 0.0 && m.min <= b.gib_s && b.gib_s <= m.max));
        let path = scratch.path.clone();
        drop(scratch);
        assert!(!path.exists());
    }

    #[test]
    fn synthetic_weights_have_the_layouts_shapes() {
        use crate::device::cpu::matmul::WeightRows;
        for (bits, group, bytes) in [
            (32, 0, 4.0),
            (16, 64, 2.0625),
            (8, 32, 1.125),
            (4, 32, 0.625),
        ] {
            let (format, segs) = synthetic_weight(bits, group, 6, 128, 1);
            let views: Vec<&[u32]> = segs.iter().map(Vec::as_slice).collect();
            let w = WeightRows::new(format, &views);
            assert_eq!((w.rows(), w.k()), (6, 128));
            let total: usize = segs.iter().map(|s| s.len() * 4).sum();
            assert_eq!(total as f64 / (6.0 * 128.0), bytes, "{bits} bits");
            let mut row = vec![0.0; 128];
            w.decode_row(5, &mut row);
            assert!(
                row.iter().all(|v| v.abs() <= 1.0 + 1e-3),
                "{bits} bits: {row:?}"
            );
        }
    }

    #[test]
    fn cpu_device_rates_are_plausible() {
        // the fixed cost of a layer: positive and far below a millisecond per kernel call
        let layer = measure_cpu_layer_overhead(1).unwrap();
        assert!(layer.median > 0.0 && layer.median < 0.05, "{layer:?}");
        let q4 = measure_cpu_linear(4, 32, 0, 1).unwrap();
        assert!((q4.bytes_per_value - 0.625).abs() < 1e-9, "{q4:?}");
        assert!(q4.decode_gib_s > 0.0 && q4.gemm_tflops > 0.0, "{q4:?}");
        assert!(q4.call_s >= 0.0 && q4.call_s < 0.01, "{q4:?}");
        assert!((1.0..=8.0).contains(&q4.rows_per_pass), "{q4:?}");
    }

    #[test]
    fn measured_summarizes() {
        let m = Measured::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((m.min, m.median, m.max), (1.0, 2.0, 3.0));
        assert!(measure_matmul(16, 16, 16, 1).median > 0.0);
        assert!(measure_cpu_device_attention(2, 6, 32, 100, 1).median > 0.0);
        assert!(available_memory_bytes().unwrap_or(1) > 0);
    }
}
