use clap::Parser;

fn main() {
    if let Err(e) = alignfuse::cli::run(alignfuse::cli::Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
