"""Expected SFT ids and labels for tests/fixtures/sft/, the way MiniMind's SFTDataset makes them.

MiniMind (jingyaogong/minimind, dataset/lm_dataset.py) turns a conversation into a training row so:
its loader gives every message the five fields role, content, reasoning_content, tools, tool_calls
(None where absent); tools come from the system message and tool_calls strings are parsed as JSON;
transformers' apply_chat_template renders the messages (tools=..., no generation prompt); the text is
tokenized, cut to max_length and padded with the pad id; labels are the ids from just after each
`<|im_start|>assistant\\n` through the next `<|im_end|>\\n`, -100 elsewhere. Its augmentations are
random; here they are fixed: a given system prompt is added (where MiniMind may add one) and every
empty think block is stripped (where MiniMind may strip them), so the test can ask for the same.

This is a re-statement of those steps for a cross-check, not MiniMind's code. Run from the repo root:

    $PYTHON scripts/make_sft_fixtures.py [--stdout]

It reads tests/fixtures/sft/minimind_records.jsonl and writes tests/fixtures/sft/minimind_expected.json
(with --stdout it prints the same JSON instead). tests/data_sft_minimind_test.ts checks our rows against
the committed file always, and against this script's live output where Python and transformers exist.
"""

import json
import sys

from transformers import AutoTokenizer

TOKENIZER = "../shared/fixtures/minimind-tokenizer"
RECORDS = "tests/fixtures/sft/minimind_records.jsonl"
EXPECTED = "tests/fixtures/sft/minimind_expected.json"
FIELDS = ("role", "content", "reasoning_content", "tools", "tool_calls")
EMPTY_THINK = "<think>\n\n</think>\n\n"
# The first of MiniMind's system prompts; the test gives our trainer a list holding only this one.
SYSTEM_PROMPT = "你是一个知识丰富的AI，尽力为用户提供准确的信息。"
LENGTHS = (4096, 48)


def as_loaded(conversation):
    """Every message with MiniMind's five fields, None where the record has none."""
    return [{k: m.get(k) for k in FIELDS} for m in conversation]


def with_system(conversation):
    """MiniMind's pre_processing_chat when its draw says yes: a system prompt, unless tools or one is there."""
    if any(m.get("tools") for m in conversation) or conversation[0].get("role") == "system":
        return conversation
    return [{"role": "system", "content": SYSTEM_PROMPT}] + conversation


def render(tok, conversation):
    messages, tools = [], None
    for m in conversation:
        m = dict(m)
        if m.get("role") == "system" and m.get("tools"):
            tools = json.loads(m["tools"]) if isinstance(m["tools"], str) else m["tools"]
        if m.get("tool_calls") and isinstance(m["tool_calls"], str):
            m["tool_calls"] = json.loads(m["tool_calls"])
        messages.append(m)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, tools=tools)


def labels_for(ids, start_ids, end_ids, max_length):
    labels = [-100] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i : i + len(start_ids)] != start_ids:
            i += 1
            continue
        begin = i + len(start_ids)
        stop = begin
        while stop < len(ids) and ids[stop : stop + len(end_ids)] != end_ids:
            stop += 1
        for j in range(begin, min(stop + len(end_ids), max_length)):
            labels[j] = ids[j]
        i = stop + len(end_ids) if stop < len(ids) else len(ids)
    return labels


def row(tok, text, max_length):
    start_ids = tok(f"{tok.bos_token}assistant\n", add_special_tokens=False).input_ids
    end_ids = tok(f"{tok.eos_token}\n", add_special_tokens=False).input_ids
    ids = tok(text).input_ids[:max_length]
    ids = ids + [tok.pad_token_id] * (max_length - len(ids))
    return {"max_length": max_length, "ids": ids, "labels": labels_for(ids, start_ids, end_ids, max_length)}


def main():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    out = []
    with open(RECORDS, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            conversation = as_loaded(json.loads(line)["conversations"])
            plain = render(tok, conversation)
            augmented = render(tok, with_system(conversation)).replace(EMPTY_THINK, "")
            out.append({
                "line": number,
                "text": plain,
                "rows": [row(tok, plain, n) for n in LENGTHS],
                "augmented_text": augmented,
                "augmented_rows": [row(tok, augmented, n) for n in LENGTHS],
            })
    text = json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n"
    if "--stdout" in sys.argv:
        sys.stdout.write(text)
        return
    with open(EXPECTED, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {EXPECTED}: {len(out)} records")


if __name__ == "__main__":
    main()
