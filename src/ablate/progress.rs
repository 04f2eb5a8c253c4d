//! Progress across the runs of an ablation: which run k of N, and the time left estimated from the runs
//! already finished. Within a run the trainer shows steps and epochs (a bar on a terminal, plain lines
//! otherwise) under the label given here; the lines from this module are printed between runs, when no
//! bar is drawn, so they are plain on a terminal too.

/// Wall times of the finished runs and how many there are in all.
pub struct Progress {
    total: usize,
    finished_s: Vec<f64>,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Progress { total, finished_s: vec![] }
    }

    /// The trainer's line prefix for run `k` (0-based).
    pub fn label(&self, k: usize, name: &str) -> String {
        format!("[{}/{} {name}]", k + 1, self.total)
    }

    pub fn say(&self, k: usize, name: &str, msg: &str) {
        eprintln!("ablate {} {msg}", self.label(k, name));
    }

    /// Counts a finished run (trained now, or by an earlier invocation) towards the time estimate.
    pub fn finished(&mut self, wall_s: f64) {
        self.finished_s.push(wall_s);
    }

    /// "about 6m 10s left for 3 runs (mean 2m 3s over 2 finished)" before run `k` starts, or a note that
    /// there is nothing to estimate from yet.
    pub fn eta(&self, k: usize) -> String {
        let left = self.total - k;
        if self.finished_s.is_empty() {
            return format!("{left} runs left; a time estimate follows the first finished run");
        }
        let mean = self.finished_s.iter().sum::<f64>() / self.finished_s.len() as f64;
        format!(
            "about {} left for {left} run{} (mean {} over {} finished)",
            duration(mean * left as f64),
            if left == 1 { "" } else { "s" },
            duration(mean),
            self.finished_s.len()
        )
    }
}

/// `1h 02m`, `3m 07s` or `12.3s`.
pub fn duration(s: f64) -> String {
    let whole = s.round() as u64;
    match whole {
        0..60 => format!("{s:.1}s"),
        60..3600 => format!("{}m {:02}s", whole / 60, whole % 60),
        _ => format!("{}h {:02}m", whole / 3600, whole % 3600 / 60),
    }
}
