//! Signals that stop a job between batches: SIGINT, SIGTERM and SIGHUP set a flag the job
//! reads ([`received_signal`]); a second one kills the process.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked this process to stop (SIGINT, SIGTERM or SIGHUP), 0 for none. A
/// signal handler can only set a flag: this is that flag, read by [`received_signal`].
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // a second signal stops the process at once (the next run sweeps what it leaves)
    if SIGNAL.swap(signal, Ordering::SeqCst) != 0 {
        // SAFETY: signal and raise are async-signal-safe
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP set a flag ([`received_signal`]) instead of killing the
/// process, so that a job stops between batches, keeps its answers and removes its
/// temporary files; a second signal kills it at once. Call once, at the start of a
/// command-line job.
pub fn stop_on_signals() {
    #[cfg(unix)]
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// The signal received since [`stop_on_signals`], if any.
pub fn received_signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The exit status for a job stopped by `signal`: 128 + its number (130 SIGINT, 143 SIGTERM,
/// 129 SIGHUP).
pub fn signal_exit_status(signal: i32) -> u8 {
    (128 + signal).clamp(0, 255) as u8
}
