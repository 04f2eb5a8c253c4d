#!/usr/bin/env bash
# The GPU checks in one call, for a machine lent with an NVIDIA GPU, a CUDA 13 driver and a PyTorch install (whose
# nvidia-* packages provide libcublas, libcurand, libcudart, libnvrtc) and no network or Rust toolchain. Carry the
# binary built here by scripts/build-cuda.sh (dist/alignfuse-cuda.xz). Prints the GPU and driver, runs every
# check, writes each one's JSON into OUTDIR (replacing an earlier call's) and ends with one table. Sized for under 8 minutes on an H200.
#   scripts/gpu-check.sh OUTDIR
#   ALIGNFUSE_GPU_CHECK_DEVICE=cpu ALIGNFUSE_BIN=target/release/alignfuse scripts/gpu-check.sh OUTDIR
#     is the same plumbing on the CPU with small sizes (what this repository's machine can try).
# Checks: (a) bench kernels: every custom op against the plain composition, values and gradients, and GB/s next
# to a measured device copy; (b) bench train on configs/albef-base.toml (ViT-B/16 at 256 px, batch 64) in fp32,
# tf32 and bf16 with the fused kernels, fp32 with the reference ones, and fp32 with the ViT blocks recomputed
# (train.grad_checkpoint); (c) the PyTorch eager baseline of the same step (benches/torch_step.py: same model, batch and
# caption length) in fp32, tf32 and bf16 autocast, and the alignfuse / PyTorch ratio; (d) the README main job
# (configs/tiny.toml) on the device, with its test table; (e) bench rerank and a standalone eval of the main job's
# checkpoint; (f) the same seed twice gives the same 10 steps; (g) the NCCL engine with a world of one
# (`alignfuse launch --nproc-per-node 1`: gradient buckets and feature gathers run through NCCL on the one card)
# against (b)'s fp32 step time. GPU memory is total minus free (nvidia-smi's
# count), sampled the same way for both implementations.
# PYTHON names the interpreter with torch (default python3).
# Every check runs on its own, most important first, with its output in OUTDIR/NAME.log: one that fails, hangs
# or runs out of the call's time is marked in the table and the others still run (a device call is scarce). ALIGNFUSE_GPU_CHECK_DEADLINE (seconds,
# default 500) bounds all the checks together, ALIGNFUSE_GPU_CHECK_TIMEOUT (default 240) any one of them.
set -uo pipefail
out="${1:?usage: scripts/gpu-check.sh OUTDIR}"
mkdir -p "$out"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
device="${ALIGNFUSE_GPU_CHECK_DEVICE:-cuda}"
work="${TMPDIR:-/tmp}/alignfuse-gpu-check"
rm -rf "$work" && mkdir -p "$work" || exit 1
deadline="${ALIGNFUSE_GPU_CHECK_DEADLINE:-500}"
limit="${ALIGNFUSE_GPU_CHECK_TIMEOUT:-240}"

bin="${ALIGNFUSE_BIN:-}"
if [[ -z "$bin" ]]; then
    bin="$work/alignfuse"
    xz -dc dist/alignfuse-cuda.xz > "$bin" && chmod +x "$bin" || { echo "cannot unpack dist/alignfuse-cuda.xz" >&2; exit 1; }
fi
if [[ "$device" != cpu ]]; then
    # torch's CUDA libraries and the driver's libcuda.
    libs=$(find / -xdev \( -path '*/site-packages/nvidia/*' -o -path /usr/local/nvidia/lib64 \) \
        \( -name 'libcublas*.so*' -o -name 'libcurand.so*' -o -name 'libcudart.so*' -o -name 'libnvrtc.so*' \
        -o -name 'libcuda.so*' -o -name 'libnccl.so*' \) -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
    export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    steps=10
    cfg=configs/albef-base.toml
else
    echo "dry run on the CPU (small sizes)" | tee "$out/gpu.txt"
    steps=2
    cfg=configs/tiny.toml
fi
base=(--config "$cfg" --set device="$device")
py="${PYTHON:-python3}"
tiny=(--config configs/tiny.toml --set device="$device")
status="$out/status.tsv"
: > "$status"

# check NAME COMMAND...: runs COMMAND with its output in OUTDIR/NAME.log and its exit status and seconds in
# status.tsv; skipped when less than 20 s of the deadline are left.
check() {
    local name=$1 left=$((deadline - SECONDS))
    shift
    if ((left < 20)); then
        printf '%s\tskipped\t0\n' "$name" >> "$status"
        return
    fi
    echo "+ $*" >&2
    local t0=$SECONDS rc=0
    timeout "$((left < limit ? left : limit))" "$@" > "$out/$name.log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$status"
    if ((rc != 0)); then
        echo "  $name failed (exit $rc); its log ends:" >&2
        tail -n 5 "$out/$name.log" | sed 's/^/    /' >&2
    fi
}

# The caption length PyTorch runs at: the one alignfuse's fp32 step measured (20 when that step failed).
tokens() {
    "$py" -c "import json, sys; print(round(json.load(open(sys.argv[1]))['tokens']))" "$out/train-fp32.json" 2>/dev/null || echo 20
}
torch_step() {
    check "torch-$1" "$py" benches/torch_step.py --config "$cfg" --device "${device%%:*}" --precision "$1" \
        --steps "$steps" --tokens "$(tokens)" --threads "$(nproc)" --json "$out/torch-$1.json"
}
train_step() {
    local name=$1
    shift
    check "train-$name" "$bin" bench train "${base[@]}" "$@" --steps "$steps" --json "$out/train-$name.json" --overwrite
}

check kernels "$bin" bench kernels "${base[@]}" --steps "$steps" --json "$out/kernels.json" --overwrite
for precision in fp32 bf16 tf32; do
    train_step $precision --set train.precision=$precision
    torch_step $precision
done
main_job=("${tiny[@]}")
[[ "$device" == cpu ]] && main_job+=(--set data.synth_n=200 --set train.epochs=1)
check main-job "$bin" train "${main_job[@]}" --out "$work/tiny"
test_ann=$(ls "$work"/tiny/data/*/test.json 2>/dev/null)
check eval "$bin" eval "${main_job[@]}" --checkpoint "$work/tiny/checkpoints/latest" --ann "${test_ann:-missing}" \
    --json "$out/eval.json" --overwrite
# (f) a seed reproduces a run on the same device (dropout and ITM noise from the device's generator).
for r in 1 2; do
    check "repro-$r" "$bin" train "${tiny[@]}" --set data.synth_n=500 --set train.epochs=1 --max-steps 10 \
        --out "$work/repro-$r"
    cp "$work/repro-$r/log.jsonl" "$out/repro-$r.jsonl" 2>/dev/null
done
check rerank "$bin" bench rerank "${tiny[@]}" --json "$out/rerank.json" --overwrite
train_step reference --set kernels=reference
train_step checkpoint --set train.grad_checkpoint=true
# (g) NCCL with one rank (one card cannot hold two NCCL ranks): the collectives' cost inside a step.
if [[ "$device" != cpu ]]; then
    check train-nccl "$bin" launch --nproc-per-node 1 --master-port 29517 bench train "${base[@]}" \
        --set train.precision=fp32 --steps "$steps" --json "$out/train-nccl.json" --overwrite
fi

python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = []
status = {}
for line in (out / "status.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    status[name] = (rc, seconds)

def load(name):
    """A check's JSON, or None (and a row saying why) when the check did not write it."""
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        rc, seconds = status.get(name, ("not run", "0"))
        why = "skipped: out of time" if rc == "skipped" else f"exit {rc} after {seconds} s, see {name}.log"
        rows.append((f"{name}: NO RESULT", why, "", ""))
        return None

train = {}
for name in ("fp32", "tf32", "bf16", "reference", "checkpoint"):
    t = train[name] = load(f"train-{name}")
    if t is None:
        continue
    ms = t["data_ms"] + t["forward_ms"] + t["ema_ms"] + t["backward_ms"] + t["optimizer_ms"]
    what = {"reference": "fp32, reference kernels", "checkpoint": "fp32, ViT blocks recomputed"}.get(name, f"{name}, fused kernels")
    mem = f"GPU in use {t['peak_device_mib']:.0f} MiB" if t.get("peak_device_mib") else f"peak RSS {t['peak_rss_mib'] or 0:.0f} MiB"
    rows.append((f"alignfuse bench train ({what}) b{t['batch_size']} on {t['device']}",
                 f"{t['compute_pairs_per_s']:.1f} pairs/s", f"{ms:.1f} ms/step", mem))
for precision in ("fp32", "tf32", "bf16"):
    t = load(f"torch-{precision}")
    if t is None:
        continue
    mem = f"GPU in use {t['device_used_mib']:.0f} MiB" if t.get("device_used_mib") else f"peak {t['peak_mib']:.0f} MiB"
    rows.append((f"torch {t['torch']} eager {precision} b{t['batch_size']}", f"{t['pairs_per_s']:.1f} pairs/s",
                 f"{t['ms_per_step']:.1f} ms/step", mem))
    if train[precision]:
        ratio = train[precision]["compute_pairs_per_s"] / t["pairs_per_s"]
        rows.append((f"  alignfuse / torch, {precision}", f"{ratio:.2f}x", "", ""))
if "train-nccl" in status:
    n = load("train-nccl")
    if n and train["fp32"]:
        f = train["fp32"]
        rows.append(("NCCL engine, world 1, fp32", f"{n['compute_pairs_per_s']:.1f} pairs/s",
                     f"{n['compute_pairs_per_s'] / f['compute_pairs_per_s']:.3f}x of one process",
                     f"optimizer {n['optimizer_ms']:.1f} vs {f['optimizer_ms']:.1f} ms"))
k = load("kernels")
if k:
    for op in k["ops"]:
        # Against the f64 answer: in bf16 the reference composition can be the less accurate one (ITC's
        # log-softmax over 65600 columns: 3e0 off where the fused op is 6e-3 off).
        err = max(e["fused_vs_exact"] for e in op["errors"])
        ref = max(e["reference_vs_exact"] for e in op["errors"])
        rows.append((f"op {op['name']} {op['dtype']}", f"fused {op['fused_ms']:.3f} ms",
                     f"reference {op['reference_ms']:.3f} ms", f"err vs f64 {err:.1e} (ref {ref:.1e})"))
    rows.append(("device copy", f"{k['copy']['gbps']:.0f} GB/s", "", ""))
e = load("eval")
if e:
    rows.append(("main job test r_mean", f"ITC {e['itc']['r_mean']:.2f}", f"re-ranked {e['rerank']['r_mean']:.2f}", ""))

def steps(f):
    keys = ("step", "loss", "losses", "metrics", "grad_norm")
    try:
        lines = (out / f).read_text().splitlines()
    except OSError:
        return []
    return [tuple(json.dumps(r[k], sort_keys=True) for k in keys) for r in map(json.loads, lines) if r["kind"] == "step"]

a, b = steps("repro-1.jsonl"), steps("repro-2.jsonl")
same = "identical" if a == b and a else ("NO RESULT" if not (a and b) else "DIFFERENT")
rows.append(("same seed twice (10 steps)", same, f"{len(a)} and {len(b)} steps", ""))
r = load("rerank")
if r:
    rows.append((f"bench rerank ({r['pairs']} pairs)", f"K/V reuse {r['pairs'] / r['reuse_kv_s']:.0f} pairs/s",
                 f"plain {r['pairs'] / r['plain_s']:.0f} pairs/s", ""))
failed = [n for n, (rc, _) in status.items() if rc != "0"]
rows.append(("checks", f"{len(status) - len(failed)} of {len(status)} passed", "", ""))
width = [max(len(row[i]) for row in rows) for i in range(4)]
for row in rows:
    print("  ".join(cell.ljust(w) for cell, w in zip(row, width)).rstrip())
if failed:
    print("not passed (logs in OUTDIR):", ", ".join(failed))
PY
