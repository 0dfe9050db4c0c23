//! Freed memory goes back to the operating system, so that a process keeps to its RAM budget.
//!
//! The ledger counts what the engine holds, but glibc's allocator keeps freed blocks for reuse:
//! by default its threshold for serving a request with its own `mmap` rises to the largest
//! block freed so far (up to 32 MiB), and blocks below it come from heaps that shrink only
//! from the top. The engine allocates and frees buffers of a few MiB to tens of MiB for every
//! unit (working caches, staging, activations, the kernels' panels), on several threads, so
//! the freed ones piled up: 256 sequences of a 1.07B model under an 800 MiB budget peaked at
//! 894–928 MiB of RSS for a ledger peak of 715 MiB. With blocks of 1 MiB and more mapped and
//! unmapped on their own, and heaps trimmed above 4 MiB free, the same run peaked at 738 MiB,
//! at the same speed within noise.

/// Blocks of at least this many bytes get their own mapping, returned when freed.
pub const MMAP_THRESHOLD: usize = 1 << 20;
/// Free bytes at a heap's top beyond which it is trimmed.
pub const TRIM_THRESHOLD: usize = 4 << 20;

/// Asks the C allocator to return freed blocks as above: glibc on Linux (a process-wide
/// setting, which [`crate::Engine`] makes when it opens with a finite RAM budget); elsewhere
/// a no-op. Returns whether the allocator took both settings.
pub fn return_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets the allocator's parameters; both values are in range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_settings() {
        let took = super::return_freed_memory();
        assert_eq!(took, cfg!(all(target_os = "linux", target_env = "gnu")));
    }
}
