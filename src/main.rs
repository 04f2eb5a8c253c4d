use clap::Parser;

// Training allocates and frees many large tensors per step; the system allocator returns them to the
// OS and page-faults them back in (20% of a CPU step), mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(e) = alignfuse::cli::run(alignfuse::cli::Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
