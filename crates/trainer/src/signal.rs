//! SIGINT/SIGTERM handling: the first signal sets a flag that the loop reads between steps (it finishes
//! the step, writes a checkpoint and exits 130); a second signal exits at once with 130.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static STOP: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// Installs the handler (once per process). Errors only if another handler was installed by someone
/// else; the run then simply cannot be interrupted gracefully, which is reported, not fatal.
pub fn install() -> Result<(), String> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting now without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: finishing the current step, then writing a checkpoint (Ctrl-C again to abort)");
        })
        .map_err(|e| e.to_string());
    });
    result
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Requests a stop programmatically (tests, and library callers that embed the trainer).
pub fn request() {
    STOP.store(true, Ordering::SeqCst);
}

/// Clears a pending request (library callers running several trainings in one process).
pub fn reset() {
    STOP.store(false, Ordering::SeqCst);
}
