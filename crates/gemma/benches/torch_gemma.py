#!/usr/bin/env python
"""PyTorch reference for `cargo bench -p afinar-gemma`: the same "small" Gemma-2 config, B=4, T=256,
peft LoRA r=16 on all linear layers, float32 dense base (bitsandbytes' CPU 4-bit path is not a fair or
correct reference on this machine), eager attention, forward + backward, same thread count.

    /work/venv/bin/python crates/gemma/benches/torch_gemma.py [threads] [steps] [checkpointing:0|1]

Prints one Markdown row like the Rust bench.
"""
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
ckpt = len(sys.argv) > 3 and sys.argv[3] == "1"
torch.set_num_threads(threads)
torch.manual_seed(0)
B, T = 4, 256
cfg = Gemma2Config(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64, sliding_window=128,
                   attn_implementation="eager")
model = Gemma2ForCausalLM(cfg).float()
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
model.train()
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
ids = torch.randint(0, 8192, (B, T))
labels = torch.randint(0, 8192, (B, T))


def step():
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.item()


loss = step()
t0 = time.perf_counter()
for _ in range(steps):
    step()
secs = (time.perf_counter() - t0) / steps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"| PyTorch {torch.__version__} f32 dense + peft | {'on' if ckpt else 'off'} | {B * T / secs:.0f} | {secs:.2f} | {peak:.0f} | {loss:.4f} |")
