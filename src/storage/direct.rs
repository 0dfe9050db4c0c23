//! File I/O that bypasses the page cache, per platform, so the disk tier is measured and
//! budgeted honestly:
//!
//! - Linux (and other Unixes with it): `O_DIRECT`; pages of buffered files dropped with
//!   `posix_fadvise(DONTNEED)`.
//! - macOS: `fcntl(F_NOCACHE)` on an ordinary descriptor.
//! - Windows: `FILE_FLAG_NO_BUFFERING` (it wants sector-aligned offsets, lengths and buffers,
//!   which the 4 KiB staging alignment gives).
//!
//! Elsewhere [`open_direct`] fails and callers fall back to buffered I/O. Positional reads and
//! writes ([`read_exact_at`], [`read_exact_vectored_at`], [`write_all_at`]) take an offset and
//! leave no shared cursor, so threads may share a file.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Opens `path` for reading (and writing when `write`; created and truncated when `create`)
/// with the page cache bypassed, or fails where the platform or the file system refuses.
pub fn open_direct(path: &Path, write: bool, create: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    if create {
        o.create(true).truncate(true);
    }
    open_uncached(&mut o, path)
}

#[cfg(all(unix, not(target_vendor = "apple")))]
fn open_uncached(o: &mut OpenOptions, path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    o.custom_flags(libc::O_DIRECT).open(path)
}

#[cfg(target_vendor = "apple")]
fn open_uncached(o: &mut OpenOptions, path: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let file = o.open(path)?;
    // SAFETY: fcntl with F_NOCACHE takes an integer argument; the descriptor is open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_NOCACHE, 1) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(windows)]
fn open_uncached(o: &mut OpenOptions, path: &Path) -> io::Result<File> {
    use std::os::windows::fs::OpenOptionsExt;
    const FILE_FLAG_NO_BUFFERING: u32 = 0x2000_0000;
    o.custom_flags(FILE_FLAG_NO_BUFFERING).open(path)
}

#[cfg(not(any(unix, windows)))]
fn open_uncached(_: &mut OpenOptions, _: &Path) -> io::Result<File> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no uncached file I/O on this platform",
    ))
}

/// Drops a buffered file's pages from the page cache where the platform can (Linux and the
/// other Unixes with `posix_fadvise`); a no-op elsewhere.
pub fn drop_cache(file: &File) {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let _ = file;
}

/// Reads exactly `buf.len()` bytes at `offset`.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match file.seek_read(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reads exactly the bytes of `bufs`, one after another, from `offset` on: one system call for
/// all of them where the platform has vectored positional reads (`preadv`), else one each.
pub fn read_exact_vectored_at(file: &File, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "dragonfly",
        target_os = "macos",
    ))]
    {
        use std::os::fd::AsRawFd;
        // (slice, bytes of it already read)
        let (mut at, mut done, mut offset) = (0usize, 0usize, offset);
        while at < bufs.len() {
            if done == bufs[at].len() {
                (at, done) = (at + 1, 0);
                continue;
            }
            let iov: Vec<libc::iovec> = bufs[at..]
                .iter_mut()
                .enumerate()
                .take(1024) // IOV_MAX on these systems
                .map(|(i, b)| {
                    let b = if i == 0 { &mut b[done..] } else { &mut b[..] };
                    libc::iovec {
                        iov_base: b.as_mut_ptr().cast(),
                        iov_len: b.len(),
                    }
                })
                .collect();
            let pos = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            // SAFETY: each iovec points into a live `&mut [u8]` of `bufs` for its length, and
            // nothing else touches them during the call; the descriptor is open.
            let n = unsafe { libc::preadv(file.as_raw_fd(), iov.as_ptr(), iov.len() as _, pos) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut n = n as usize;
            offset += n as u64;
            while n > 0 {
                let take = n.min(bufs[at].len() - done);
                (n, done) = (n - take, done + take);
                if done == bufs[at].len() && at + 1 < bufs.len() {
                    (at, done) = (at + 1, 0);
                }
            }
        }
        Ok(())
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "dragonfly",
        target_os = "macos",
    )))]
    {
        let mut offset = offset;
        for b in bufs.iter_mut() {
            read_exact_at(file, b, offset)?;
            offset += b.len() as u64;
        }
        Ok(())
    }
}

/// Writes all of `buf` at `offset`.
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match file.seek_write(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Free bytes for an unprivileged user on the file system holding `dir` (`None` where it
/// cannot be asked: Windows, for now, where budgets must then be given).
pub fn free_disk_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs writes into the zeroed struct we own; the path is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positional_io_round_trips_with_or_without_the_cache() {
        let dir = std::env::temp_dir().join(format!("ferrogen-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        let file = open_direct(&path, true, true)
            .or_else(|_| {
                File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
            })
            .unwrap();
        let mut block = crate::storage::offload::AlignedBuf::new(8192);
        for (i, b) in block.bytes_mut().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        write_all_at(&file, block.bytes(), 4096).unwrap();
        let mut back = crate::storage::offload::AlignedBuf::new(8192);
        read_exact_at(&file, back.bytes_mut(), 4096).unwrap();
        assert_eq!(back.bytes(), block.bytes());
        // past the end: an error, not a short read
        assert!(read_exact_at(&file, back.bytes_mut(), 8192).is_err());
        drop_cache(&file);
        assert!(free_disk_bytes(&dir).is_some_and(|b| b > 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
