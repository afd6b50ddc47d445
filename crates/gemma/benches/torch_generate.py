#!/usr/bin/env python
"""transformers reference for `cargo bench -p afinar-gemma --bench generate`: greedy decoding with the KV cache
on the same checkpoint and the same prompts, timed the same way as the Rust side.

    /work/venv/bin/python crates/gemma/benches/torch_generate.py SPEC.json

SPEC.json (written by the Rust bench): {"model": dir, "threads": n, "new_tokens": N, "reps": R,
"prompts": [[ids...], ...]}. The model is loaded from the directory's safetensors in float32 with eager
attention; `generate` runs with do_sample=False, num_beams=1, use_cache=True, and no EOS (so it always produces
exactly max_new_tokens, like the Rust side's `GenerateOptions::greedy(N)`).

Per prompt, after one untimed warm-up of each call: t1 = median over R runs of generate(max_new_tokens=1)
(prefill of P tokens + one argmax) and tN = median of generate(max_new_tokens=N). Prefill tok/s = P / t1; the
N − 1 decode steps take tN − t1. Prints one JSON object per prompt on a line starting with `RESULT `:
{"p": P, "t1": s, "tn": s, "tokens": [N generated ids]}.
"""
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(int(spec["threads"]))
n_new = int(spec["new_tokens"])
reps = int(spec["reps"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="eager")
model.eval()
# No EOS: both sides generate exactly N tokens; every other processor off (plain greedy).
gc = model.generation_config
gc.eos_token_id = None
gc.pad_token_id = 0
gc.do_sample = False
gc.num_beams = 1
gc.use_cache = True
gc.repetition_penalty = 1.0
gc.no_repeat_ngram_size = 0
print(f"INFO torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)


def run(ids, n):
    """Seconds for one generate() call of n new tokens, and the generated ids."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n)
    return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist()


for prompt in spec["prompts"]:
    ids = torch.tensor([prompt], dtype=torch.long)
    run(ids, 1)
    run(ids, n_new)
    t1 = statistics.median(run(ids, 1)[0] for _ in range(reps))
    runs = [run(ids, n_new) for _ in range(reps)]
    tn = statistics.median(t for t, _ in runs)
    print("RESULT " + json.dumps({"p": len(prompt), "t1": t1, "tn": tn, "tokens": runs[0][1]}), flush=True)
