#!/usr/bin/env python
"""Golden fixtures for afinar-gemma's IO: PEFT adapters, KV-cache generation, merge, bitsandbytes 4-bit.

Run once with the project's reference venv (torch 2.15 CPU, transformers 5.24, peft 0.21.2,
bitsandbytes 0.50.2):

    /work/venv/bin/python tests/golden/make_gemma_io.py

It writes, under tests/golden/fixtures/ (all float32, all tiny):

  gemma_io_model/             a random tiny Gemma-2 in the HF layout (config.json, model.safetensors,
                              generation_config.json, tokenizer.json, tokenizer_config.json).
                              hidden 64, 2 layers (sliding, full), 4 heads x head_dim 32 (128 !=
                              hidden), 2 kv heads (GQA 2), intermediate 64, vocab 97, sliding_window 6,
                              query_pre_attn_scalar 24 (!= head_dim), both soft-caps on. Every linear
                              has in_features % 64 == 0, like every real Gemma-2: bitsandbytes 0.50.2's
                              CPU dequantize_4bit is wrong when a 64-block crosses a row (it then uses
                              the first block's absmax for the whole tensor), so a fixture with
                              in_features 32 would record bitsandbytes' bug, not its format.
  gemma_io_adapter_a/         peft save_pretrained: r 4, alpha 8, target "all-linear", random non-zero B.
  gemma_io_adapter_b/         peft save_pretrained: r 2, alpha 4, rsLoRA, module-path targets
                              ["self_attn.q_proj", "self_attn.v_proj"], random non-zero B.
  gemma_io_bnb/               the same model loaded by transformers with BitsAndBytesConfig(nf4, double
                              quant, compute float32) and saved with save_pretrained: a pre-quantized
                              bitsandbytes 4-bit checkpoint (keys of facts §3.6).
  gemma_io_cases.safetensors  inputs and reference outputs:
      input_ids              I64 [2, 10]   (T=10 > sliding_window 6)
      logits_base            F32 [2, 10, 97]
      logits_adapter_a       F32 [2, 10, 97]  transformers + peft with adapter a
      logits_adapter_b       F32 [2, 10, 97]  transformers + peft with adapter b
      logits_merged_a        F32 [2, 10, 97]  after merge_and_unload of adapter a
      logits_bnb             F32 [2, 10, 97]  transformers + bitsandbytes 4-bit model
      logits_bnb_adapter_a   F32 [2, 10, 97]  QLoRA: 4-bit model + adapter a
      gen_prompt_0/1         I64 [8]       prompts (8 + 20 > window 6: the window matters)
      gen_tokens_0/1         I64 [20]      model.generate(do_sample=False, max_new_tokens=20), EOS disabled
      gen_tokens_a_0         I64 [20]      the same with adapter a, prompt 0
      gen_margin             F32 [1]       smallest top1-top2 logit gap met during the greedy runs
  gemma_io_merged_a.safetensors  every linear weight after peft merge_and_unload of adapter a (HF names).
  gemma_io_bnb_dequant.safetensors  bitsandbytes dequantize_4bit of every 4-bit weight of gemma_io_bnb
                              (HF names), the exact values the 4-bit model computes with.

Checks done here (asserted): greedy generate equals a cache-free argmax loop; the greedy runs never
meet a near-tie (gap > 1e-3), so float-order differences cannot flip a token.
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, Gemma2Config, Gemma2ForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model
import bitsandbytes.functional as bnbf

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
MODEL = os.path.join(OUT, "gemma_io_model")
AD_A = os.path.join(OUT, "gemma_io_adapter_a")
AD_B = os.path.join(OUT, "gemma_io_adapter_b")
BNB = os.path.join(OUT, "gemma_io_bnb")
VOCAB = 97


def fresh(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def load_base():
    return Gemma2ForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()


def write_tokenizer(path):
    """A tiny word-level tokenizer over the 97 ids (only so that export has tokenizer files to copy)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for i in range(4, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}, f, indent=2)


def greedy(model, prompt, n):
    """generate(do_sample=False) with EOS disabled, checked against a cache-free argmax loop."""
    ids = prompt[None, :]
    out = model.generate(ids, do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, prompt.numel():]
    assert new.numel() == n, new
    # Cache-free reference and the smallest top-1/top-2 gap.
    seq = prompt.clone()
    margin = float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq[None, :]).logits[0, -1]
            top = torch.topk(logits, 2).values
            margin = min(margin, float(top[0] - top[1]))
            seq = torch.cat([seq, logits.argmax().reshape(1)])
    assert torch.equal(seq[prompt.numel():], new), (seq, new)
    return new, margin


def main():
    torch.manual_seed(20261129)
    cfg = Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=6, query_pre_attn_scalar=24,
        max_position_embeddings=128, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        initializer_range=0.25, attn_implementation="eager", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma2ForCausalLM(cfg).float().eval()
    # The RMSNorm offsets start at zero; give them values so that a wrong (1 + w) would show. The post-
    # attention / post-feedforward norms get a large scale (about 6) so the layers outweigh the token's own
    # embedding in the residual stream: otherwise a random model with a tied head just repeats the last
    # token, and greedy decoding would not exercise the KV cache and the window.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (5.0 if ".post_" in name else 0.0))
    fresh(MODEL)
    model.save_pretrained(MODEL)
    write_tokenizer(MODEL)

    ids = torch.randint(3, VOCAB, (2, 10))
    ids[:, 0] = 2
    cases = {"input_ids": ids}
    base = load_base()
    with torch.no_grad():
        cases["logits_base"] = base(ids).logits.float()

    # Generation (base model).
    margin = float("inf")
    for i in range(2):
        prompt = torch.randint(3, VOCAB, (8,))
        prompt[0] = 2
        toks, m = greedy(base, prompt, 20)
        cases[f"gen_prompt_{i}"] = prompt
        cases[f"gen_tokens_{i}"] = toks
        margin = min(margin, m)
        print(f"prompt {i}: {prompt.tolist()} -> {toks.tolist()} (min gap {m:.4f})")

    # Adapter a: all-linear, random B (init_lora_weights=False gives non-zero B).
    torch.manual_seed(1)
    pm = get_peft_model(load_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                                task_type="CAUSAL_LM", init_lora_weights=False))
    pm.eval()
    fresh(AD_A)
    pm.save_pretrained(AD_A)
    with torch.no_grad():
        cases["logits_adapter_a"] = pm(ids).logits.float()
    toks, m = greedy(pm, cases["gen_prompt_0"], 20)
    cases["gen_tokens_a_0"] = toks
    margin = min(margin, m)
    print(f"adapter a: {toks.tolist()} (min gap {m:.4f})")
    merged = pm.merge_and_unload()
    with torch.no_grad():
        cases["logits_merged_a"] = merged(ids).logits.float()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items() if k.endswith("proj.weight")},
              os.path.join(OUT, "gemma_io_merged_a.safetensors"), metadata={"format": "pt"})

    # Adapter b: rsLoRA, module-path targets.
    torch.manual_seed(2)
    pm = get_peft_model(load_base(), LoraConfig(r=2, lora_alpha=4, use_rslora=True,
                                                target_modules=["self_attn.q_proj", "self_attn.v_proj"],
                                                lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False))
    pm.eval()
    fresh(AD_B)
    pm.save_pretrained(AD_B)
    with torch.no_grad():
        cases["logits_adapter_b"] = pm(ids).logits.float()

    # bitsandbytes 4-bit (nf4, double quant, compute float32) built from the same f32 weights.
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    m4 = Gemma2ForCausalLM.from_pretrained(MODEL, quantization_config=q, device_map="cpu", dtype=torch.float32,
                                           attn_implementation="eager").eval()
    for mod in m4.modules():
        if type(mod).__name__ == "Linear4bit":
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for a fused bf16 CPU kernel (and needs
            # out % 32 == 0). Turn that off: the reference is dequantize_4bit + F.linear in float32.
            mod.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        cases["logits_bnb"] = m4(ids).logits.float()
    fresh(BNB)
    m4.save_pretrained(BNB)
    deq = {}
    for name, mod in m4.named_modules():
        if type(mod).__name__ == "Linear4bit":
            w = mod.weight
            deq[name + ".weight"] = bnbf.dequantize_4bit(w.data, w.quant_state).float().contiguous()
    save_file(deq, os.path.join(OUT, "gemma_io_bnb_dequant.safetensors"), metadata={"format": "pt"})
    pq = PeftModel.from_pretrained(m4, AD_A).eval()
    with torch.no_grad():
        cases["logits_bnb_adapter_a"] = pq(ids).logits.float()

    for d in (AD_A, AD_B):
        readme = os.path.join(d, "README.md")
        if os.path.exists(readme):
            os.remove(readme)  # peft's model card: not needed, keeps the fixtures small
    assert margin > 1e-3, f"near-tie in greedy decoding ({margin}); pick another seed"
    cases["gen_margin"] = torch.tensor([margin], dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in cases.items()}, os.path.join(OUT, "gemma_io_cases.safetensors"),
              metadata={"format": "pt"})
    print("min greedy gap", margin)


if __name__ == "__main__":
    main()
