//! How ranks launched by environment variables find each other: rank 0 listens at
//! MASTER_ADDR:MASTER_PORT, every other rank connects and says who it is, and rank 0 hands each the
//! same blob (the NCCL unique id). The connections then stay open as a watchdog: a rank that dies
//! closes them, and the ranks it was connected to stop too instead of waiting in a collective forever.

use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Sent on a watchdog connection by a rank that finished on purpose.
const DONE: u8 = 1;

/// The open connections of a joined rank: rank 0 holds one per other rank, the others one to rank 0.
pub struct Rendezvous {
    rank: usize,
    peers: Vec<(usize, TcpStream)>,
}

/// How long a rank waits for the others to join (`ALIGNFUSE_RENDEZVOUS_TIMEOUT`, seconds; 300 by default).
pub fn timeout() -> Duration {
    let secs = std::env::var("ALIGNFUSE_RENDEZVOUS_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    Duration::from_secs(secs)
}

/// Joins rank `rank` of `world` at `master` (rank 0 listens there): returns the blob rank 0's `make`
/// produced, or an error naming who did not come within `timeout`.
pub fn join(
    master: (&str, u16), rank: usize, world: usize, timeout: Duration, make: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<(Vec<u8>, Rendezvous)> {
    let deadline = Instant::now() + timeout;
    if rank == 0 {
        let listener = TcpListener::bind(("0.0.0.0", master.1))
            .with_context(|| format!("rank 0 cannot listen on port {} (MASTER_PORT): is it in use?", master.1))?;
        listener.set_nonblocking(true)?;
        let mut peers: Vec<(usize, TcpStream)> = Vec::new();
        while peers.len() + 1 < world {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(
                        deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
                    ))?;
                    let mut hello = [0u8; 16];
                    s.read_exact(&mut hello).context("a rank connected but did not say who it is")?;
                    let (r, w) = (u64_at(&hello, 0) as usize, u64_at(&hello, 8) as usize);
                    ensure!(w == world, "rank {r} joined a job of {w} ranks, rank 0's has {world}: every rank needs the same WORLD_SIZE");
                    ensure!(
                        r > 0 && r < world && !peers.iter().any(|(p, _)| *p == r),
                        "two processes joined as rank {r}"
                    );
                    peers.push((r, s));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let mut missing: Vec<usize> =
                            (1..world).filter(|r| !peers.iter().any(|(p, _)| p == r)).collect();
                        missing.truncate(8);
                        bail!(
                            "rank 0: {} of {world} ranks joined at port {} within {} s; missing ranks {missing:?} (did \
                             they start, with the same MASTER_ADDR and MASTER_PORT? raise ALIGNFUSE_RENDEZVOUS_TIMEOUT \
                             for slow starts)",
                            peers.len() + 1,
                            master.1,
                            timeout.as_secs()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context("rank 0: accepting a rank's connection"),
            }
        }
        let blob = make()?;
        for (_, s) in &mut peers {
            s.write_all(&(blob.len() as u64).to_le_bytes())?;
            s.write_all(&blob)?;
            s.set_read_timeout(None)?;
        }
        peers.sort_by_key(|(r, _)| *r);
        return Ok((blob, Rendezvous { rank, peers }));
    }
    let mut stream = loop {
        let addr = (master.0, master.1).to_socket_addrs().ok().and_then(|mut a| a.next());
        match addr.map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2))) {
            Some(Ok(s)) => break s,
            _ if Instant::now() >= deadline => bail!(
                "rank {rank}: could not reach rank 0 at {}:{} (MASTER_ADDR:MASTER_PORT) within {} s: is rank 0 \
                 running, and is the address right?",
                master.0,
                master.1,
                timeout.as_secs()
            ),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut hello = [0u8; 16];
    hello[..8].copy_from_slice(&(rank as u64).to_le_bytes());
    hello[8..].copy_from_slice(&(world as u64).to_le_bytes());
    stream.write_all(&hello)?;
    stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))?;
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).with_context(|| {
        format!(
            "rank {rank}: rank 0 did not send the job's id within {} s (some rank may be missing)",
            timeout.as_secs()
        )
    })?;
    let mut blob = vec![0u8; u64_at(&len, 0) as usize];
    stream.read_exact(&mut blob).context("rank 0 closed the connection while sending the job's id")?;
    stream.set_read_timeout(None)?;
    Ok((blob, Rendezvous { rank, peers: vec![(0, stream)] }))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Rendezvous {
    /// Watches every connection on its own thread; `lost(message)` runs when a peer's connection ends
    /// without it having said it finished (the engine exits the process there).
    pub fn watch(&self, lost: fn(String)) -> Result<()> {
        for (peer, stream) in &self.peers {
            let (me, peer, mut stream) = (self.rank, *peer, stream.try_clone()?);
            std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                match stream.read(&mut byte) {
                    Ok(1) if byte[0] == DONE => {}
                    _ => lost(format!(
                        "rank {me}: rank {peer} left the job without finishing (it failed, exited or was killed); \
                         stopping this rank too"
                    )),
                }
            });
        }
        Ok(())
    }

    /// Tells every connected rank that this one finishes on purpose.
    pub fn finish(&self) -> Result<()> {
        for (_, mut s) in self.peers.iter().map(|(r, s)| (r, s)) {
            s.write_all(&[DONE])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn every_rank_gets_rank_0s_blob_and_a_missing_rank_is_named() {
        let port = free_port();
        let world = 3;
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                std::thread::spawn(move || {
                    join(("127.0.0.1", port), rank, world, Duration::from_secs(20), || Ok(b"the-id".to_vec()))
                        .map(|(b, _)| b)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), b"the-id");
        }
        let port = free_port();
        let peer =
            std::thread::spawn(move || join(("127.0.0.1", port), 1, 3, Duration::from_millis(1500), || Ok(vec![])));
        let err = join(("127.0.0.1", port), 0, 3, Duration::from_millis(800), || Ok(vec![1])).err().unwrap();
        assert!(format!("{err:#}").contains("2 of 3 ranks joined") && format!("{err:#}").contains("[2]"), "{err:#}");
        assert!(peer.join().unwrap().is_err());
        let lonely = join(("127.0.0.1", free_port()), 1, 2, Duration::from_millis(300), || Ok(vec![])).err().unwrap();
        assert!(format!("{lonely:#}").contains("could not reach rank 0"), "{lonely:#}");
    }

    #[test]
    fn the_watchdog_tells_a_crash_from_a_finish() {
        static LOST: std::sync::Mutex<Option<mpsc::Sender<String>>> = std::sync::Mutex::new(None);
        let (tx, rx) = mpsc::channel();
        *LOST.lock().unwrap() = Some(tx);
        fn lost(m: String) {
            let _ = LOST.lock().unwrap().as_ref().unwrap().send(m);
        }
        for crash in [false, true] {
            let port = free_port();
            let peer = std::thread::spawn(move || {
                join(("127.0.0.1", port), 1, 2, Duration::from_secs(20), || Ok(vec![])).unwrap().1
            });
            let (_, zero) = join(("127.0.0.1", port), 0, 2, Duration::from_secs(20), || Ok(vec![7])).unwrap();
            zero.watch(lost).unwrap();
            let one = peer.join().unwrap();
            if !crash {
                one.finish().unwrap();
            }
            drop(one);
            let got = rx.recv_timeout(Duration::from_millis(500));
            match crash {
                true => assert!(got.unwrap().contains("rank 1 left the job without finishing")),
                false => assert!(got.is_err(), "a finished rank was taken for a crash"),
            }
        }
    }
}
