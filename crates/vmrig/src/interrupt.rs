//! The signals that end a run early: SIGINT, SIGTERM and SIGHUP. A handler
//! only notes which arrived; the run sees it between its steps, stops the
//! script, tears every node down and reports the run as interrupted.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The signals a run answers by stopping.
pub const STOP_SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// The last stop signal received, or 0.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn note(signal: nix::libc::c_int) {
    RECEIVED.store(signal, Ordering::SeqCst);
}

/// From now on, a stop signal is noted instead of ending the process.
pub fn catch() {
    let action = SigAction::new(SigHandler::Handler(note), SaFlags::SA_RESTART, SigSet::empty());
    for signal in STOP_SIGNALS {
        // SAFETY: `note` only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(signal, &action) };
    }
}

/// The stop signal received since [`catch`], if any.
pub fn received() -> Option<Signal> {
    Signal::try_from(RECEIVED.load(Ordering::SeqCst)).ok()
}

/// The exit status of a process ended by `signal`, as shells report it.
pub fn exit_status(signal: Signal) -> u8 {
    128 + signal as u8
}
