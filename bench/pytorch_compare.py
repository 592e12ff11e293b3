#!/usr/bin/env python3
"""PyTorch on the same model shape and batch as `trainer`'s training-step benchmark.

Times one full training step (forward, backward, global-norm clipping, AdamW)
of our Llama-style model written in plain torch (no transformers): token
embedding, L x [RMSNorm -> attention (GQA, RoPE rotate-half, causal) ->
residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> head tied to the
embedding; optional QK-norm. Same parameter count as ours (checked), same
optimizer settings as bench/train_step_bench.ts (lr 1e-4, betas 0.9/0.95,
eps 1e-8, weight decay 0.1, clip 1).

Two PyTorch modes, as a PyTorch user would run them:
  fp32   eager FP32, TF32 off (matmuls and cuDNN in true FP32: the same
         arithmetic as our WGSL kernels, so the fair "same math" baseline)
  bf16   eager with torch.autocast(bfloat16) over FP32 master weights (what
         people train with; tensor cores)
Attention is F.scaled_dot_product_attention(is_causal=True), PyTorch's fused
kernel for the dtype (flash in bf16, memory-efficient in FP32).

Shapes: either --preset/--batch/--seq, or --ours FILE, the JSON that
scripts/gpu_run.sh writes from our benchmark ({"rows": [{"name": "train step
<preset>", "shape": "B=.. T=.. ...", "ms": .., "extra": {"tokens/s": ..}}]}):
then every train-step row is re-run here at its preset, B and T, and the
ratio ours/PyTorch (tokens/s) is printed for each mode. Ratios are only
meaningful when both ran on the same machine.

  python3 bench/pytorch_compare.py --preset minimind2-small --batch 16 --seq 512
  python3 bench/pytorch_compare.py --ours out/train_step.json --json out/pytorch.json
  python3 bench/pytorch_compare.py --device cpu --preset tiny --batch 2 --seq 64 --steps 2

MFU uses the same FLOP count as ours: 6 * P_matmul + 12 * L * H * T per token
(PaLM convention), against --peak-tflops (the FP32 peak for both modes, so
bf16's MFU reads "fraction of FP32 peak"; pass the bf16 peak separately with
--peak-tflops-bf16 for a tensor-core MFU).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# Mirror of model/config.ts PRESETS (scripts/gpu_run.sh passes --presets with
# the values dumped from our code, so these only serve runs without Deno).
PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=384, vocab_size=2048,
                 rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=True, qk_norm=False),
    "minimind2-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2, intermediate_size=1408, vocab_size=6400,
                            rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=True,
                            qk_norm=False),
    "minimind-3": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, intermediate_size=2432, vocab_size=6400,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, qk_norm=True),
}

OPTIM = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
GRAD_CLIP = 1.0


def parameter_count(c: dict) -> int:
    """model/config.ts parameterCount().total: the tied head counts once."""
    h = c["hidden_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"] + 2 * h
    if c["qk_norm"]:
        per_layer += 2 * hd
    head = 0 if c["tie_word_embeddings"] else c["vocab_size"] * h
    return c["vocab_size"] * h + c["num_hidden_layers"] * per_layer + h + head


def train_flops_per_token(c: dict, seq: int) -> float:
    """model/config.ts trainFlopsPerToken(): 6 * P_matmul + 12 * L * H * T."""
    p = parameter_count(c) - (0 if c["tie_word_embeddings"] else c["vocab_size"] * c["hidden_size"])
    return 6 * p + 12 * c["num_hidden_layers"] * c["hidden_size"] * seq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in FP32 as HF Llama does (under autocast too), then scale.
        xf = up(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def up(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for reductions; fp32 and fp64 (the reference check) stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def rope_tables(seq: int, head_dim: int, theta: float, device,
                dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    # Pair i rotates by pos * theta^(-2i/head_dim); rotate-half layout (i with i + head_dim/2).
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    ang = torch.arange(seq, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Block(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.nh = c["num_attention_heads"]
        self.nkv = c["num_key_value_heads"]
        self.hd = h // self.nh
        self.input_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.q_proj = nn.Linear(h, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)
        self.q_norm = RMSNorm(self.hd, c["rms_norm_eps"]) if c["qk_norm"] else None
        self.k_norm = RMSNorm(self.hd, c["rms_norm_eps"]) if c["qk_norm"] else None
        self.post_attention_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.gate_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        a = self.input_layernorm(x)
        q = self.q_proj(a).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(a).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(a).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = (q * cos + rotate_half(q) * sin).to(v.dtype)
        k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        o = sdpa_gqa(q, k, v, self.nh // self.nkv)
        x = x + self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))
        m = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Causal attention with grouped KV heads (query head j uses KV head j // groups)."""
    if hasattr(F, "scaled_dot_product_attention"):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        except TypeError:  # torch 2.0-2.4 has no enable_gqa
            pass
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # torch < 2.0 (Debian's 1.13, used only to try this script on a CPU): plain softmax attention.
    T = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1).to(v.dtype) @ v


class Model(nn.Module):
    def __init__(self, c: dict, seq: int, device, dtype=torch.float32):
        super().__init__()
        self.c = c
        h = c["hidden_size"]
        self.embed_tokens = nn.Embedding(c["vocab_size"], h)
        self.layers = nn.ModuleList([Block(c) for _ in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(h, c["rms_norm_eps"])
        self.lm_head = None if c["tie_word_embeddings"] else nn.Linear(h, c["vocab_size"], bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        cos, sin = rope_tables(seq, h // c["num_attention_heads"], c["rope_theta"], device, dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        x = self.norm(x)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, w)
        return F.cross_entropy(up(logits).view(-1, logits.shape[-1]), targets.reshape(-1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_one(c: dict, B: int, T: int, mode: str, device: torch.device, warmup: int, steps: int,
              seed: int) -> dict:
    torch.manual_seed(seed)
    model = Model(c, T, device).to(device)
    n = sum(p.numel() for p in model.parameters())
    # Ours: the count model/config.ts reported (--presets), else its formula mirrored here.
    expected = c.get("parameters", parameter_count(c))
    if n != expected or n != parameter_count(c):
        raise SystemExit(f"parameter count {n} differs from ours ({expected})")
    # Matrices decay, norm weights do not (as our AdamW).
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt_kwargs = dict(lr=OPTIM["lr"], betas=OPTIM["betas"], eps=OPTIM["eps"])
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kwargs)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    autocast = mode == "bf16"

    def step() -> float:
        ids = torch.randint(c["vocab_size"], (B, T), generator=gen).to(device, non_blocking=True)
        tgt = torch.randint(c["vocab_size"], (B, T), generator=gen).to(device, non_blocking=True)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0, loss

    for _ in range(warmup):
        step()
    times, loss = [], None
    for _ in range(steps):
        dt, loss = step()
        times.append(dt)
    loss_v = float(loss.detach())
    # Random targets: the first losses sit near ln(V); anything else means a broken model.
    if not math.isfinite(loss_v) or abs(loss_v - math.log(c["vocab_size"])) > 1.0:
        raise SystemExit(f"{mode}: loss {loss_v} is not near ln(V) = {math.log(c['vocab_size']):.2f}")
    ms = statistics.median(times) * 1000
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(mode=mode, B=B, T=T, ms=ms, tokens_per_s=B * T / (ms / 1000), loss=loss_v,
                params=n, flop=train_flops_per_token(c, T) * B * T)


def torch_name(ours: str) -> str:
    """Our (Hugging Face) parameter name -> this module's: model.layers.0.self_attn.q_proj.weight
    -> layers.0.q_proj.weight."""
    n = ours.removeprefix("model.")
    return n.replace("self_attn.", "").replace("mlp.", "")


def check_reference(directory: str) -> int:
    """Loads weights, a batch, the loss and every gradient from our CPU reference model (float64,
    written by scripts/gpu_run.sh) and checks that this file's model, in float64 on the CPU, gives
    the same: the proof that the PyTorch side runs our architecture."""
    import numpy as np

    with open(f"{directory}/reference.json") as f:
        index = json.load(f)
    worst = 0.0
    for name, case in index.items():
        c = case["config"]
        B, T = case["B"], case["T"]
        model = Model(c, T, torch.device("cpu"), torch.float64).double()
        raw = np.fromfile(f"{directory}/{name}.bin", dtype="<f4")
        params = dict(model.named_parameters())
        expected_grads, o = {}, 0
        with torch.no_grad():
            for t in case["tensors"]:
                p = params[torch_name(t["name"])]
                n = t["length"]
                if p.numel() != n:
                    raise SystemExit(f"{name}: {t['name']} has {n} values here {p.numel()}")
                p.copy_(torch.from_numpy(raw[o:o + n].astype("f8")).view_as(p))
                expected_grads[torch_name(t["name"])] = torch.from_numpy(
                    raw[o + n:o + 2 * n].astype("f8")).view_as(p)
                o += 2 * n
        if o != raw.size or len(expected_grads) != len(params):
            raise SystemExit(f"{name}: the reference's tensors do not cover this model's")
        ids = torch.tensor(case["ids"]).view(B, T)
        tgt = torch.tensor(case["targets"]).view(B, T)
        loss = model(ids, tgt)
        loss.backward()
        # Tolerances: both sides compute in float64 from the same float32 weights, so the loss
        # agrees to ~1e-12 (summation order only); we allow 1e-9 relative. The reference's
        # gradients were stored as float32 (rounding 6e-8 relative per element), so a gradient
        # may differ by 1e-6 of its tensor's largest magnitude. A wrong RoPE pairing, GQA head
        # mapping, norm or SwiGLU moves these by 1e-2 or more with these weights (O(1) logits).
        dl = abs(float(loss) - case["loss"]) / abs(case["loss"])
        if dl > 1e-9:
            raise SystemExit(f"{name}: loss {float(loss)!r} here, {case['loss']!r} in ours")
        for k, g in expected_grads.items():
            got = params[k].grad
            err = float((got - g).abs().max() / g.abs().max().clamp_min(1e-30))
            worst = max(worst, err)
            if err > 1e-6:
                raise SystemExit(f"{name}: gradient of {k} differs from ours by {err:.2e} (relative)")
        print(f"reference check {name}: loss {float(loss):.9f} matches ours ({case['loss']:.9f}); "
              f"{len(expected_grads)} gradients match")
    print(f"reference check: worst gradient difference {worst:.2e} of the tensor's max")
    return 0


def parse_ours(path: str) -> tuple[list[dict], float | None]:
    """Train-step rows of our benchmark JSON (preset, B, T, tokens/s), and its FP32 peak."""
    with open(path) as f:
        data = json.load(f)
    peak = data.get("peakFlops") if isinstance(data, dict) else None
    rows = data["rows"] if isinstance(data, dict) and "rows" in data else data
    if isinstance(data, dict) and "suites" in data:  # `deno task bench --json` layout
        rows = data["suites"].get("train", [])
    out = []
    for r in rows:
        m = re.match(r"train step (\S+)", r.get("name", ""))
        s = re.search(r"B=(\d+) T=(\d+)", r.get("shape", ""))
        if m and s:
            out.append(dict(preset=m.group(1), B=int(s.group(1)), T=int(s.group(2)),
                            tokens_per_s=float(r["extra"]["tokens/s"]), ms=float(r["ms"])))
    if not out:
        raise SystemExit(f"{path}: no 'train step <preset>' rows with 'B=.. T=..' shapes")
    return out, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", help="our benchmark's JSON (train-step rows): compare at their shapes")
    ap.add_argument("--preset", default="minimind2-small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--modes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", help="JSON {name: config} dumped from model/config.ts")
    ap.add_argument("--peak-tflops", type=float, help="FP32 peak of the device, for MFU")
    ap.add_argument("--peak-tflops-bf16", type=float, help="bf16 dense peak, for bf16 MFU")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--check-reference", metavar="DIR",
                    help="check the model against our CPU reference's loss and gradients and exit")
    a = ap.parse_args()
    if a.check_reference:
        return check_reference(a.check_reference)

    presets = dict(PRESETS)
    if a.presets:
        with open(a.presets) as f:
            presets.update(json.load(f))
    device = torch.device(a.device)
    # True FP32 for the fp32 mode: no TF32 anywhere (autocast's bf16 is unaffected).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    ours, ours_peak = parse_ours(a.ours) if a.ours else (None, None)
    if a.peak_tflops is None and ours_peak:
        a.peak_tflops = ours_peak / 1e12  # the FP32 peak our benchmark used, for the same MFU
    cases = ([(o["preset"], o["B"], o["T"]) for o in ours] if ours
             else [(a.preset, a.batch, a.seq)])
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# PyTorch {torch.__version__} on {dev_name}; threads {torch.get_num_threads()}; "
          f"{a.warmup} warm-up + {a.steps} timed steps (median)")
    results = []
    for preset, B, T in cases:
        if preset not in presets:
            raise SystemExit(f"unknown preset {preset}; known: {', '.join(presets)}")
        c = presets[preset]
        for mode in a.modes.split(","):
            r = bench_one(c, B, T, mode.strip(), device, a.warmup, a.steps, a.seed)
            r["preset"] = preset
            peak = a.peak_tflops_bf16 if mode == "bf16" and a.peak_tflops_bf16 else a.peak_tflops
            if peak:
                r["mfu_pct"] = 100 * r["flop"] / (r["ms"] / 1000) / (peak * 1e12)
            o = next((o for o in ours or [] if (o["preset"], o["B"], o["T"]) == (preset, B, T)), None)
            if o:
                r["ours_tokens_per_s"] = o["tokens_per_s"]
                r["ratio_ours_over_torch"] = o["tokens_per_s"] / r["tokens_per_s"]
            results.append(r)

    print("\n| model | B | T | PyTorch mode | ms/step | tokens/s | MFU % | ours tokens/s | ours/PyTorch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        mfu = f"{r['mfu_pct']:.1f}" if "mfu_pct" in r else ""
        ot = f"{r['ours_tokens_per_s']:.0f}" if "ours_tokens_per_s" in r else ""
        ratio = f"{r['ratio_ours_over_torch']:.3f}" if "ratio_ours_over_torch" in r else ""
        print(f"| {r['preset']} | {r['B']} | {r['T']} | {r['mode']} | {r['ms']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {mfu} | {ot} | {ratio} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(torch=torch.__version__, device=dev_name, tf32=False,
                           warmup=a.warmup, steps=a.steps, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
