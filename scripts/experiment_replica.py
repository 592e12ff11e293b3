"""A PyTorch replica of `trainer experiment`, for designing the experiment fast.

PyTorch trains the tiny model 6-9x faster than lavapipe on a 2-core CPU, so a
change to the corpus, the learning rates or the budget can be tried in minutes
here before the trainer spends most of an hour on it. The table under "How
this design was found" in docs/guide.md section 5 comes from this script; the
experiment's own results (docs/experiment.md) come from the trainer.

What it replicates: the same corpus files (`trainer experiment` writes them to
`out/experiment/data`), the same tokenizer and chat template, a Llama of the
`tiny` preset's shape (Transformers' LlamaForCausalLM), AdamW (0.9, 0.999,
1e-8, weight decay 0.01), cosine to 0.1 x lr, clipping at 1.0, pretraining
windows packed from <|im_start|> text <|im_end|> documents, one SFT
conversation per padded row with MiniMind's assistant-only mask, greedy
replies. What it does not: the trainer's sample order and initialization (so
numbers agree in size, not digit for digit), and its scoring is a close
approximation of `replyFormat` / `statesFact` (train/experiment_score.ts).

It also reports two probes the trainer's table does not have:
- prose: prompted with a pretraining document up to a held-out answer, does
  the model continue with the answer? (Was the fact stored?)
- sentence: the same, prompted with only the sentence that states the fact.

    V/bin/python3 scripts/experiment_replica.py --corpus out/experiment/data --arms ABCD
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
import unicodedata

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sft_fixtures import labels_for  # noqa: E402  (MiniMind's label rule, one copy)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--corpus", default=os.path.join(ROOT, "out/experiment/data"))
p.add_argument("--tokenizer", default=os.path.join(ROOT, "data/default_tokenizer"))
p.add_argument("--arms", default="ABCD", help="any of A, B, C, D (A and C share a pretraining)")
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--kv-heads", type=int, default=2)
p.add_argument("--intermediate", type=int, default=384)
p.add_argument("--steps-pretrain", type=int, default=500)
p.add_argument("--steps-sft", type=int, default=200)
p.add_argument("--lr-pretrain", type=float, default=2e-3, help="also B's SFT (from random weights)")
p.add_argument("--lr-sft", type=float, default=5e-4, help="C's and D's SFT")
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--seq-len", type=int, default=128)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(args.threads)
tok = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
BOS, EOS, PAD = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
HAN = re.compile(r"[\u4e00-\u9fff]")


def read(name):
    with open(os.path.join(args.corpus, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def new_model():
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=512, rope_theta=1e6,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS,
                      pad_token_id=PAD)
    return LlamaForCausalLM(cfg)


def train(model, batches, steps, lr, label):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    model.train()
    started = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        ids, targets = next(batches)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  [{label}] step {step + 1} loss {loss.item():.4f} ({time.time() - started:.0f} s)",
                  flush=True)


def pretrain_batches(docs, seed):
    rng = random.Random(seed)
    toks = [[BOS] + tok.encode(d["text"]) + [EOS] for d in docs]
    # A small file (the once-stated prose) is repeated so that one pass fills many batches.
    while sum(map(len, toks)) < 64 * (args.seq_len + 1) * args.batch_size:
        toks = toks + [list(t) for t in toks]
    while True:
        rng.shuffle(toks)
        flat = [t for d in toks for t in d]
        n = (len(flat) - 1) // (args.seq_len + 1)
        windows = [flat[i * (args.seq_len + 1):(i + 1) * (args.seq_len + 1)] for i in range(n)]
        rng.shuffle(windows)
        for i in range(0, len(windows) - args.batch_size + 1, args.batch_size):
            w = torch.tensor(windows[i:i + args.batch_size])
            yield w[:, :-1], w[:, 1:]


def sft_row(conversation):
    """One padded row, MiniMind's labels (the same rule as the SFT fixtures), shifted to targets."""
    n = args.seq_len + 1
    ids = tok.encode(tok.apply_chat_template(conversation, tokenize=False))[:n]
    ids = ids + [PAD] * (n - len(ids))
    labels = labels_for(ids, tok.encode("<|im_start|>assistant\n"), tok.encode("<|im_end|>\n"), n)
    return ids[:-1], labels[1:]


def sft_batches(records, seed):
    rng = random.Random(seed)
    rows = [sft_row(r["conversations"]) for r in records]
    while True:
        rng.shuffle(rows)
        for i in range(0, len(rows) - args.batch_size + 1, args.batch_size):
            b = rows[i:i + args.batch_size]
            yield torch.tensor([x for x, _ in b]), torch.tensor([y for _, y in b])


def normalize(text):
    return re.sub(r"[^\w]+", " ", unicodedata.normalize("NFKC", text).lower()).strip()


def states(body, answer):
    b, a = normalize(body), normalize(answer)
    return a.replace(" ", "") in b.replace(" ", "") if HAN.search(a) else f" {a} " in f" {b} "


@torch.no_grad()
def greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=EOS,
                         pad_token_id=PAD)
    return tok.decode(out[0, len(ids):], skip_special_tokens=False)


def ask(model, held, label):
    model.eval()
    fmt = fact = both = 0
    for h in held:
        prompt = tok.apply_chat_template([{"role": "user", "content": h["question"]}], tokenize=False,
                                         add_generation_prompt=True)
        reply = greedy(model, tok.encode(prompt), 48)
        body = reply.split("<|im_end|>")[0]
        sentences = len([s for s in re.split(r"[.!?。！？]+", body) if s.strip()])
        ok_format = reply.find("<|im_end|>") >= 0 and "<|im_start|>" not in body and \
            "<|endoftext|>" not in body and body.strip() != "" and \
            not body.strip().endswith(("?", "？")) and sentences <= 2
        ok_fact = states(re.split(r"<\|im_(?:start|end)\|>|<\|endoftext\|>", reply)[0], h["answer"])
        fmt, fact, both = fmt + ok_format, fact + ok_fact, both + (ok_format and ok_fact)
    n = len(held)
    print(f"RESULT {label}: format {fmt / n:.0%}  fact {fact / n:.0%}  both {both / n:.0%}  (of {n})",
          flush=True)
    model.train()


def probe(model, held, docs, label):
    """Continues pretraining prose cut right before each held-out answer."""
    model.eval()
    prose = sentence = 0
    for h in held:
        doc = next(d["text"] for d in docs if h["entity"] in d["text"] and
                   0 <= d["text"].find(h["entity"]) < d["text"].find(h["answer"]))
        before = doc[:doc.find(h["answer"])]
        cut = max(before.rfind(". "), before.rfind("。"))
        for text, kind in ((before, "prose"), (before[cut + 1:].lstrip(), "sentence")):
            ids = [BOS] + tok.encode(text.rstrip(" ") if h["language"] == "en" else text)
            ok = greedy(model, ids, 6).strip().startswith(h["answer"])
            prose += ok and kind == "prose"
            sentence += ok and kind == "sentence"
    print(f"PROBE {label}: continues the prose with the held-out answer {prose}/{len(held)}, "
          f"from its sentence alone {sentence}/{len(held)}", flush=True)
    model.train()


held = read("heldout.jsonl")
sft = read("sft.jsonl")
started = time.time()
pretrained = {}
for arm in args.arms:
    source = {"A": "pretrain.jsonl", "C": "pretrain.jsonl", "D": "pretrain_once.jsonl"}.get(arm)
    model = new_model()
    if source is not None:
        if source in pretrained:
            model.load_state_dict(pretrained[source])
        else:
            train(model, pretrain_batches(read(source), args.seed), args.steps_pretrain, args.lr_pretrain,
                  f"{arm} pretrain")
            pretrained[source] = {k: v.clone() for k, v in model.state_dict().items()}
            probe(model, held, read(source), f"{arm} after pretraining")
    if arm == "A":
        ask(model, held, "A")
        continue
    lr = args.lr_pretrain if arm == "B" else args.lr_sft
    train(model, sft_batches(sft, args.seed + 1), args.steps_sft, lr, f"{arm} sft")
    if source is not None:
        probe(model, held, read(source), f"{arm} after SFT")
    ask(model, held, arm)
print(f"total {time.time() - started:.0f} s")
