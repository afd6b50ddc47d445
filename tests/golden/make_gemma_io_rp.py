"""Golden tokens for transformers' repetition_penalty on the committed gemma_io fixture model.

Reads tests/golden/fixtures/gemma_io_model and the prompts gen_prompt_0/1 of gemma_io_cases.safetensors
(written by make_gemma_io.py; this script does not change them) and writes
tests/golden/fixtures/gemma_io_rp.safetensors:

      gen_tokens_rp_0/1      I64 [20]      model.generate(do_sample=False, repetition_penalty=1.3,
                                           max_new_tokens=20), EOS disabled

Run with /work/venv/bin/python tests/golden/make_gemma_io_rp.py.
"""

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
MODEL = os.path.join(OUT, "gemma_io_model")
P = 1.3


def main():
    cases = load_file(os.path.join(OUT, "gemma_io_cases.safetensors"))
    model = Gemma2ForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    out = {}
    for i in range(2):
        prompt = cases[f"gen_prompt_{i}"].to(torch.int64)
        seq = model.generate(prompt[None, :], do_sample=False, repetition_penalty=P, max_new_tokens=20,
                             eos_token_id=None, pad_token_id=0)
        new = seq[0, prompt.numel():].contiguous()
        assert new.numel() == 20, new
        plain = cases[f"gen_tokens_{i}"].to(torch.int64)
        print(f"prompt {i}: rp={P} -> {new.tolist()} (plain {plain.tolist()})")
        out[f"gen_tokens_rp_{i}"] = new
    save_file(out, os.path.join(OUT, "gemma_io_rp.safetensors"))


if __name__ == "__main__":
    main()
