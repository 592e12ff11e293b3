#!/usr/bin/env python3
"""Builds the PyTorch `.pth` fixtures of tests/pth_test.ts into tests/fixtures/pth/.

Run from the project root with a Python that has torch and transformers:

  /work/V/bin/python3 scripts/make_pth_fixtures.py     # torch 2.13 CPU, transformers 5.18

The outputs are committed (as the tokenizer fixture is), so the Deno tests run
without Python; rerun this only to change them. Everything is seeded, but
`torch.save` writes a random `.data/serialization_id` into each archive, so the
`.pth` bytes differ from run to run while their tensors do not.

Real `torch.save` output:
  minimind_f16   Llama-shaped, tied head, saved MiniMind's way
                 (`torch.save({k: v.half().cpu() for k, v in model.state_dict().items()})`,
                 trainer/trainer_utils.py `lm_checkpoint`, trainer/train_*.py):
                 the tied head appears twice, as `model.embed_tokens.weight` and
                 `lm_head.weight`, two storages with the same values.
  llama_f32      untied head, `torch.save(model.state_dict())`: an OrderedDict
                 with `_metadata` (a BUILD opcode), float32.
  llama_bf16     tied head saved without `lm_head.weight` (as Hugging Face's
                 `save_pretrained` leaves it out), bfloat16.
  minimind3_v6400  QK-norm, MiniMind's vocabulary (6400) with hidden 8, MiniMind's way;
                 its .json holds Transformers' greedy continuation of bos + a prompt
                 tokenized with ../shared/fixtures/minimind-tokenizer (run alone:
                 `make_pth_fixtures.py minimind3_v6400`).
  minimind3_qk   QK-norm (Qwen3ForCausalLM; MiniMind-3 converts to it with
                 strict loading), tied, rms_norm_eps 1e-6, MiniMind's way.
  resume         MiniMind's resume file (`checkpoints/*_resume.pth`): the half
                 state dict nested under "model", beside the AdamW state, epoch,
                 step, world_size, wandb_id and the GradScaler's state.
  views          tensors that are views (offsets, transposes, a column) of
                 shared storages, f32 and f16; `views_p4` the same with pickle
                 protocol 4.
  moe            MiniMind's MoE names (`mlp.gate.weight`, `mlp.experts.E.*`),
                 which the reader refuses.
  expanded       a broadcast (`expand`) tensor: more elements than its storage.
  legacy         `_use_new_zipfile_serialization=False` (the pre-1.6 format).
  deflated, zip64  views' archive rewritten by Python's zipfile with
                 deflate, and with ZIP64 fields everywhere; torch.load reads both.

Hand-made hostile or corrupt archives (never unpickled here): GLOBAL os.system,
STACK_GLOBAL posix.system (protocol 4), a class whose __reduce__ calls
subprocess.check_output, a plain object of a class, pickle.dumps of a tensor
(torch.storage._load_from_bytes), a storage claiming 2^60 elements, a shape far
larger than its storage, a persistent id naming a missing record, a
persistent id that is not a storage.

For each model, `<name>.json` holds the config (Hugging Face field names plus
`qk_norm`), `input_ids`, and `logits` [T][V] computed by Transformers in float32
(its default) from the weights exactly as stored (after rounding to f16/bf16).
In float64 they would not be float64-exact anyway: Transformers' RMSNorm and
RoPE tables always compute in float32. Every fixture
with tensors has `<name>.tensors.json`: per tensor its dtype, shape, the SHA-256
of its values as little-endian float32 (row-major, contiguous) and a few
sampled values.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "pth")
INPUT_IDS = [1, 5, 9, 3, 17, 2, 40, 8, 63, 0, 71]


def path(name: str) -> str:
    return os.path.join(OUT, name)


def write_json(name: str, value) -> None:
    with open(path(name), "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


def tensor_record(t: torch.Tensor, samples: int = 4) -> dict:
    """Dtype, shape, SHA-256 of the float32 values and a few (index, value) samples."""
    dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[t.dtype]
    flat = t.detach().to(torch.float32).contiguous().reshape(-1)
    digest = hashlib.sha256(flat.numpy().astype("<f4").tobytes()).hexdigest()
    n = flat.numel()
    g = torch.Generator().manual_seed(n)
    idx = sorted({0, n - 1, *torch.randint(0, n, (samples,), generator=g).tolist()}) if n else []
    return {
        "dtype": dtype,
        "shape": list(t.shape),
        "sha256": digest,
        "samples": [[i, float(flat[i])] for i in idx],
    }


def write_tensors_json(name: str, state: dict) -> None:
    write_json(f"{name}.tensors.json", {k: tensor_record(v) for k, v in state.items()})


def our_config(hf: dict, qk_norm: bool) -> dict:
    keys = [
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps",
        "max_position_embeddings", "tie_word_embeddings",
    ]
    return {**{k: hf[k] for k in keys}, "qk_norm": qk_norm}


def seeded_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are O(1) and every tensor matters:
    matrices N(0, 1/in), the embedding N(0, 0.3^2), norm weights 1 + N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def reference_logits(cls, hf_config, stored: dict) -> list:
    """Transformers' logits in float32 (its default; f16/bf16 weights widen exactly)."""
    model = cls(hf_config).to(torch.float32).eval()
    state = {k: v.to(torch.float32) for k, v in stored.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    if missing:
        assert hf_config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([INPUT_IDS])).logits[0]
    # 9 significant digits identify a float32 exactly, in half the bytes of repr().
    return [[float(f"{x:.9g}") for x in row] for row in logits.tolist()]


def make_model(name: str, cls, cfg_cls, qk_norm: bool, seed: int, save) -> None:
    hf = dict(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=72, rope_theta=1e6, rms_norm_eps=1e-5,
        max_position_embeddings=64, tie_word_embeddings=True,
    )
    extra = {}
    if cls is Qwen3ForCausalLM:
        # Qwen3's head_dim defaults to 128; MiniMind-3 uses hidden / heads.
        hf["rms_norm_eps"] = 1e-6
        extra = dict(head_dim=8, use_sliding_window=False, attention_bias=False)
    hf.update(save.get("config", {}))
    hf_config = cfg_cls(**hf, **extra, attn_implementation="eager")
    torch.manual_seed(seed)
    model = cls(hf_config).eval()
    seeded_weights(model, seed)
    state = save["transform"](model.state_dict())
    torch.save(state, path(f"{name}.pth"))
    stored = torch.load(path(f"{name}.pth"), weights_only=True)
    assert list(stored.keys()) == list(state.keys())
    write_tensors_json(name, stored)
    write_json(f"{name}.json", {
        "made_by": f"scripts/make_pth_fixtures.py, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}, {cls.__name__}",
        "saved_as": save["how"],
        "config": our_config(hf, qk_norm),
        "input_ids": INPUT_IDS,
        "logits_dtype": "float32",
        "logits": reference_logits(cls, hf_config, stored),
    })


def minimind_way(sd):
    # trainer/trainer_utils.py lm_checkpoint and trainer/train_*.py in jingyaogong/minimind.
    return {k: v.half().cpu() for k, v in sd.items()}


def models() -> None:
    make_model("minimind_f16", LlamaForCausalLM, LlamaConfig, False, 1, {
        "how": "torch.save({k: v.half().cpu() for k, v in model.state_dict().items()}) "
               "(MiniMind's way; the tied head appears as both embed_tokens and lm_head)",
        "transform": minimind_way,
    })
    make_model("llama_f32", LlamaForCausalLM, LlamaConfig, False, 2, {
        "how": "torch.save(model.state_dict()), an OrderedDict with _metadata, untied head",
        "config": {"tie_word_embeddings": False},
        "transform": lambda sd: sd,
    })
    make_model("llama_bf16", LlamaForCausalLM, LlamaConfig, False, 3, {
        "how": "torch.save of a plain dict of bf16 tensors, tied head, lm_head.weight absent",
        "transform": lambda sd: {
            k: v.to(torch.bfloat16) for k, v in sd.items() if k != "lm_head.weight"
        },
    })
    make_model("minimind3_qk", Qwen3ForCausalLM, Qwen3Config, True, 4, {
        "how": "MiniMind's way on a QK-norm model (Qwen3ForCausalLM, as MiniMind-3 converts to)",
        "transform": minimind_way,
    })


TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                         "fixtures", "minimind-tokenizer")
PROMPT = "你好，世界"
GREEDY_STEPS = 12


def tokenizer_sized() -> None:
    """minimind3_v6400: a QK-norm model with MiniMind's vocabulary (6400), saved
    MiniMind's way, so that tests run it with MiniMind's tokenizer: `--init`
    trains it and `generate` continues a prompt. Its `.json` holds the config
    and the greedy continuation Transformers computes (full recompute each step,
    no stop) of bos + the prompt's tokens, with the smallest top-1/top-2 logit
    gap seen, which says how far float error is from flipping a token."""
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.normpath(TOKENIZER))
    hf = dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, vocab_size=6400, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, use_sliding_window=False, attention_bias=False,
    )
    hf_config = Qwen3Config(**hf, attn_implementation="eager")
    torch.manual_seed(7)
    model = Qwen3ForCausalLM(hf_config).eval()
    seeded_weights(model, 7)
    state = minimind_way(model.state_dict())
    torch.save(state, path("minimind3_v6400.pth"))
    stored = torch.load(path("minimind3_v6400.pth"), weights_only=True)
    write_tensors_json("minimind3_v6400", stored)
    ref = Qwen3ForCausalLM(hf_config).to(torch.float32).eval()
    ref.load_state_dict({k: v.to(torch.float32) for k, v in stored.items()})
    ids = [tok.bos_token_id] + tok.encode(PROMPT, add_special_tokens=False)
    prompt_ids = list(ids)
    margin = float("inf")
    with torch.no_grad():
        for _ in range(GREEDY_STEPS):
            last = ref(input_ids=torch.tensor([ids])).logits[0, -1]
            top = torch.topk(last, 2).values
            margin = min(margin, float(top[0] - top[1]))
            ids.append(int(torch.argmax(last)))
    hf.pop("head_dim")
    for k in ("bos_token_id", "eos_token_id", "use_sliding_window", "attention_bias"):
        hf.pop(k)
    write_json("minimind3_v6400.json", {
        "made_by": f"scripts/make_pth_fixtures.py, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}, Qwen3ForCausalLM",
        "saved_as": "MiniMind's way on a QK-norm model with MiniMind's vocabulary",
        "config": our_config(hf, True),
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "greedy_ids": ids[len(prompt_ids):],
        "min_top2_margin": margin,
    })


def resume() -> None:
    """MiniMind's resume file: trainer/trainer_utils.py lm_checkpoint, `resume_data`."""
    hf = LlamaConfig(
        hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=16, tie_word_embeddings=True,
    )
    torch.manual_seed(5)
    model = LlamaForCausalLM(hf)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    opt.step()
    state = minimind_way(model.state_dict())
    torch.save({
        "model": state,
        "optimizer": opt.state_dict(),
        "epoch": 0,
        "step": 1,
        "world_size": 1,
        "wandb_id": None,
        # GradScaler(enabled=True).state_dict(); MiniMind saves it as `scaler`.
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000, "_growth_tracker": 0},
    }, path("resume.pth"))
    write_tensors_json("resume", state)


def views() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * 0.5 - 3
    half = (torch.arange(30, dtype=torch.float32).reshape(5, 6) / 7).half()
    state = {
        "full": base,
        "transposed": base.t(),
        "rows": base[1:3],
        "column": base[:, 2],
        "scalar": base[2, 5],
        "half_t": half.t(),
        "half_block": half[1:4, 2:5],
        "empty": base[:0],
    }
    torch.save(state, path("views.pth"))
    torch.save(state, path("views_p4.pth"), pickle_protocol=4)
    write_tensors_json("views", state)


def moe() -> None:
    g = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=g).half()  # noqa: E731
    state = {"model.embed_tokens.weight": r(16, 8), "model.layers.0.mlp.gate.weight": r(4, 8)}
    for e in range(4):
        for p, s in (("gate_proj", (12, 8)), ("up_proj", (12, 8)), ("down_proj", (8, 12))):
            state[f"model.layers.0.mlp.experts.{e}.{p}.weight"] = r(*s)
    state["model.norm.weight"] = r(8)
    torch.save(state, path("moe.pth"))


def oddities() -> None:
    torch.save({"w": torch.ones(1).expand(5)}, path("expanded.pth"))
    torch.save({"w": torch.ones(3)}, path("legacy.pth"), _use_new_zipfile_serialization=False)


def rewrite_zip(src: str, dst: str, compression: int) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


def rezipped() -> None:
    src = path("views.pth")
    rewrite_zip(src, path("deflated.pth"), zipfile.ZIP_DEFLATED)
    # zipfile switches to ZIP64 fields (extra fields, end records) past
    # ZIP64_LIMIT; lowering it gives a small archive with every ZIP64 field that
    # a >4 GiB torch.save would have.
    saved = zipfile.ZIP64_LIMIT
    zipfile.ZIP64_LIMIT = 0
    try:
        rewrite_zip(src, path("zip64.pth"), zipfile.ZIP_STORED)
    finally:
        zipfile.ZIP64_LIMIT = saved
    want = torch.load(src, weights_only=True)
    for name in ("deflated.pth", "zip64.pth"):
        got = torch.load(path(name), weights_only=True)
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), name


# ---------------------------------------------------------------------------
# Hand-made pickles. Opcodes as in Python's pickle module (protocol 2 unless
# said otherwise); nothing here is ever unpickled.

def binunicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def binint(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def long1(n: int) -> bytes:
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def tuple_of(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def rebuild(
    storage_type: str, key: str, numel: bytes, size: list[bytes], stride: list[bytes]
) -> bytes:
    """A `_rebuild_tensor_v2` call as torch.save writes it."""
    pid = tuple_of(binunicode("storage"), b"ctorch\n" + storage_type.encode() + b"\n",
                   binunicode(key), binunicode("cpu"), numel)
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q" + binint(0)
            + tuple_of(*size) + tuple_of(*stride) + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")


def state_dict_pickle(*items: tuple[str, bytes]) -> bytes:
    return b"\x80\x02}(" + b"".join(binunicode(k) + v for k, v in items) + b"u."


def torch_like_zip(name: str, data_pkl: bytes, records: dict[str, bytes] | None = None) -> None:
    """An archive laid out as torch.save lays it out (stored entries under `archive/`)."""
    with zipfile.ZipFile(path(name), "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


class CallsSubprocess:
    def __reduce__(self):
        return (subprocess.check_output, (["true"],))


class Plain:
    def __init__(self):
        self.x = 1


def hostile() -> None:
    call_system = b"(" + binunicode("true") + b"tR"
    torch_like_zip("os_system.pth", b"\x80\x02cos\nsystem\n" + call_system + b".")
    # Protocol 4: FRAME, SHORT_BINUNICODE module and name, STACK_GLOBAL, MEMOIZE.
    body = (b"\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94.")
    torch_like_zip("posix_system_p4.pth", b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body)
    # fix_imports=False: name subprocess.check_output, not its Python 2 alias commands.check_output.
    evil = pickle.dumps({"w": CallsSubprocess()}, protocol=2, fix_imports=False)
    torch_like_zip("reduce_subprocess.pth", evil)
    torch_like_zip("plain_object.pth", pickle.dumps({"w": Plain()}, protocol=2))
    torch_like_zip("load_from_bytes.pth", pickle.dumps({"w": torch.zeros(2)}, protocol=2))
    small = struct.pack("<2f", 1.0, 2.0)
    torch_like_zip("huge_numel.pth", state_dict_pickle(
        ("w", rebuild("FloatStorage", "0", long1(2**60), [long1(2**30), long1(2**30)],
                      [long1(2**30), binint(1)]))), {"0": small})
    torch_like_zip("huge_shape.pth", state_dict_pickle(
        ("w", rebuild("FloatStorage", "0", binint(2), [long1(2**31), long1(2**31)],
                      [binint(0), binint(0)]))), {"0": small})
    torch_like_zip("missing_record.pth", state_dict_pickle(
        ("w", rebuild("FloatStorage", "7", binint(2), [binint(2)], [binint(1)]))), {"0": small})
    pid = tuple_of(binunicode("module"), binunicode("os"))
    torch_like_zip("bad_persistent_id.pth", b"\x80\x02}(" + binunicode("w") + pid + b"Qu.")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    if sys.argv[1:] == ["minimind3_v6400"]:
        # Only the newest fixture, leaving the others' bytes as committed.
        tokenizer_sized()
        return
    for f in os.listdir(OUT):
        if f.endswith((".pth", ".json")):
            os.remove(path(f))
    models()
    tokenizer_sized()
    resume()
    views()
    moe()
    oddities()
    rezipped()
    hostile()
    total = sum(os.path.getsize(path(f)) for f in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total / 1024:.0f} KiB, to {os.path.normpath(OUT)}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
