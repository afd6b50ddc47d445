#!/usr/bin/env python3
"""Python side of the data-pipeline benchmark (run by `cargo run --release -p afinar-data
--example bench_pipeline -- --python /work/venv/bin/python`, or by hand):

    bench_data.py DATA.jsonl TOKENIZER_DIR [REPEATS]   (best of REPEATS runs, default 3)

Same work as afinar's read_dataset + encode_dataset with the gemma template: parse every JSONL
record, render Gemma's chat template and tokenize it with the assistant-token mask
(transformers `apply_chat_template(..., tokenize=True, return_dict=True,
return_assistant_tokens_mask=True)`, TRL-style {% generation %} tags marking content +
"<end_of_turn>\\n", exactly what afinar trains), in batches of 1000 conversations so that the Rust
`tokenizers` backend can use every core for encoding. Prints one JSON line with the timing.
"""
import json
import os
import sys
import time

from transformers import AutoTokenizer

GEMMA_TRAIN = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if role == 'model' %}{% generation %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def run(tok, data):
    t0 = time.perf_counter()
    with open(data, encoding="utf-8") as f:
        convs = [json.loads(line)["messages"] for line in f if line.strip()]
    tokens = trained = 0
    for i in range(0, len(convs), 1000):
        out = tok.apply_chat_template(
            convs[i : i + 1000],
            chat_template=GEMMA_TRAIN,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        for ids, mask in zip(out["input_ids"], out["assistant_masks"]):
            tokens += len(ids)
            trained += sum(mask)
    return len(convs), tokens, trained, time.perf_counter() - t0


def main():
    data, tok_dir = sys.argv[1], sys.argv[2]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    tok = AutoTokenizer.from_pretrained(tok_dir)
    results = [run(tok, data) for _ in range(repeats)]
    n, tokens, trained, seconds = min(results, key=lambda r: r[3])
    print(json.dumps({
        "samples": n,
        "tokens": tokens,
        "trained": trained,
        "seconds": seconds,
        "samples_per_s": n / seconds,
        "repeats": repeats,
        "threads": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
