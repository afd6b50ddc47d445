#!/usr/bin/env python
"""Golden fixtures for afinar-gemma's model core: logits, loss and gradients against transformers + peft.

Run once with the project's reference venv (torch 2.15 CPU, transformers 5.24, peft 0.21.2):

    /work/venv/bin/python tests/golden/make_gemma.py

For each of three tiny random Gemma-2 models it writes tests/golden/fixtures/gemma_tiny_{a,b,c}/:

  config.json, model.safetensors   the base model (float32, HF layout, tied head: no lm_head.weight)
  adapter/                         peft save_pretrained of a LoRA adapter with NON-ZERO B
                                   (adapter_config.json + adapter_model.safetensors)
  cases.safetensors                inputs and reference outputs (float32 unless noted):
      input_ids     I64 [B, T]
      labels        I64 [B, T]     HF labels (unshifted) with some -100
      position_ids  I64 [B, T]     restarting positions (a packed-like row) used for logits_pos
      logits_base   [B, T, V]      base model, eager attention
      logits        [B, T, V]      base + adapter (peft), eval mode
      logits_pos    [B, T, V]      base + adapter with position_ids
      loss          [1]            HF loss (mean CE over scored shifted labels) of base + adapter
      loss_base     [1]            HF loss of the base model
      grad.<peft name>             d loss / d LoRA A and B (peft names, ".default" removed)
      full_grad.<HF name>          (model a only) d loss_base / d every base parameter (full fine-tune)

Coverage: every model has 4+ layers with sliding_window < T; q·D != hidden in a and b; GQA ratios 2 (a),
1 (b), 4 (c); query_pre_attn_scalar != head_dim (a, c); both soft-caps on everywhere, small caps in b and
c so the tanh is far from linear; vocab 101, 131, 257 (not multiples of 64). RMSNorm offsets are set to
non-zero values so a wrong (1 + w) would show.
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import Gemma2Config, Gemma2ForCausalLM
from peft import LoraConfig, get_peft_model

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")

MODELS = {
    "a": dict(
        cfg=dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0, initializer_range=0.3),
        lora=dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=False),
        b=2, t=12, full=True,
    ),
    "b": dict(
        cfg=dict(vocab_size=131, hidden_size=48, intermediate_size=40, num_hidden_layers=5, num_attention_heads=3,
                 num_key_value_heads=3, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                 attn_logit_softcapping=3.0, final_logit_softcapping=5.0, initializer_range=0.4, rope_theta=500.0),
        lora=dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj", "o_proj"], use_rslora=True),
        b=3, t=9, full=False,
    ),
    "c": dict(
        cfg=dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16, sliding_window=3, query_pre_attn_scalar=32,
                 attn_logit_softcapping=4.0, final_logit_softcapping=8.0, initializer_range=0.3),
        lora=dict(r=2, lora_alpha=5, target_modules=["k_proj", "gate_proj", "up_proj"], use_rslora=False),
        b=2, t=10, full=False,
    ),
}


def fresh(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def hf_loss(logits, labels):
    """transformers ForCausalLMLoss: pad labels by one -100, shift, mean CE over scored tokens (float32)."""
    v = logits.shape[-1]
    lab = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, v), lab.reshape(-1), ignore_index=-100)


def make(tag, spec):
    torch.manual_seed(1000 + ord(tag))
    d = os.path.join(OUT, f"gemma_tiny_{tag}")
    fresh(d)
    cfg = Gemma2Config(max_position_embeddings=128, attn_implementation="eager", pad_token_id=0, eos_token_id=1,
                       bos_token_id=2, **spec["cfg"])
    model = Gemma2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # Non-zero offsets (a wrong 1 + w shows); post-norms scaled up so layers matter.
                p.copy_(torch.randn_like(p) * 0.2 + (2.0 if ".post_" in name else 0.0))
    model.save_pretrained(d)
    model = Gemma2ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    for f in os.listdir(d):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(d, f))

    b, t, v = spec["b"], spec["t"], cfg.vocab_size
    ids = torch.randint(3, v, (b, t))
    ids[:, 0] = 2
    labels = ids.clone()
    labels[0, : t // 3] = -100          # a masked prompt
    labels[-1, -2] = -100               # a hole in the middle of the last row
    pos = torch.cat([torch.arange(t // 2), torch.arange(t - t // 2)]).repeat(b, 1)
    cases = {"input_ids": ids, "labels": labels, "position_ids": pos}

    # Base model: logits, loss, and (model a) gradients of every base parameter.
    model.zero_grad()
    out = model(ids)
    cases["logits_base"] = out.logits.detach().float()
    loss_base = hf_loss(out.logits, labels)
    cases["loss_base"] = loss_base.detach().reshape(1)
    if spec["full"]:
        loss_base.backward()
        for name, p in model.named_parameters():
            cases[f"full_grad.{name}"] = p.grad.detach().clone()
        model.zero_grad()

    # LoRA adapter with random (non-zero) A and B.
    lc = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **spec["lora"])
    pm = get_peft_model(model, lc)
    pm.eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    ad = os.path.join(d, "adapter")
    pm.save_pretrained(ad)
    readme = os.path.join(ad, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    out = pm(input_ids=ids)
    cases["logits"] = out.logits.detach().float()
    loss = hf_loss(out.logits, labels)
    cases["loss"] = loss.detach().reshape(1)
    loss.backward()
    n_grads = 0
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert "lora_" in name, name
            cases["grad." + name.replace(".default", "")] = p.grad.detach().clone()
            n_grads += 1
    with torch.no_grad():
        cases["logits_pos"] = pm(input_ids=ids, position_ids=pos).logits.float()
    save_file({k: v.contiguous() for k, v in cases.items()}, os.path.join(d, "cases.safetensors"),
              metadata={"format": "pt"})
    print(f"gemma_tiny_{tag}: loss {loss.item():.6f} (base {loss_base.item():.6f}), {n_grads} LoRA grads, "
          f"logit range [{cases['logits'].min():.3f}, {cases['logits'].max():.3f}]")


def main():
    for tag, spec in MODELS.items():
        make(tag, spec)


if __name__ == "__main__":
    main()
