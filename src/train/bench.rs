//! `alignfuse bench train`: times training steps on the configured data and model, split into phases
//! (data wait, forward, EMA update, backward, optimiser), and reports pairs/s and peak memory.

use super::{backward, schedule, Setup};
use crate::config::Config;
use anyhow::{ensure, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct TrainBench {
    pub steps: usize,
    /// Trainable parameters: the f32 gradients a data-parallel step all-reduces.
    pub parameters: usize,
    pub batch_size: usize,
    /// Mean caption length of the timed batches (tokens, `[CLS]` and `[SEP]` included).
    pub tokens: f64,
    pub pairs_per_s: f64,
    /// Pairs/s without the data wait: what a baseline fed from memory compares with.
    pub compute_pairs_per_s: f64,
    /// Mean milliseconds per step of each phase.
    pub data_ms: f64,
    pub forward_ms: f64,
    pub ema_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_rss_mib: Option<f64>,
    /// Minor page faults per timed step (the process's, Unix): near zero when the allocator reuses
    /// the memory of earlier steps, hundreds when it hands freed pages back to the OS between them.
    pub page_faults_per_step: Option<f64>,
    /// GPU memory in use (total minus free), MiB: the largest value seen at the end of a phase, so a lower
    /// bound of the true peak. `None` on the CPU.
    pub peak_device_mib: Option<f64>,
    pub device: String,
}

impl std::fmt::Display for TrainBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total = self.data_ms + self.forward_ms + self.ema_ms + self.backward_ms + self.optimizer_ms;
        writeln!(
            f,
            "{} steps of {} pairs ({:.1} tokens) on {}: {:.1} pairs/s ({:.1} without the data wait), {:.1} ms/step",
            self.steps, self.batch_size, self.tokens, self.device, self.pairs_per_s, self.compute_pairs_per_s, total
        )?;
        writeln!(
            f,
            "{} trainable parameters ({:.1} MiB of f32 gradients)",
            self.parameters,
            self.parameters as f64 / 262144.0
        )?;
        writeln!(f, "{:<10} {:>10} {:>7}", "phase", "ms/step", "share")?;
        for (name, ms) in [
            ("data", self.data_ms),
            ("forward", self.forward_ms),
            ("ema", self.ema_ms),
            ("backward", self.backward_ms),
            ("optimizer", self.optimizer_ms),
        ] {
            writeln!(f, "{name:<10} {ms:>10.1} {:>6.1}%", 100.0 * ms / total.max(1e-9))?;
        }
        match self.peak_rss_mib {
            Some(m) => write!(f, "peak RSS {m:.0} MiB")?,
            None => write!(f, "peak RSS unavailable")?,
        }
        if let Some(n) = self.page_faults_per_step {
            write!(f, ", {n:.0} page faults per step")?;
        }
        match self.peak_device_mib {
            Some(m) => write!(f, ", GPU memory in use {m:.0} MiB (largest seen at a phase end)"),
            None => Ok(()),
        }
    }
}

/// Runs one warm-up step, then `steps` timed steps (one micro-batch each) from the start of epoch 0;
/// under `mpirun`, data parallel like training (pairs/s then counts the global batch).
pub fn bench_train(cfg: Config, work_dir: &Path, steps: usize) -> Result<TrainBench> {
    ensure!(steps >= 1, "--steps must be at least 1");
    let mut cfg = cfg;
    cfg.train.grad_accum = 1;
    let mut run = Setup::new(cfg, work_dir)?;
    let cfg = run.cfg.clone();
    ensure!(
        run.loader.batches_per_epoch() > steps,
        "the dataset has {} batches per epoch; bench needs more than --steps = {steps}",
        run.loader.batches_per_epoch()
    );
    let mut batches = run.loader.epoch(0, 0, None)?;
    // A GPU runs ahead of the host: each phase ends when the device has finished its work.
    let device = run.device.clone();
    let peak_device = std::cell::Cell::new(None::<f64>);
    let lap = |t: Instant| -> Result<f64> {
        device.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        if let Some(used) = crate::device_memory_used_mib(&device) {
            peak_device.set(Some(peak_device.get().map_or(used, |p| p.max(used))));
        }
        Ok(secs)
    };
    let (mut data, mut fwd, mut ema, mut bwd, mut opt, mut tokens) = (0.0, 0.0, 0.0, 0.0, 0.0, 0);
    let mut faults_at_start = None;
    for i in 0..=steps {
        if i == 1 {
            (data, fwd, ema, bwd, opt, tokens) = (0.0, 0.0, 0.0, 0.0, 0.0, 0);
            faults_at_start = minor_faults();
        }
        let t = Instant::now();
        let batch = batches.next().expect("checked above")?;
        data += lap(t)?;
        tokens += batch.input_ids.dim(1)?;
        let t = Instant::now();
        run.model.update_momentum()?;
        ema += lap(t)?;
        let t = Instant::now();
        let alpha = schedule::alpha(cfg.effective_alpha(), cfg.objectives.alpha_ramp_epochs, i, run.steps_per_epoch);
        let mut out = run.forward(&batch, i as u64, alpha)?;
        fwd += lap(t)?;
        let t = Instant::now();
        let (_, grads) = backward(&mut out, &run.device)?;
        bwd += lap(t)?;
        let t = Instant::now();
        run.opt.accumulate(&grads)?;
        drop(grads);
        run.opt.all_reduce(&run.dist)?;
        run.opt.step(cfg.train.lr, cfg.train.grad_clip)?;
        if let Some(update) = &out.queue_update {
            run.model.enqueue(update)?;
        }
        opt += lap(t)?;
    }
    let page_faults_per_step = faults_at_start.zip(minor_faults()).map(|(a, b)| (b - a) as f64 / steps as f64);
    let ms = |s: f64| 1000.0 * s / steps as f64;
    let total = data + fwd + ema + bwd + opt;
    // With several ranks: every rank's pairs (the optimiser phase includes the gradient all-reduce).
    let batch_size = cfg.train.batch_size * run.dist.world();
    let pairs = (steps * batch_size) as f64;
    Ok(TrainBench {
        steps,
        parameters: run.model.params().vars().iter().map(|(_, v)| v.elem_count()).sum(),
        batch_size,
        tokens: tokens as f64 / steps as f64,
        pairs_per_s: pairs / total,
        compute_pairs_per_s: pairs / (total - data),
        data_ms: ms(data),
        forward_ms: ms(fwd),
        ema_ms: ms(ema),
        backward_ms: ms(bwd),
        optimizer_ms: ms(opt),
        peak_rss_mib: peak_rss_mib(),
        page_faults_per_step,
        peak_device_mib: peak_device.get(),
        device: format!("{:?}", run.device),
    })
}

/// Minor page faults of the process so far (getrusage).
fn minor_faults() -> Option<i64> {
    #[cfg(unix)]
    {
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes the struct it is given and nothing else.
        (unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0).then_some(usage.ru_minflt)
    }
    #[cfg(not(unix))]
    None
}

/// VmHWM from /proc/self/status (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
