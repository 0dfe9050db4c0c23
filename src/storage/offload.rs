//! Files of the disk tier. Reads and writes go through aligned staging buffers with the page
//! cache bypassed (O_DIRECT on Linux: see [`super::direct`]),
//! so the page cache neither hides the disk's real speed nor holds the data in RAM behind the
//! budget's back. Where the file system refuses O_DIRECT (tmpfs), buffered I/O is used and the
//! file's pages are dropped from the cache after writing.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use std::sync::{Arc, Condvar, Mutex};

use super::direct::{drop_cache, open_direct, read_exact_at, read_exact_vectored_at, write_all_at};
use super::{MemoryLedger, Reservation, Tier};
use crate::error::{Error, Result};

/// O_DIRECT needs buffers, offsets and lengths aligned to the device block; 4 KiB covers all.
pub const ALIGN: usize = 4096;

/// `n` rounded up to a multiple of [`ALIGN`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN as u64) * ALIGN as u64
}

/// A zeroed buffer of `len` bytes (a multiple of [`ALIGN`]) starting at an aligned address (no
/// unsafe: a larger Vec, sliced at the first aligned byte).
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` bytes rounded up to a multiple of [`ALIGN`].
    pub fn new(len: usize) -> Self {
        let len = align_up(len.max(1) as u64) as usize;
        let storage = vec![0u8; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        Self {
            storage,
            start,
            len,
        }
    }
    /// Its bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Bytes allocated, alignment slack included (what a memory budget is charged).
    pub fn allocated(&self) -> usize {
        self.storage.len()
    }
}

/// Opens `path` for reading and writing (creating and truncating it when `create`), with
/// O_DIRECT where the file system accepts it; returns the file and whether it is direct.
fn open_read_write(path: &Path, create: bool) -> Result<(File, bool)> {
    if let Ok(f) = open_direct(path, true, create) {
        return Ok((f, true));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(create)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    Ok((file, false))
}

/// Takes a `flock` on `file` (exclusive, or shared) without waiting; false when another
/// process holds a conflicting one.
#[cfg(unix)]
pub fn try_lock(file: &File, exclusive: bool) -> bool {
    use std::os::fd::AsRawFd;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock on a descriptor this process owns; no memory is touched
    unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) == 0 }
}

#[cfg(not(unix))]
pub fn try_lock(_file: &File, _exclusive: bool) -> bool {
    true
}

/// A pool of aligned staging buffers for disk I/O, charged to the CPU budget once.
pub struct StagingPool {
    free: Mutex<Vec<AlignedBuf>>,
    returned: Condvar,
    _held: Reservation,
}

impl StagingPool {
    /// `count` buffers of `chunk` bytes, charged to the CPU tier of `ledger`.
    pub fn new(ledger: &Arc<MemoryLedger>, count: usize, chunk: usize) -> Result<Self> {
        let bufs: Vec<AlignedBuf> = (0..count.max(1)).map(|_| AlignedBuf::new(chunk)).collect();
        let bytes = bufs.iter().map(|b| b.allocated() as u64).sum();
        debug_assert_eq!(bytes, Self::bytes(count, chunk));
        Ok(Self {
            _held: ledger.reserve(Tier::Cpu, bytes, "disk staging buffers")?,
            free: Mutex::new(bufs),
            returned: Condvar::new(),
        })
    }

    /// What [`StagingPool::new`] charges for `count` buffers of `chunk` bytes: each rounded up
    /// to the alignment, plus the alignment's slack.
    pub fn bytes(count: usize, chunk: usize) -> u64 {
        count.max(1) as u64 * (align_up(chunk.max(1) as u64) + ALIGN as u64)
    }

    /// Runs `f` with a staging buffer, waiting for one when all are in use: the pool never
    /// grows past what was charged. (`f` must not ask for a second one.)
    pub fn with<T>(&self, f: impl FnOnce(&mut AlignedBuf) -> Result<T>) -> Result<T> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = loop {
            match free.pop() {
                Some(buf) => break buf,
                None => free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner()),
            }
        };
        drop(free);
        let out = f(&mut buf);
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(buf);
        self.returned.notify_one();
        out
    }
}

/// A fixed-size file of the disk tier, read and written at any offset through aligned staging.
///
/// A file this process creates is locked (`flock`) while open, so that a sweep by another
/// process ([`OffloadDir::prepare`]) never takes it for a dead run's, and is removed when
/// dropped (with its companion files) unless [`OffloadFile::keep`] was called: no exit path,
/// an error or a signal included, leaves it behind.
pub struct OffloadFile {
    path: PathBuf,
    file: File,
    direct: bool,
    len: u64,
    /// Removed with `companions` when dropped.
    remove_on_drop: bool,
    companions: Vec<PathBuf>,
}

impl OffloadFile {
    /// Creates (or truncates) `path` with room for `len` bytes (rounded up to [`ALIGN`]),
    /// locked and removed when dropped. A failed size change (a full disk) removes it at once.
    pub fn create(path: &Path, len: u64) -> Result<Self> {
        let (file, direct) = open_read_write(path, true)?;
        try_lock(&file, true);
        let len = align_up(len);
        let this = Self {
            path: path.to_path_buf(),
            file,
            direct,
            len,
            remove_on_drop: true,
            companions: Vec::new(),
        };
        this.file.set_len(len).map_err(|e| Error::io(path, e))?;
        Ok(this)
    }

    /// Opens an existing file written by [`OffloadFile::create`] (not removed when dropped).
    pub fn open(path: &Path) -> Result<Self> {
        let (file, direct) = open_read_write(path, false)?;
        try_lock(&file, false);
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            direct,
            len,
            remove_on_drop: false,
            companions: Vec::new(),
        })
    }

    /// Renames the file to `to` (replacing what is there: a reader of the old file keeps
    /// its bytes).
    pub fn rename(&mut self, to: &Path) -> Result<()> {
        std::fs::rename(&self.path, to).map_err(|e| Error::io(to, e))?;
        self.path = to.to_path_buf();
        Ok(())
    }

    /// Whether the file (and `companions`) are removed when it is dropped.
    pub fn keep(&mut self, keep: bool, companions: Vec<PathBuf>) {
        self.remove_on_drop = !keep;
        self.companions = companions;
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether I/O bypasses the page cache.
    #[cfg(test)]
    fn is_direct(&self) -> bool {
        self.direct
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        if offset + len as u64 > self.len {
            return Err(Error::format(
                &self.path,
                format!(
                    "offload file holds {} bytes; {len} bytes at {offset} are past its end \
                     (was it truncated? delete the offload directory to rebuild it)",
                    self.len
                ),
            ));
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` in aligned pieces of at most `staging.len()` bytes, handing
    /// each piece to `sink(position within the range, bytes)`.
    pub fn read_chunks(
        &self,
        offset: u64,
        len: usize,
        staging: &mut AlignedBuf,
        mut sink: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.check(offset, len)?;
        let end = offset + len as u64;
        // aligned window [a, b) covering [offset, end), read a staging buffer at a time
        let mut a = offset / ALIGN as u64 * ALIGN as u64;
        while a < end {
            let b = (a + staging.len() as u64).min(align_up(end)).min(self.len);
            let n = (b - a) as usize;
            read_exact_at(&self.file, &mut staging.bytes_mut()[..n], a)
                .map_err(|e| Error::io(&self.path, e))?;
            let lo = offset.max(a);
            let hi = end.min(b);
            sink(
                (lo - offset) as usize,
                &staging.bytes()[(lo - a) as usize..(hi - a) as usize],
            )?;
            a = b;
        }
        Ok(())
    }

    /// Reads segments laid out one after another from `offset`, each `lens[i]` bytes padded
    /// to a multiple of [`ALIGN`], straight into `dsts` (one request, no staging copy) when
    /// that is possible: each `dsts[i]` must have room for the padded length and, with the
    /// page cache bypassed, start at an aligned address, as `offset` must be aligned. The
    /// padding is read along. Returns false, reading nothing, when that is not possible.
    pub fn read_segments(
        &self,
        offset: u64,
        lens: &[usize],
        dsts: &mut [&mut [u8]],
    ) -> Result<bool> {
        let padded: Vec<usize> = lens.iter().map(|&l| align_up(l as u64) as usize).collect();
        let fits = lens.len() == dsts.len()
            && dsts.iter().zip(&padded).all(|(d, &n)| {
                d.len() >= n && (!self.direct || d.as_ptr().align_offset(ALIGN) == 0)
            })
            && (!self.direct || offset.is_multiple_of(ALIGN as u64));
        if !fits {
            return Ok(false);
        }
        self.check(offset, padded.iter().sum())?;
        let mut parts: Vec<&mut [u8]> = dsts
            .iter_mut()
            .zip(&padded)
            .map(|(d, &n)| &mut d[..n])
            .collect();
        read_exact_vectored_at(&self.file, &mut parts, offset)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(true)
    }

    /// Reads `dst.len()` bytes at `offset`.
    pub fn read_into(&self, offset: u64, dst: &mut [u8], staging: &mut AlignedBuf) -> Result<()> {
        self.read_chunks(offset, dst.len(), staging, |at, bytes| {
            dst[at..at + bytes.len()].copy_from_slice(bytes);
            Ok(())
        })
    }

    /// Writes `src` at `offset`; partial blocks at either end are read, patched and rewritten.
    pub fn write_at(&self, offset: u64, src: &[u8], staging: &mut AlignedBuf) -> Result<()> {
        self.check(offset, src.len())?;
        let end = offset + src.len() as u64;
        let mut a = offset / ALIGN as u64 * ALIGN as u64;
        while a < end {
            let b = (a + staging.len() as u64).min(align_up(end)).min(self.len);
            let n = (b - a) as usize;
            let (lo, hi) = (offset.max(a), end.min(b));
            if lo > a || hi < b {
                // a partial window: keep the bytes around the range
                read_exact_at(&self.file, &mut staging.bytes_mut()[..n], a)
                    .map_err(|e| Error::io(&self.path, e))?;
            }
            staging.bytes_mut()[(lo - a) as usize..(hi - a) as usize]
                .copy_from_slice(&src[(lo - offset) as usize..(hi - offset) as usize]);
            write_all_at(&self.file, &staging.bytes()[..n], a)
                .map_err(|e| Error::io(&self.path, e))?;
            a = b;
        }
        if !self.direct {
            drop_cache(&self.file);
        }
        Ok(())
    }

    /// Flushes written data to the device.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

impl Drop for OffloadFile {
    fn drop(&mut self) {
        if self.remove_on_drop {
            for path in self.companions.iter().chain([&self.path]) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The name of a file that only this process uses: `{stem}.pid{PID}.bin`. A sweep
/// ([`OffloadDir::prepare`]) removes such files of processes that are gone.
pub fn private_file_name(stem: &str) -> String {
    format!("{stem}.pid{}.bin", std::process::id())
}

/// The process id in a [`private_file_name`], if the name is one.
fn private_file_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("ferrogen-")?.strip_suffix(".bin")?;
    let at = rest.rfind(".pid")?;
    rest[at + 4..].parse().ok()
}

/// Whether process `pid` is alive (or may be: on other systems than Unix, always).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// The directory of the disk tier, ready for a run: created when missing (and removed again
/// at the end when this run created it and left it empty), with the files of runs that died
/// (killed, so unable to clean up) swept away.
#[derive(Debug)]
pub struct OffloadDir {
    path: PathBuf,
    created: bool,
}

impl OffloadDir {
    /// Checks that `path` is a directory or can be one, and sweeps it.
    pub fn prepare(path: &Path) -> Result<Self> {
        let created = match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => false,
            Ok(_) => {
                return Err(Error::invalid(
                    "EngineOptions::offload_dir",
                    format!(
                        "`{}` is a file, not a directory: name a directory (created when \
                         missing)",
                        path.display()
                    ),
                ))
            }
            Err(_) => {
                std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
                true
            }
        };
        let dir = Self {
            path: path.to_path_buf(),
            created,
        };
        dir.sweep();
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the private files of processes that are gone and hold no lock on them.
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = private_file_pid(&name) else {
                continue;
            };
            if pid == std::process::id() || process_alive(pid) {
                continue;
            }
            let path = entry.path();
            let unlocked = File::open(&path).is_ok_and(|f| try_lock(&f, true));
            if unlocked {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

impl Drop for OffloadDir {
    fn drop(&mut self) {
        if self.created {
            // only when empty: another run's kept files stay
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn unaligned_writes_and_reads_round_trip(
            writes in prop::collection::vec((0u64..40_000, 1usize..9_000, any::<u8>()), 1..8),
            staging in 1usize..4,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let len = 50_000u64;
            let file = OffloadFile::create(&dir.path().join("x.bin"), len).unwrap();
            let mut staging = AlignedBuf::new(staging * ALIGN);
            let mut model = vec![0u8; file.len() as usize];
            for &(off, n, seed) in &writes {
                let data: Vec<u8> = (0..n).map(|i| seed.wrapping_add((i * 7) as u8)).collect();
                file.write_at(off, &data, &mut staging).unwrap();
                model[off as usize..off as usize + n].copy_from_slice(&data);
            }
            for &(off, n, _) in &writes {
                let mut back = vec![0u8; n + 3];
                let n = (n + 3).min(model.len() - off as usize);
                file.read_into(off, &mut back[..n], &mut staging).unwrap();
                prop_assert_eq!(&back[..n], &model[off as usize..off as usize + n]);
            }
            let mut all = vec![0u8; model.len()];
            file.read_into(0, &mut all, &mut staging).unwrap();
            prop_assert_eq!(all, model);
        }
    }

    /// Created files go when dropped unless kept; a dead process's private files are swept,
    /// a live one's and other files are not; a directory this run created goes when empty; a
    /// file where the directory should be is a clear error.
    #[test]
    fn offload_files_are_removed_and_stale_ones_swept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("offload");
        let guard = OffloadDir::prepare(&dir).unwrap();
        let a = OffloadFile::create(&dir.join(private_file_name("ferrogen-x")), 100).unwrap();
        let mut b = OffloadFile::create(&dir.join("ferrogen-kept.bin"), 100).unwrap();
        b.keep(true, Vec::new());
        assert!(a.path().exists());
        drop(a);
        drop(b);
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&dir), ["ferrogen-kept.bin"]);
        // a dead process's file (pid 2^22 + 1 is above Linux's pid_max)
        std::fs::write(dir.join("ferrogen-KV-cache.pid4194305.bin"), b"x").unwrap();
        // this process's own, and a user's file
        std::fs::write(dir.join(private_file_name("ferrogen-mine")), b"x").unwrap();
        std::fs::write(dir.join("notes.pid4194305.bin"), b"x").unwrap();
        drop(guard);
        assert!(dir.exists(), "not empty: kept");
        let _again = OffloadDir::prepare(&dir).unwrap();
        let left = names(&dir);
        assert!(!left.contains(&"ferrogen-KV-cache.pid4194305.bin".to_string()));
        assert_eq!(left.len(), 3, "{left:?}");
        assert_eq!(
            private_file_pid("ferrogen-weights-0123.pid77.bin"),
            Some(77)
        );
        assert_eq!(private_file_pid("ferrogen-weights-0123456789.bin"), None);
        // created and left empty: removed
        let fresh = root.path().join("fresh");
        drop(OffloadDir::prepare(&fresh).unwrap());
        assert!(!fresh.exists());
        let file = root.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = OffloadDir::prepare(&file).unwrap_err().to_string();
        assert!(
            e.contains("EngineOptions::offload_dir") && e.contains("not a directory"),
            "{e}"
        );
    }

    #[test]
    fn reads_past_the_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = OffloadFile::create(&dir.path().join("x.bin"), 100).unwrap();
        assert_eq!(file.len(), 4096);
        let mut staging = AlignedBuf::new(ALIGN);
        let mut buf = [0u8; 10];
        let err = file.read_into(4090, &mut buf, &mut staging).unwrap_err();
        assert!(err.to_string().contains("past its end"), "{err}");
    }

    /// Segments laid out back to back, each padded to the alignment, come back whole in one
    /// call (more of them than one `preadv` takes, too); buffers without room for the padding,
    /// or (with O_DIRECT) at unaligned addresses or offsets, are refused with nothing read.
    #[test]
    fn segments_read_straight_into_aligned_buffers() {
        let dir = tempfile::tempdir().unwrap();
        for count in [1usize, 3, 1100] {
            let lens: Vec<usize> = (0..count).map(|i| 1 + (i * 1237) % 9000).collect();
            let padded: Vec<usize> = lens.iter().map(|&l| align_up(l as u64) as usize).collect();
            let total: usize = padded.iter().sum();
            let file =
                OffloadFile::create(&dir.path().join("s.bin"), (total + ALIGN) as u64).unwrap();
            let mut staging = AlignedBuf::new(ALIGN);
            let bytes: Vec<u8> = (0..total).map(|i| (i * 31 % 251) as u8).collect();
            file.write_at(ALIGN as u64, &bytes, &mut staging).unwrap();
            let mut bufs: Vec<AlignedBuf> = padded.iter().map(|&n| AlignedBuf::new(n)).collect();
            let mut dsts: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.bytes_mut()).collect();
            assert!(file.read_segments(ALIGN as u64, &lens, &mut dsts).unwrap());
            let mut at = 0;
            for (b, (&l, &n)) in bufs.iter().zip(lens.iter().zip(&padded)) {
                assert_eq!(&b.bytes()[..l], &bytes[at..at + l], "{count} segments");
                at += n;
            }
            // no room for the padding: refused
            let mut short = AlignedBuf::new(ALIGN);
            let mut dst = [&mut short.bytes_mut()[..ALIGN - 1]];
            assert!(!file.read_segments(0, &[10], &mut dst).unwrap());
        }
        let file = OffloadFile::create(&dir.path().join("d.bin"), 4 * ALIGN as u64).unwrap();
        if file.is_direct() {
            let mut buf = AlignedBuf::new(3 * ALIGN);
            let mut dst = [&mut buf.bytes_mut()[1..ALIGN + 1]];
            assert!(
                !file.read_segments(0, &[100], &mut dst).unwrap(),
                "unaligned address"
            );
            let mut dst = [&mut buf.bytes_mut()[..ALIGN]];
            assert!(
                !file.read_segments(512, &[100], &mut dst).unwrap(),
                "unaligned offset"
            );
        }
    }
}
