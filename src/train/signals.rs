//! SIGINT and SIGTERM during training: the first one asks the loop to finish its optimiser step, write a
//! checkpoint and stop ([`Interrupted`], exit status 128 + signal); a second one of the same kind ends
//! the process at once with that status. (A SIGINT followed by a SIGTERM still stops cleanly: Ctrl-C
//! under `mpirun` reaches the ranks directly and again as mpirun's SIGTERM.)

use signal_hook::consts::{SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

struct Flags {
    raised: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Installs the handlers (once per process).
pub fn install() -> anyhow::Result<()> {
    if FLAGS.get().is_some() {
        return Ok(());
    }
    let flags = Flags { raised: Arc::new(AtomicBool::new(false)), signal: Arc::new(AtomicUsize::new(0)) };
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as it was before this signal: set means a second signal.
        let this_kind = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&this_kind))?;
        signal_hook::flag::register(sig, this_kind)?;
        signal_hook::flag::register_usize(sig, Arc::clone(&flags.signal), sig as usize)?;
        signal_hook::flag::register(sig, Arc::clone(&flags.raised))?;
    }
    let _ = FLAGS.set(flags);
    Ok(())
}

/// The signal received since [`install`], if any.
pub fn requested() -> Option<i32> {
    let flags = FLAGS.get()?;
    flags.raised.load(Ordering::SeqCst).then(|| flags.signal.load(Ordering::SeqCst) as i32)
}

/// Training stopped on a signal after writing a checkpoint.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub step: usize,
    pub checkpoint: std::path::PathBuf,
}

impl Interrupted {
    /// The conventional exit status: 130 for SIGINT, 143 for SIGTERM.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = if self.signal == SIGINT { "SIGINT" } else { "SIGTERM" };
        write!(f, "interrupted by {name} after step {}; checkpoint {}", self.step, self.checkpoint.display())
    }
}

impl std::error::Error for Interrupted {}
