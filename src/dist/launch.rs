//! `alignfuse launch`: starts the ranks of this machine as child processes with the environment
//! torchrun would give them, and supervises them: when one fails, the others are stopped (SIGTERM,
//! then SIGKILL after a grace period) and launch exits with the failed rank's code. SIGINT / SIGTERM
//! to launch reach every rank (a training rank then ends with a checkpoint, as on one process).

use anyhow::{ensure, Context, Result};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Where this machine's ranks sit in the job (`alignfuse launch`'s options).
#[derive(Debug, Clone, clap::Args)]
pub struct Plan {
    /// Ranks (GPUs) on this machine.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Machines in the job.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This machine's number, 0 .. nnodes (machine 0 hosts rank 0).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of machine 0, where the ranks meet.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
}

/// How long ranks get to stop after SIGTERM before they are killed.
const GRACE: Duration = Duration::from_secs(30);

/// Runs `args` (an alignfuse command line) as this node's ranks; returns the exit code for launch.
pub fn run(plan: &Plan, args: &[String]) -> Result<i32> {
    ensure!(plan.nproc_per_node >= 1 && plan.nnodes >= 1, "--nproc-per-node and --nnodes must be at least 1");
    ensure!(plan.node_rank < plan.nnodes, "--node-rank {} is not below --nnodes {}", plan.node_rank, plan.nnodes);
    ensure!(
        !args.is_empty(),
        "name the command the ranks run, e.g. `alignfuse launch --nproc-per-node 2 train --config ...`"
    );
    let exe = std::env::current_exe().context("cannot find the alignfuse executable")?;
    let world = plan.nproc_per_node * plan.nnodes;
    crate::train::signals::install()?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..plan.nproc_per_node {
        let rank = plan.node_rank * plan.nproc_per_node + local;
        let child = Command::new(&exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", plan.nproc_per_node.to_string())
            .env("MASTER_ADDR", &plan.master_addr)
            .env("MASTER_PORT", plan.master_port.to_string())
            .spawn()
            .with_context(|| format!("cannot start rank {rank} ({})", exe.display()));
        match child {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                stop(&mut children);
                return Err(e);
            }
        }
    }
    eprintln!("launch: started ranks {:?} of {world}", children.iter().map(|(r, _)| *r).collect::<Vec<_>>());
    supervise(children)
}

/// Waits for every rank; the first failure (or a signal to launch) stops the rest.
fn supervise(mut children: Vec<(usize, Child)>) -> Result<i32> {
    let mut forwarded = false;
    while !children.is_empty() {
        if let (Some(sig), false) = (crate::train::signals::requested(), forwarded) {
            eprintln!("launch: passing signal {sig} to the ranks");
            children.iter().for_each(|(_, c)| signal(c, libc::SIGTERM));
            forwarded = true;
        }
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait()? {
                None => i += 1,
                Some(status) => {
                    let (rank, _) = children.remove(i);
                    if !status.success() {
                        eprintln!("launch: rank {rank} failed ({status}); stopping the other ranks");
                        stop(&mut children);
                        return Ok(status.code().unwrap_or(1));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(0)
}

/// SIGTERM to every rank, SIGKILL to those still running after [`GRACE`].
fn stop(children: &mut [(usize, Child)]) {
    children.iter().for_each(|(_, c)| signal(c, libc::SIGTERM));
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline && children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}
