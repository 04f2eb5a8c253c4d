//! The run folder (`--out`): claimed with an exclusive lock for the life of a training process, and
//! never trained into over an earlier run unless the user resumes it or asks to move it aside.

use anyhow::{bail, Context, Result};
use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What marks a folder as holding a run.
const RUN_FILES: [&str; 3] = ["checkpoints", "log.jsonl", "summary.json"];

/// The lock on a run folder; released when dropped (or when the process ends, however it ends).
pub struct RunDir {
    _lock: File,
}

impl RunDir {
    /// Locks `out` (creating it). A second process on the same folder fails at once naming the holder.
    /// Without `resume`, a folder that already holds a run is refused, unless `overwrite` moves that run
    /// into `out/previous-N` (nothing is deleted).
    pub fn claim(out: &Path, resume: bool, overwrite: bool) -> Result<RunDir> {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let path = out.join(".lock");
        let mut lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "{} is in use by another alignfuse process ({}): wait for it to finish, or train into another --out",
                    out.display(),
                    holder.trim()
                )
            }
            Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
        lock.set_len(0)?;
        writeln!(lock, "pid {}", std::process::id())?;
        let existing: Vec<&str> = RUN_FILES.into_iter().filter(|f| out.join(f).exists()).collect();
        if !resume && !existing.is_empty() {
            if !overwrite {
                bail!(
                    "{} already holds a run ({}): continue it with `--resume latest`, train into a fresh --out, \
                     or pass --overwrite to move the old run into {}/previous-N",
                    out.display(),
                    existing.join(", "),
                    out.display()
                );
            }
            let aside = move_aside(out, &existing)?;
            eprintln!("--overwrite: moved the previous run ({}) into {}", existing.join(", "), aside.display());
        }
        Ok(RunDir { _lock: lock })
    }
}

/// Moves `files` of `out` into the first free `out/previous-N`.
fn move_aside(out: &Path, files: &[&str]) -> Result<PathBuf> {
    let aside = (1..).map(|n| out.join(format!("previous-{n}"))).find(|d| !d.exists()).expect("a free name exists");
    std::fs::create_dir(&aside).with_context(|| format!("cannot create {}", aside.display()))?;
    for f in files {
        std::fs::rename(out.join(f), aside.join(f))
            .with_context(|| format!("cannot move {} into {}", out.join(f).display(), aside.display()))?;
    }
    Ok(aside)
}
