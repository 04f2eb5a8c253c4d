// Compiles kernels/*.cu to PTX with nvcc when the `cuda` feature is on; the ops embed the PTX with
// `include_str!(concat!(env!("OUT_DIR"), "/<name>.ptx"))`. CPU builds need no CUDA toolkit, so this
// returns at once without the feature. It also runs under `cargo check`, so a kernel that does not
// compile fails the check (.ci/cuda-check.sh).
//
// nvcc: `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH. Target: `compute_$CUDA_COMPUTE_CAP`
// (90 for the H100/H200), default 80 (PTX is JIT-compiled forward to newer GPUs).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = manifest.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());

    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| Path::new(&h).join("bin").join("nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: u32 = cap
        .trim()
        .replace('.', "")
        .parse()
        .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP={cap:?} is not a compute capability such as 90"));

    let mut files: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", kernels.display()))
        .map(|entry| entry.expect("readable kernels/ entry").path())
        .collect();
    files.sort();
    // Headers included by the .cu files count too.
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    // PTX of a kernel file since removed or renamed would stay in OUT_DIR (and in .ci/cuda-check.sh's checks).
    for entry in std::fs::read_dir(&out_dir).expect("cargo creates OUT_DIR").flatten() {
        if entry.path().extension().is_some_and(|e| e == "ptx") {
            std::fs::remove_file(entry.path())
                .unwrap_or_else(|e| panic!("cannot remove {}: {e}", entry.path().display()));
        }
    }
    for src in files.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
        let ptx = out_dir.join(src.file_stem().expect("a .cu file has a stem")).with_extension("ptx");
        let output = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(src)
            .arg("-o")
            .arg(&ptx)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {} (install the CUDA toolkit or set NVCC / CUDA_HOME): {e}", nvcc.display())
            });
        if !output.status.success() {
            panic!(
                "nvcc failed on {}:\n{}{}",
                src.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
