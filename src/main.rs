use clap::Parser;

// Training allocates and frees many large tensors per step; the system allocator returns them to the
// OS and page-faults them back in (20% of a CPU step), mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // mimalloc still hands freed pages back to the OS ("purges") 10 ms after a free, sooner than a step
    // reuses them, so every step faulted them in again, zeroed by the kernel: ~900 faults of 2 MiB pages
    // and 17% of a tiny CPU step in clear_page. Each step reaches the same peak, so keeping them costs
    // no memory. `mi_option_purge_delay` of mimalloc.h (v2 and v3; libmimalloc-sys names no constant).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
    // One pool of compute threads (alignfuse::threads) runs every parallel CPU op: gemm's matmuls and the
    // fused ops. candle's own pool for its element-wise ops spins at barriers against it, so those ops run
    // on the calling thread (CANDLE_NUM_THREADS=1). The pool's size: RAYON_NUM_THREADS, else
    // CANDLE_NUM_THREADS, else every core (helpers spin only while parallel work keeps coming, so the data
    // workers get the cores in between); data-parallel ranks on one machine share the cores.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = cores / alignfuse::dist::env::local_ranks();
        let threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| threads.max(1).to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads);
    }
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    let threads = candle_core::utils::get_num_threads();
    let code = alignfuse::threads::run(threads, || {
        let result = alignfuse::cli::run(alignfuse::cli::Cli::parse()).and_then(|()| alignfuse::dist::finish());
        let Err(e) = result else { return 0 };
        // A run stopped by SIGINT / SIGTERM (with its checkpoint written) exits 130 / 143, as shells expect.
        let interrupted = e.chain().find_map(|c| c.downcast_ref::<alignfuse::train::Interrupted>());
        let code = interrupted.map_or(1, |i| i.exit_code());
        // With several ranks, a failure ends them all (a lone exit would leave the others waiting).
        if alignfuse::dist::on_error(&e, code) {
            eprintln!("error: {e:#}");
        }
        code
    });
    match code {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: cannot start {threads} compute threads: {e}");
            std::process::exit(1);
        }
    }
}
