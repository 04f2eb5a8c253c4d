//! Data parallelism: one process per device ("rank"), all running the same steps on different parts of
//! each global batch, kept in step by a few collectives behind [`Dist`]:
//! - the gradients are all-reduced (averaged) in buckets before every optimiser step, so every rank
//!   applies the same update and the parameters stay bitwise identical;
//! - the momentum features and image ids are all-gathered before they enter the queues (ALBEF's
//!   `concat_all_gather`), so every rank's queue is the same;
//! - the step's losses and metrics are averaged, so the log and the non-finite checks agree;
//! - evaluation re-ranks a share of the images on each rank and sums the scores.
//!
//! Engines: [`Dist::single`] (one process, no library), MPI over CPU ranks (`--features mpi`, launched by
//! `mpirun`), NCCL over GPUs (`--features nccl`, launched by `alignfuse launch`, torchrun or SLURM; the
//! NCCL id travels over a TCP [`rendezvous`]). `Dist::from_env` picks one from the environment.

pub mod env;
pub mod launch;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
pub mod rendezvous;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use std::rc::Rc;

/// A collective engine: the operations data parallelism needs, on tensors of any device the engine
/// supports. Every rank must call the same operations in the same order with the same shapes.
pub trait Engine {
    /// `mpi`, `nccl` or `single`.
    fn name(&self) -> &'static str;
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The element-wise sum over ranks (f32, f64, i64).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's tensor concatenated along dimension 0 in rank order (same shape on every rank).
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s tensor on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job at once (a failed rank must not leave the others waiting in a
    /// collective).
    fn abort(&self, code: i32) -> !;
    /// Says the rank left on purpose (after the last collective), so the others do not take its exit for
    /// a crash.
    fn finish(&self) -> Result<()> {
        self.barrier()
    }
}

/// One process: every collective is the identity.
pub struct Single;

impl Engine for Single {
    fn name(&self) -> &'static str {
        "single"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A rank and the number of ranks: which share of the work is this process's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub rank: usize,
    pub world: usize,
}

impl Place {
    pub const SINGLE: Place = Place { rank: 0, world: 1 };
}

/// This process's place in the job and the engine that connects it to the others.
pub struct Dist {
    engine: Box<dyn Engine>,
    device: Option<Device>,
}

thread_local! {
    /// The process's job, set up once (MPI can be initialised only once per process) on the thread
    /// that trains.
    static CURRENT: std::cell::OnceCell<Rc<Dist>> = const { std::cell::OnceCell::new() };
}

/// This process's job (`Dist::from_env` on first use, then the same one): `device` is the config's
/// device setting.
pub fn current(device: &str) -> Result<Rc<Dist>> {
    CURRENT.with(|cell| {
        if let Some(d) = cell.get() {
            return Ok(Rc::clone(d));
        }
        let dist = Rc::new(Dist::from_env(device)?);
        if !dist.solo() {
            eprintln!("data parallel: rank {} of {} ({})", dist.rank(), dist.world(), dist.engine());
            // A panicking rank must end the job: unwinding would leave the others blocked in a collective
            // (and MPI_Finalize at exit would wait for them).
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                report(info);
                if let Some(dist) = existing() {
                    eprintln!("rank {} of {} panicked: stopping every rank", dist.rank(), dist.world());
                    dist.engine.abort(101);
                }
            }));
        }
        Ok(Rc::clone(cell.get_or_init(|| dist)))
    })
}

/// The device of the config's `device` setting for this process: the engine's GPU under NCCL.
pub fn device(spec: &str) -> Result<Device> {
    match current(spec)?.device() {
        Some(d) => Ok(d.clone()),
        None => crate::device(spec),
    }
}

/// The process's job if one was set up.
fn existing() -> Option<Rc<Dist>> {
    CURRENT.try_with(|cell| cell.get().cloned()).ok().flatten()
}

/// Called by `main` on an error: with several ranks, prints it with the rank and ends every rank (a
/// lone exit would leave the others blocked in a collective); a stop on a signal, which every rank
/// agreed on, ends this rank alone (rank 0 says where the checkpoint is). Returns whether `main`
/// should print the error.
pub fn on_error(e: &anyhow::Error, code: i32) -> bool {
    let Some(dist) = existing().filter(|d| d.world() > 1) else { return true };
    if e.chain().any(|c| c.downcast_ref::<crate::train::Interrupted>().is_some()) {
        let _ = dist.finish();
        return dist.is_main();
    }
    eprintln!("error on rank {} of {}: {e:#}", dist.rank(), dist.world());
    dist.engine.abort(code)
}

/// Called by `main` when the command succeeded: tells the other ranks this one is leaving on purpose.
pub fn finish() -> Result<()> {
    match existing() {
        Some(dist) => dist.finish(),
        None => Ok(()),
    }
}

impl Dist {
    pub fn single() -> Dist {
        Dist::new(Box::new(Single))
    }

    pub fn new(engine: Box<dyn Engine>) -> Dist {
        Dist { engine, device: None }
    }

    /// The job this process belongs to, from its launcher's environment ([`env::Launch`]): `mpirun`
    /// (MPI), `alignfuse launch` / torchrun / SLURM (NCCL, each rank on the GPU of its local rank), or
    /// none (one process). `device` is the config's device setting.
    fn from_env(device: &str) -> Result<Dist> {
        let Some(launch) = env::Launch::detect()? else { return Ok(Dist::single()) };
        // A launcher's world of one runs its engine when this build has it (one GPU measuring NCCL),
        // and is one plain process otherwise.
        let has_engine = match launch.launcher {
            env::Launcher::Mpi => cfg!(feature = "mpi"),
            env::Launcher::Env => cfg!(feature = "nccl") && device != "cpu",
        };
        if launch.world == 1 && !has_engine {
            return Ok(Dist::single());
        }
        match launch.launcher {
            env::Launcher::Mpi => {
                #[cfg(feature = "mpi")]
                return Ok(Dist::new(Box::new(mpi::Mpi::init(&launch)?)));
                #[cfg(not(feature = "mpi"))]
                bail!(
                    "launched by mpirun as rank {} of {}, but this build has no MPI engine: build with \
                     `cargo build --release --features mpi` (needs Debian's libopenmpi-dev and libclang-dev)",
                    launch.rank,
                    launch.world
                )
            }
            env::Launcher::Env => {
                ensure!(
                    device != "cpu",
                    "{} (set by {}) asks for data-parallel ranks over NCCL, but device = \"cpu\": set device = \
                     \"cuda\" (each rank takes the GPU of its LOCAL_RANK), or run CPU ranks with `mpirun -np N \
                     alignfuse train ...` from a --features mpi build",
                    launch.vars,
                    launch.source
                );
                #[cfg(feature = "nccl")]
                return nccl::Nccl::init(&launch)
                    .map(|(engine, device)| Dist { engine: Box::new(engine), device: Some(device) });
                #[cfg(not(feature = "nccl"))]
                bail!(
                    "{} (set by {}) asks for data-parallel ranks over NCCL, but this build has no NCCL engine: \
                     build with --features cuda,nccl (scripts/build-cuda.sh)",
                    launch.vars,
                    launch.source
                )
            }
        }
    }

    /// The device this job's engine is bound to (NCCL: the GPU of the local rank); `None` leaves the
    /// choice to the config.
    pub fn device(&self) -> Option<&Device> {
        self.device.as_ref()
    }

    pub fn rank(&self) -> usize {
        self.engine.rank()
    }

    /// One process without an engine: every collective is skipped. (An engine with a world of one
    /// still runs its collectives, which is how one GPU measures what NCCL costs.)
    pub fn solo(&self) -> bool {
        self.engine.name() == "single"
    }

    pub fn world(&self) -> usize {
        self.engine.world()
    }

    pub fn place(&self) -> Place {
        Place { rank: self.rank(), world: self.world() }
    }

    /// Rank 0, the one that writes checkpoints, logs and reports.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    pub fn engine(&self) -> &'static str {
        self.engine.name()
    }

    /// The mean over ranks (the tensor itself on one process).
    pub fn mean(&self, t: &Tensor) -> Result<Tensor> {
        if self.solo() {
            return Ok(t.clone());
        }
        Ok((self.engine.all_reduce_sum(t)? / self.world() as f64)?)
    }

    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.engine.all_reduce_sum(t)
    }

    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.engine.all_gather(t)
    }

    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.engine.broadcast(t, root)
    }

    pub fn barrier(&self) -> Result<()> {
        self.engine.barrier()
    }

    /// Every rank's bytes, in rank order (lengths may differ): the host-side state rank 0 must write
    /// for all (the shard stream positions of a checkpoint).
    pub fn all_gather_bytes(&self, bytes: &[u8], device: &Device) -> Result<Vec<Vec<u8>>> {
        if self.solo() {
            return Ok(vec![bytes.to_vec()]);
        }
        let len = Tensor::new(&[bytes.len() as i64], device)?;
        let lens: Vec<i64> = self.all_gather(&len)?.to_vec1()?;
        let longest = lens.iter().copied().max().unwrap_or(0) as usize;
        // One byte per i64 lane: the engines move i64 everywhere.
        let mut padded: Vec<i64> = bytes.iter().map(|&b| b as i64).collect();
        padded.resize(longest.max(1), 0);
        let all: Vec<i64> = self.all_gather(&Tensor::from_vec(padded, longest.max(1), device)?)?.to_vec1()?;
        let row = longest.max(1);
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &n)| all[r * row..r * row + n as usize].iter().map(|&b| b as u8).collect())
            .collect())
    }

    /// Runs `f` on rank 0 first and on the others after it finished (what rank 0 creates, such as the
    /// generated default data, is then there for them).
    pub fn main_first<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.is_main() {
            let out = f()?;
            self.barrier()?;
            return Ok(out);
        }
        self.barrier()?;
        f()
    }

    /// After the last collective: lets the others see this rank leave on purpose.
    pub fn finish(&self) -> Result<()> {
        self.engine.finish()
    }

    /// Per-rank name of a random stream: empty on rank 0, so a one-process run draws what it always drew.
    pub fn stream_label(&self) -> String {
        match self.rank() {
            0 => String::new(),
            r => format!("rank{r}"),
        }
    }
}

/// Checks that `t`'s dtype is one the engines move (f32, f64, i64).
pub fn supported(t: &Tensor) -> Result<()> {
    ensure!(
        matches!(t.dtype(), DType::F32 | DType::F64 | DType::I64),
        "collectives move f32, f64 and i64 tensors, not {:?}",
        t.dtype()
    );
    Ok(())
}

/// The shape of `world` tensors of `shape` stacked along dimension 0.
pub fn gathered_shape(shape: &candle_core::Shape, world: usize) -> Result<Vec<usize>> {
    let mut dims = shape.dims().to_vec();
    match dims.first_mut() {
        Some(d) => *d *= world,
        None => bail!("all_gather needs a tensor with at least one dimension"),
    }
    Ok(dims)
}
