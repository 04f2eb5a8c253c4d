//! The compute threads: one rayon pool that runs the command and every parallel CPU op in it (candle's
//! matmuls through gemm, the fused ops), with its helper threads kept spinning between parallel sections.
//!
//! Why spin: a training step is thousands of parallel sections of 10 µs - 1 ms with short serial gaps.
//! An idle rayon worker goes to sleep after a few dozen yields, and waking it takes longer than most
//! sections last, so the thread that issued the section did all of it alone (measured: the second thread
//! ran 0.3% of gemm's samples). OpenMP, under PyTorch, spins its workers for the same reason. Here a helper
//! that has had no work for `IDLE_LIMIT` stops spinning and sleeps as rayon's workers do; the next
//! section's [`wake`] starts it again.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a helper spins without finding work before it sleeps: longer than the serial gaps inside a
/// step (a few hundred µs at most), shorter than a data wait or a checkpoint write.
const IDLE_LIMIT: Duration = Duration::from_millis(5);

/// Helpers spinning now (or woken and about to).
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// What a thread is to the pool.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// Not one of the pool's threads (tests, data workers, rayon's global pool).
    Outside,
    /// The thread that runs the command; never captured by a spin loop.
    Driver,
    Helper,
    /// A helper running the side of an [`overlap`]: like the driver, never held by a spin loop (its
    /// side would wait for it), but it still counts out of [`SPINNING`].
    Side,
}

thread_local! {
    static ROLE: Cell<Role> = const { Cell::new(Role::Outside) };
}

/// Runs `f` on a pool of `threads` compute threads (the calling thread waits).
pub fn run<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> std::io::Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        // Backpropagation recurses once per graph node: give the workers a main thread's stack and more.
        .stack_size(64 << 20)
        .thread_name(|i| format!("alignfuse-compute-{i}"))
        .start_handler(|_| ROLE.set(Role::Helper))
        .build()
        .map_err(std::io::Error::other)?;
    Ok(pool.install(|| {
        ROLE.set(Role::Driver);
        let result = f();
        ROLE.set(Role::Helper);
        result
    }))
}

/// Starts every helper of the pool spinning unless they already are; called before parallel work. Does
/// nothing outside the pool.
pub fn wake() {
    if ROLE.get() == Role::Outside {
        return;
    }
    let helpers = rayon::current_num_threads() - 1;
    if helpers > 0 && SPINNING.compare_exchange(0, helpers, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        // One job per thread, so each helper spins on its own thread (the driver's copy returns at once).
        rayon::spawn_broadcast(|_| spin());
    }
}

/// A helper's loop: runs whatever parallel work appears, until none has for `IDLE_LIMIT`.
fn spin() {
    // The driver picks up queued jobs while it waits inside a parallel section of its own; it must not
    // stay here (its own work would wait for the spin to end).
    match ROLE.get() {
        Role::Helper => {
            let mut last_work = Instant::now();
            loop {
                match rayon::yield_now() {
                    Some(rayon::Yield::Executed) => last_work = Instant::now(),
                    _ if last_work.elapsed() > IDLE_LIMIT => break,
                    _ => std::hint::spin_loop(),
                }
            }
            SPINNING.fetch_sub(1, Ordering::Relaxed);
        }
        Role::Side => {
            SPINNING.fetch_sub(1, Ordering::Relaxed);
        }
        Role::Driver | Role::Outside => {}
    }
}

/// `(main(), side())`, with `side` on another compute thread while this one runs `main`, when tensors on
/// `device` are computed by the CPU and this is the driver of a pool of two or more; otherwise `main` then
/// `side` here (a GPU queues both on one stream anyway). For two independent chains of small ops (the
/// momentum encoders beside the online ones, two graphs' backwards): one op at a time splits poorly over
/// two threads, and the serial work between ops (candle's backward bookkeeping) not at all; two chains
/// side by side keep both threads busy. Which thread runs what changes no value.
pub fn overlap<A, B: Send>(
    device: &candle_core::Device, main: impl FnOnce() -> A, side: impl FnOnce() -> B + Send,
) -> (A, B) {
    if !device.is_cpu() || ROLE.get() != Role::Driver || rayon::current_num_threads() < 2 {
        let a = main();
        return (a, side());
    }
    // A spinning helper takes the side at once, before the driver's own sections could pop it back.
    wake();
    let mut b = None;
    let a = rayon::in_place_scope(|scope| {
        scope.spawn(|_| {
            let role = ROLE.get();
            if role == Role::Helper {
                ROLE.set(Role::Side);
            }
            b = Some(side());
            ROLE.set(role);
        });
        main()
    });
    (a, b.expect("a scope returns after its jobs"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Woken helpers spin, take part in parallel sections, and go back to sleep once work stops; the
    /// driver is never held by a spin loop, and nothing spins outside the pool. (How long they spin is
    /// not checked: under a loaded machine a helper's last job can end long before the section does.)
    #[test]
    fn helpers_spin_while_there_is_work_then_sleep() -> std::io::Result<()> {
        wake();
        assert_eq!(SPINNING.load(Ordering::Relaxed), 0, "woken outside the pool");
        run(2, || {
            wake();
            assert_eq!(SPINNING.load(Ordering::Relaxed), 1);
            let busy = |_| {
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(300) {}
                rayon::current_thread_index()
            };
            let threads: std::collections::BTreeSet<_> = (0..60).into_par_iter().map(busy).collect();
            assert_eq!(threads.len(), 2, "threads that took jobs: {threads:?}");
            let t = Instant::now();
            while SPINNING.load(Ordering::Relaxed) > 0 {
                assert!(t.elapsed() < Duration::from_secs(5), "helpers still spinning");
                std::thread::sleep(IDLE_LIMIT);
            }
        })
    }
}
