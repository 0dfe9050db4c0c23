//! Measuring this machine for a [`HardwareProfile`]: disk reads with O_DIRECT by read size and
//! thread count, disk writes, memory copies, and CPU matrix-product and attention rates.
//!
//! Every figure is the median of several trials, reported with its spread (min-max), because
//! shared machines are noisy.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array2;

use super::hardware::{DiskRead, GIB};
use crate::error::{Error, Result};

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

/// O_DIRECT needs buffers, offsets and lengths aligned to the device block; 4 KiB covers all.
const ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes starting at an `ALIGN`-aligned address (no unsafe: a larger
/// Vec, sliced at the first aligned byte).
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        Self {
            storage,
            start,
            len,
        }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
    fn as_ref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
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

fn open_direct(path: &Path, write: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    if write {
        o.write(true).create(true).truncate(true);
    }
    o.custom_flags(libc::O_DIRECT).open(path)
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
    for (i, b) in buf.as_mut().iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8; // incompressible enough
    }
    let mut direct = true;
    let mut rates = Vec::new();
    for _ in 0..trials.max(1) {
        let file = match open_direct(&path, true) {
            Ok(f) => f,
            Err(_) => {
                direct = false;
                File::create(&path).map_err(|e| Error::io(&path, e))?
            }
        };
        let t = Instant::now();
        let mut off = 0;
        while off < len {
            file.write_all_at(buf.as_ref(), off)
                .map_err(|e| Error::io(&path, e))?;
            off += chunk as u64;
        }
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        rates.push(len as f64 / t.elapsed().as_secs_f64() / GIB);
    }
    let scratch = ScratchFile { path, direct, len };
    Ok((scratch, Measured::of(rates)))
}

/// Drops the file's pages from the page cache (for buffered fallback reads).
fn drop_cache(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Reads `bytes` of the scratch file with `threads` threads issuing `chunk`-byte reads, each
/// thread its own contiguous region; returns GiB/s.
fn read_once(scratch: &ScratchFile, chunk: usize, threads: usize, bytes: u64) -> Result<f64> {
    let per_thread = (bytes / threads as u64) / chunk as u64 * chunk as u64;
    let region = (scratch.len / threads as u64) / chunk as u64 * chunk as u64;
    let per_thread = per_thread.min(region).max(chunk as u64);
    let open = || {
        if scratch.direct {
            open_direct(&scratch.path, false)
        } else {
            File::open(&scratch.path)
        }
        .map_err(|e| Error::io(&scratch.path, e))
    };
    if !scratch.direct {
        drop_cache(&open()?);
    }
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                s.spawn(move || -> Result<()> {
                    let file = open()?;
                    let mut buf = AlignedBuf::new(chunk);
                    let base = i as u64 * region;
                    let mut off = 0;
                    while off < per_thread {
                        file.read_exact_at(buf.as_mut(), base + off)
                            .map_err(|e| Error::io(&scratch.path, e))?;
                        off += chunk as u64;
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
    })?;
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

/// Decode attention on the CPU: per head, one query against `context` cached keys and values
/// (`q K^T`, then `p V`), `4 * context * head_dim` FLOPs per head; in TFLOP/s.
pub fn measure_cpu_attention(
    heads: usize,
    head_dim: usize,
    context: usize,
    trials: usize,
) -> Measured {
    let k = Array2::from_shape_fn((context, head_dim), |(i, j)| ((i + j) % 5) as f32 * 0.1);
    let v = k.clone();
    let q = Array2::from_elem((1, head_dim), 0.01f32);
    let rates = (0..trials.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..heads {
                let p = q.dot(&k.t());
                std::hint::black_box(p.dot(&v));
            }
            4.0 * (heads * context * head_dim) as f64 / t.elapsed().as_secs_f64() / 1e12
        })
        .collect();
    Measured::of(rates)
}

/// Free bytes on the file system holding `dir`.
pub fn free_disk_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
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
        let path = scratch.path.clone();
        drop(scratch);
        assert!(!path.exists());
    }

    #[test]
    fn measured_summarizes() {
        let m = Measured::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((m.min, m.median, m.max), (1.0, 2.0, 3.0));
        assert!(measure_matmul(16, 16, 16, 1).median > 0.0);
        assert!(measure_cpu_attention(2, 8, 32, 1).median > 0.0);
        assert!(available_memory_bytes().unwrap_or(1) > 0);
    }
}
