//! Where a process stands in a job, read from what its launcher set: `mpirun` (OpenMPI's
//! `OMPI_COMM_WORLD_*`, MPICH's `PMI_*`), torchrun and `alignfuse launch` (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), or SLURM's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_LOCALID`, with `MASTER_ADDR` / `MASTER_PORT` from the batch script).

use anyhow::{ensure, Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `mpirun`: the MPI engine connects the ranks.
    Mpi,
    /// Environment variables and a TCP rendezvous at MASTER_ADDR:MASTER_PORT (NCCL).
    Env,
}

#[derive(Debug, Clone)]
pub struct Launch {
    pub launcher: Launcher,
    pub rank: usize,
    pub world: usize,
    /// Rank among the processes of this machine: the GPU it takes.
    pub local_rank: usize,
    /// MASTER_ADDR:MASTER_PORT (Env launches).
    pub master: Option<(String, u16)>,
    /// Who set the variables, for messages.
    pub source: &'static str,
    /// The variables read, for messages: `RANK=1 WORLD_SIZE=2`.
    pub vars: String,
}

impl Launch {
    /// The job of this process from the environment; `None` when no launcher started it.
    pub fn detect() -> Result<Option<Launch>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Launch::detect`] over any variable lookup (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let sets: [(Launcher, &'static str, [&str; 3]); 4] = [
            (
                Launcher::Mpi,
                "mpirun (OpenMPI)",
                ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"],
            ),
            (Launcher::Mpi, "mpirun (MPICH)", ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"]),
            (Launcher::Env, "torchrun / alignfuse launch", ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
            (Launcher::Env, "SLURM", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]),
        ];
        for (launcher, source, [rank_var, world_var, local_var]) in sets {
            let Some(world) = var(world_var) else { continue };
            let number = |name: &str, value: &str| -> Result<usize> {
                value.trim().parse().with_context(|| format!("{name}={value} (set by {source}) is not a number"))
            };
            let world = number(world_var, &world)?;
            let rank = match var(rank_var) {
                Some(r) => number(rank_var, &r)?,
                None => anyhow::bail!("{world_var}={world} is set (by {source}) but {rank_var} is not"),
            };
            ensure!(world >= 1 && rank < world, "{rank_var}={rank} is not below {world_var}={world} (set by {source})");
            let local_rank = var(local_var).map(|v| number(local_var, &v)).transpose()?.unwrap_or(0);
            let master = match launcher {
                Launcher::Env if world > 1 => {
                    let addr = var("MASTER_ADDR").with_context(|| {
                        format!("{world_var}={world} (set by {source}) needs MASTER_ADDR, the host of rank 0")
                    })?;
                    let port = var("MASTER_PORT")
                        .with_context(|| format!("{world_var}={world} (set by {source}) needs MASTER_PORT"))?;
                    let port =
                        port.trim().parse().with_context(|| format!("MASTER_PORT={port} is not a port number"))?;
                    Some((addr, port))
                }
                _ => None,
            };
            let vars = format!("{rank_var}={rank} {world_var}={world}");
            return Ok(Some(Launch { launcher, rank, world, local_rank, master, source, vars }));
        }
        Ok(None)
    }
}

/// Ranks on this machine, as the launchers say (1 when none does): each takes its share of the cores.
pub fn local_ranks() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn launchers_are_recognised_and_bad_settings_named() {
        assert!(detect(&[]).unwrap().is_none());
        let alone = detect(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap().unwrap();
        assert_eq!((alone.world, alone.master), (1, None));
        let mpi = detect(&[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1")]).unwrap().unwrap();
        assert_eq!((mpi.launcher, mpi.rank, mpi.world, mpi.master), (Launcher::Mpi, 1, 2, None));
        let torchrun = [
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ];
        let env = detect(&torchrun).unwrap().unwrap();
        assert_eq!((env.launcher, env.rank, env.local_rank), (Launcher::Env, 3, 1));
        assert_eq!(env.master, Some(("node0".to_string(), 29500)));
        let slurm = detect(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "n"),
            ("MASTER_PORT", "1"),
        ]);
        assert_eq!(slurm.unwrap().unwrap().source, "SLURM");
        let err = |v: &[(&str, &str)]| format!("{:#}", detect(v).unwrap_err());
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "0")]).contains("MASTER_ADDR"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")]).contains("RANK=2")
        );
        assert!(err(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("WORLD_SIZE=two"));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not"));
    }
}
