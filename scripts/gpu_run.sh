#!/usr/bin/env bash
# What runs ON the GPU host, in one go, from the repository root, with the
# bundle that scripts/gpu_bundle.sh built in .bundle/ (see docs/gpu.md):
#
#   scripts/gpu_run.sh            # everything: info, the whole suite, full benchmarks, PyTorch
#   scripts/gpu_run.sh --quick    # a smoke run: info, one test file, quick benchmarks
#   STEPS=bench,train,pytorch scripts/gpu_run.sh   # a subset (to fit a time limit per call)
#
# Steps: info (trainer info --json; nvidia-smi), test (deno task test), bench
# (deno task bench --markdown), train (the training-step benchmark as JSON),
# pytorch (bench/pytorch_compare.py at the same shapes, with ours/PyTorch).
# Logs go to $OUT (default out/gpu): run.log, info.json, test.log, bench.md,
# train_step.json, pytorch.md, pytorch.json, summary.txt. The exit status is
# that of the first failed step (0 if none failed); every step runs regardless.
#
# Needs nothing from the network: Deno, its npm cache and the Vulkan loader
# come from the bundle; the NVIDIA driver's Vulkan ICD from the host.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bundle="${BUNDLE_DIR:-$root/.bundle}"
OUT="${OUT:-$root/out/gpu}"
mkdir -p "$OUT"
quick=0
[ "${1:-}" = "--quick" ] && quick=1
steps="${STEPS:-info,test,bench,train,pytorch}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export NO_COLOR=1 DENO_NO_UPDATE_CHECK=1 DENO_NO_PROMPT=1 PYTHONUNBUFFERED=1

log() { echo "[gpu_run $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/run.log" >&2; }
want() { [[ ",$steps," == *",$1,"* ]]; }
# unxz without xz-utils, where the host lacks it.
unxz_to() {
  if command -v xz >/dev/null; then
    xz -dc "$1" >"$2"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
  fi
}
status=0
summary() {
  printf '%-8s %s\n' "$1" "$2" >>"$OUT/summary.txt"
  if [ "$2" != ok ] && [ "$status" -eq 0 ]; then status=1; fi
}
: >"$OUT/summary.txt"
log "root $root, bundle $bundle, OUT $OUT, steps $steps, quick $quick"

# --- Deno and its npm cache from the bundle (a deno on PATH is used if there is no bundle).
if [ -f "$bundle/deno.xz" ]; then
  mkdir -p "$work/bin"
  unxz_to "$bundle/deno.xz" "$work/bin/deno" && chmod +x "$work/bin/deno"
  export PATH="$work/bin:$PATH"
fi
if [ -f "$bundle/deno_dir.tar.xz" ]; then
  export DENO_DIR="$work/deno_dir"
  mkdir -p "$DENO_DIR"
  unxz_to "$bundle/deno_dir.tar.xz" "$work/deno_dir.tar" && tar -xf "$work/deno_dir.tar" -C "$DENO_DIR"
fi
command -v deno >/dev/null || {
  log "no deno: build the bundle first (scripts/gpu_bundle.sh)"
  exit 1
}
log "$(deno --version | head -1) from $(command -v deno); DENO_DIR ${DENO_DIR:-default}"

# --- Fixtures: tests read ../shared/fixtures, which does not travel with a checkout.
if [ ! -d "$root/../shared/fixtures" ] && [ -f "$bundle/fixtures.tar.xz" ]; then
  mkdir -p "$root/../shared"
  unxz_to "$bundle/fixtures.tar.xz" "$work/fixtures.tar" && tar -xf "$work/fixtures.tar" -C "$root/../shared"
  log "fixtures unpacked into $root/../shared/fixtures"
fi

# --- The Vulkan loader: unpacked beside us (not into /), found through LD_LIBRARY_PATH.
if [ -n "${FORCE_BUNDLED_VULKAN:-}" ] || ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1 '; then
  for f in "$bundle"/debs/*.deb; do
    [ -f "$f" ] && dpkg -x "$f" "$work/sysroot"
  done
  lib="$(dirname "$(find "$work/sysroot" -name 'libvulkan.so.1' 2>/dev/null | head -1)" 2>/dev/null)"
  if [ -n "$lib" ] && [ "$lib" != "." ]; then
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    log "Vulkan loader from the bundle: $lib"
  else
    log "warning: no libvulkan.so.1 on this host and none in $bundle/debs"
  fi
fi
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$nvidia_icd" ]; then
  export VK_DRIVER_FILES="$nvidia_icd"
fi
log "VK_DRIVER_FILES=${VK_DRIVER_FILES:-(loader default)}"
command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | tee -a "$OUT/run.log" >/dev/null

run_deno() { deno run --allow-read --allow-write --allow-env "$@"; }

# --- info: the adapter must be the NVIDIA one over Vulkan when the NVIDIA ICD is in use.
if want info; then
  if run_deno main.ts info --json >"$OUT/info.json" 2>>"$OUT/run.log"; then
    run_deno main.ts info 2>&1 | tee -a "$OUT/run.log" >/dev/null
    adapter="$(python3 -c 'import json,sys; a=json.load(open(sys.argv[1]))["adapter"]; print(a["name"], "|", a["backend"])' "$OUT/info.json" 2>/dev/null)"
    log "adapter: $adapter"
    if [ "${VK_DRIVER_FILES:-}" = "$nvidia_icd" ] && [[ "$adapter" != *NVIDIA* ]]; then
      log "error: the NVIDIA ICD is set but the adapter is not NVIDIA"
      summary info "wrong adapter: $adapter"
    else
      summary info ok
    fi
  else
    summary info failed
  fi
fi

# --- The test suite, tolerances unchanged.
if want test; then
  log "test suite"
  if [ "$quick" -eq 1 ]; then
    cmd=(deno test --allow-read --allow-write --allow-env --allow-run tests/kernels_matmul_test.ts)
  else
    cmd=(deno task test)
  fi
  if "${cmd[@]}" >"$OUT/test.log" 2>&1; then summary test ok; else summary test failed; fi
  tail -3 "$OUT/test.log" | tee -a "$OUT/run.log" >/dev/null
fi

# --- The benchmark tables (adapter named in the header).
if want bench; then
  log "deno task bench $([ "$quick" -eq 1 ] && echo --quick)"
  if [ "$quick" -eq 1 ]; then
    bench=(deno task bench --quick --markdown --only matmul,train)
  else
    bench=(deno task bench --markdown)
  fi
  if "${bench[@]}" >"$OUT/bench.md" 2>>"$OUT/run.log"; then summary bench ok; else summary bench failed; fi
fi

# --- The training step as JSON, for the PyTorch ratio (and the presets, from our code).
cat >"$work/train_json.ts" <<EOF
import { Gpu } from "$root/kernels/runtime.ts";
import { benchTrainStep } from "$root/bench/train_step_bench.ts";
import { peakFlopsFor } from "$root/train/peak.ts";
import { type ModelConfig, parameterCount, PRESETS } from "$root/model/config.ts";
import { initParameters } from "$root/model/params.ts";
import { modelLossAndGrads, toFloat64Params } from "$root/model/reference.ts";
import { Rng } from "$root/util/random.ts";
if (Deno.args[0] === "reference") {
  // A batch, weights, loss and gradients from our CPU reference model (float64) for
  // bench/pytorch_compare.py --check-reference: proof that the PyTorch model is ours.
  // Weights are scaled up (x4) and norm weights perturbed so that logits are O(1)
  // and every op (RoPE, GQA head mapping, norms, SwiGLU) moves the loss visibly.
  const dir = Deno.args[1];
  const cases: Record<string, ModelConfig> = {
    "tiny": { ...PRESETS.tiny, vocab_size: 256 },
    "tiny-qk-norm": { ...PRESETS.tiny, vocab_size: 256, qk_norm: true },
  };
  const index: Record<string, unknown> = {};
  for (const [name, config] of Object.entries(cases)) {
    const rng = new Rng(7);
    const p32 = initParameters(config, 3);
    for (const [k, t] of p32) {
      const isNorm = /norm/.test(k);
      for (let i = 0; i < t.length; i++) t[i] = isNorm ? 1 + 0.2 * rng.normal() : 4 * t[i];
    }
    const B = 2, T = 24;
    const ids = Int32Array.from({ length: B * T }, () => rng.nextInt(config.vocab_size));
    const targets = Int32Array.from({ length: B * T }, () => rng.nextInt(config.vocab_size));
    const { loss, grads } = modelLossAndGrads(config, toFloat64Params(p32), {
      ids, targets, mask: new Float32Array(B * T).fill(1), B, T,
    });
    const tensors: { name: string; length: number }[] = [];
    const chunks: Float32Array[] = [];
    for (const [k, t] of p32) {
      tensors.push({ name: k, length: t.length });
      chunks.push(t, Float32Array.from(grads.get(k)!));
    }
    const bytes = new Uint8Array(chunks.reduce((n, c) => n + c.byteLength, 0));
    let o = 0;
    for (const c of chunks) { bytes.set(new Uint8Array(c.buffer), o); o += c.byteLength; }
    await Deno.writeFile(dir + "/" + name + ".bin", bytes);
    index[name] = { config, B, T, ids, targets, loss, tensors };
  }
  await Deno.writeTextFile(dir + "/reference.json", JSON.stringify(index));
} else if (Deno.args[0] === "presets") {
  const out: Record<string, unknown> = {};
  for (const [k, c] of Object.entries(PRESETS)) out[k] = { ...c, parameters: parameterCount(c).total };
  console.log(JSON.stringify(out));
} else {
  const gpu = await Gpu.request();
  const peakFlops = peakFlopsFor(gpu.adapterSummary.name);
  const rows = await benchTrainStep(gpu, { quick: Deno.args[0] === "--quick", peakFlops });
  console.log(JSON.stringify({
    date: new Date().toISOString(),
    deno: Deno.version.deno,
    adapter: gpu.adapterSummary,
    peakFlops: peakFlops ?? null,
    rows,
  }, null, 2));
  gpu.destroy();
}
EOF
if want train; then
  log "training step (JSON)"
  if run_deno --config "$root/deno.json" "$work/train_json.ts" $([ "$quick" -eq 1 ] && echo --quick) \
    >"$OUT/train_step.json" 2>>"$OUT/run.log"; then
    summary train ok
  else
    summary train failed
  fi
fi

# --- PyTorch at the same shapes.
if want pytorch; then
  py="${PYTHON:-python3}"
  if ! "$py" -c 'import torch' 2>/dev/null; then
    log "PyTorch is not importable by $py"
    summary pytorch "no torch"
  elif [ ! -s "$OUT/train_step.json" ]; then
    log "no $OUT/train_step.json to compare with (run the train step)"
    summary pytorch "no ours"
  else
    run_deno --config "$root/deno.json" "$work/train_json.ts" presets >"$work/presets.json"
    mkdir -p "$work/reference"
    run_deno --config "$root/deno.json" "$work/train_json.ts" reference "$work/reference"
    log "$py bench/pytorch_compare.py --check-reference (PyTorch model vs our CPU reference)"
    if ! "$py" bench/pytorch_compare.py --check-reference "$work/reference" --device cpu \
      >>"$OUT/run.log" 2>&1; then
      summary pytorch "model differs from ours"
    fi
    args=(--ours "$OUT/train_step.json" --presets "$work/presets.json" --json "$OUT/pytorch.json")
    [ "$quick" -eq 1 ] && args+=(--warmup 1 --steps 2)
    log "$py bench/pytorch_compare.py ${args[*]}"
    if "$py" bench/pytorch_compare.py "${args[@]}" >"$OUT/pytorch.md" 2>>"$OUT/run.log"; then
      summary pytorch ok
    else
      summary pytorch failed
    fi
    cat "$OUT/pytorch.md" >>"$OUT/run.log"
  fi
fi

log "summary:"
tee -a "$OUT/run.log" <"$OUT/summary.txt" >&2
exit "$status"
