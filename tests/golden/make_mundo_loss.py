#!/usr/bin/env python3
"""Golden fixture: transformers loads the demo model (models/afinar-mundo) and gives its loss.

Run once (from the repo root) with the project venv, after `cargo xtask pretrain-demo` rewrote the
model (the fixture records the model's SHA-256, and the Rust test refuses a model that differs):

    /work/venv/bin/python tests/golden/make_mundo_loss.py

Writes tests/golden/fixtures/mundo_loss/:
  prose.jsonl   the fixed eval set: the first 16 records of datasets/mundo-ficticio/prosa-reservada.jsonl
                ({"text": ...}; copied so that regenerating the dataset does not move the fixture)
  loss.json     {model_sha256, records, tokens, loss, per_record: [{tokens, loss_sum}], versions}
Read by crates/trainer/tests/it/golden_mundo.rs, which runs `afinar eval --model models/afinar-mundo
--data prose.jsonl --format text --json` and compares loss and token count.

Reference: Gemma2ForCausalLM.from_pretrained(models/afinar-mundo, float32, eager attention) — the
checkpoint exactly as a transformers user loads it (config.json, tied head, both soft-caps, sliding
window on alternate layers). Each text record is scored as afinar scores a `text` record: ids =
<bos> + tokenizer(text, add_special_tokens=False) + <eos>, every token after the first a target;
loss = sum of the cross-entropies over all targets of all records / number of targets (afinar eval's
definition: token-weighted, not a mean of per-record means). One record per forward pass, no padding.
"""
import hashlib
import json
import os

import torch
import transformers
from transformers import AutoTokenizer, Gemma2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "afinar-mundo")
SOURCE = os.path.join(ROOT, "datasets", "mundo-ficticio", "prosa-reservada.jsonl")
OUT = os.path.join(ROOT, "tests", "golden", "fixtures", "mundo_loss")
RECORDS = 16


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    with open(SOURCE, encoding="utf-8") as f:
        lines = [l for l in f.read().splitlines() if l.strip()][:RECORDS]
    texts = [json.loads(l)["text"] for l in lines]
    with open(os.path.join(OUT, "prose.jsonl"), "w", encoding="utf-8") as f:
        f.write("".join(l + "\n" for l in lines))

    tok = AutoTokenizer.from_pretrained(MODEL)
    assert tok.bos_token_id == 2 and tok.eos_token_id == 1
    model = Gemma2ForCausalLM.from_pretrained(
        MODEL, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert model.config.tie_word_embeddings and model.config.final_logit_softcapping == 30.0

    total, count, per = 0.0, 0, []
    with torch.no_grad():
        for t in texts:
            ids = [tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1].double()
            ce = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            per.append({"tokens": len(ids) - 1, "loss_sum": ce})
            total += ce
            count += len(ids) - 1
    with open(os.path.join(MODEL, "model.safetensors"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    out = {
        "model_sha256": sha,
        "records": len(texts),
        "tokens": count,
        "loss": total / count,
        "per_record": per,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    with open(os.path.join(OUT, "loss.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"loss {out['loss']:.6f} over {count} targets of {len(texts)} records (model {sha[:12]})")


if __name__ == "__main__":
    main()
