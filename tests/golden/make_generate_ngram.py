"""Golden tokens for transformers' no_repeat_ngram_size on the committed gemma_io fixture model.

Reads tests/golden/fixtures/gemma_io_model and the prompts gen_prompt_0/1 of gemma_io_cases.safetensors
(written by make_gemma_io.py; this script does not change them) and writes
tests/golden/fixtures/generate_ngram.safetensors:

      gen_tokens_ng{n}_{i}        I64 [20]   model.generate(do_sample=False, no_repeat_ngram_size=n,
                                             max_new_tokens=20), EOS disabled, n in 1, 2, 3
      gen_tokens_ng{n}_rp_{i}     I64 [20]   the same with repetition_penalty=1.3 (n = 2)

for prompts i = 0, 1. Every case is checked to differ from plain greedy decoding (and the combined cases
from repetition_penalty alone), so the Rust test that replays them would fail without the n-gram ban.

Run with /work/venv/bin/python tests/golden/make_generate_ngram.py.
"""

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
MODEL = os.path.join(OUT, "gemma_io_model")
NEW = 20
RP = 1.3


def run(model, prompt, **kw):
    seq = model.generate(prompt[None, :], do_sample=False, max_new_tokens=NEW, eos_token_id=None,
                         pad_token_id=0, **kw)
    new = seq[0, prompt.numel():].contiguous()
    assert new.numel() == NEW, new
    return new


def ngram_free(seq, n):
    grams = [tuple(seq[j:j + n]) for j in range(len(seq) - n + 1)]
    return len(grams) == len(set(grams))


def main():
    cases = load_file(os.path.join(OUT, "gemma_io_cases.safetensors"))
    model = Gemma2ForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    out = {}
    for i in range(2):
        prompt = cases[f"gen_prompt_{i}"].to(torch.int64)
        plain = run(model, prompt)
        rp = run(model, prompt, repetition_penalty=RP)
        for n in (1, 2, 3):
            t = run(model, prompt, no_repeat_ngram_size=n)
            assert not torch.equal(t, plain), (i, n)
            assert ngram_free(prompt.tolist() + t.tolist(), n), (i, n)
            out[f"gen_tokens_ng{n}_{i}"] = t
            print(f"prompt {i} n={n}: {t.tolist()}")
        # n = 2 only: with n = 1 every id already seen is banned, which leaves the penalty nothing to do, and
        # n = 3 on prompt 0 gives the tokens of repetition_penalty alone.
        for n in (2,):
            t = run(model, prompt, no_repeat_ngram_size=n, repetition_penalty=RP)
            assert not torch.equal(t, rp) and not torch.equal(t, out[f"gen_tokens_ng{n}_{i}"]), (i, n)
            out[f"gen_tokens_ng{n}_rp_{i}"] = t
            print(f"prompt {i} n={n} rp={RP}: {t.tolist()}")
        print(f"prompt {i}: plain {plain.tolist()}\n          rp    {rp.tolist()}")
    save_file(out, os.path.join(OUT, "generate_ngram.safetensors"))


if __name__ == "__main__":
    main()
