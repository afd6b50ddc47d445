#!/usr/bin/env python
"""Checks that transformers (+ bitsandbytes) load what afinar exports, and compute the same thing.

Usage (run once; the output is recorded in tests/golden/fixtures/gemma_io_export_check.txt):

    rm -rf /tmp/afinar_export && mkdir /tmp/afinar_export
    AFINAR_IO_EXPORT_DIR=/tmp/afinar_export cargo test -p afinar-gemma --test io_export --test io_peft
    /work/venv/bin/python tests/golden/check_gemma_io_export.py /tmp/afinar_export

The Rust tests (crates/gemma/tests/it/io_export.rs, io_peft.rs) leave, under AFINAR_IO_EXPORT_DIR:
  adapter_saved/                              peft adapter a, loaded and saved again by afinar (save_adapter)
  merged_f32/, merged_bf16/, merged_sharded/  the fixture model + peft adapter a, merged (export_merged)
  nf4/                                        the dense fixture model exported as a bitsandbytes NF4
                                              checkpoint (export_nf4, double quant, float32)
  nf4_afinar_outputs.safetensors              what afinar computes from nf4/: the dequantized weight of
                                              every linear and the logits of the fixture batch
  nf4_bf16/, nf4_bf16_plain/                  bf16 NF4 exports (double quant / plain absmax, compute
                                              bfloat16), with *_afinar_dequant.safetensors: afinar's f32
                                              dequantized weights of each

Checks (each asserted):
  0. adapter_saved loads with peft's PeftModel.from_pretrained onto the fixture model and gives the
     logits of the original peft adapter.
  1. merged_f32 loads with transformers (eager, float32); logits equal peft's merge_and_unload logits
     (fixture logits_merged_a) to 1e-4 relative, and the un-merged peft logits likewise.
  2. merged_bf16 loads; its weights are bf16 and equal the bf16 rounding of merged_f32's weights exactly;
     config dtype is bfloat16.
  3. merged_sharded (several shards + index) loads and gives exactly merged_f32's logits.
  4. nf4 loads with transformers + bitsandbytes (quantization_config read from config.json); every
     linear is a bnb Linear4bit whose dequantize_4bit equals afinar's dequantized weight bit for bit,
     and the 4-bit model's logits equal afinar's logits within the f32 tolerance.
  5. nf4_bf16 and nf4_bf16_plain load with transformers + bitsandbytes (bf16 quant states); every
     dequantize_4bit (bf16) equals bf16(afinar's f32 dequantized weight), bit for bit.
  6. The tokenizer files copied into the exports load with AutoTokenizer.
"""
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Gemma2ForCausalLM
import bitsandbytes.functional as bnbf

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")


def close(name, got, want, rtol=1e-4, atol=1e-5):
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    print(f"  {name}: max |diff| {err.max().item():.3e}, {int(bad.sum())} of {want.numel()} outside tolerance")
    assert not bad.any(), name


def load(path, **kw):
    return Gemma2ForCausalLM.from_pretrained(path, attn_implementation="eager", **kw).eval()


def main(root):
    cases = load_file(os.path.join(FIX, "gemma_io_cases.safetensors"))
    ids = cases["input_ids"]

    print("0. adapter saved by afinar, loaded by peft")
    from peft import PeftModel
    base = load(os.path.join(FIX, "gemma_io_model"), dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, os.path.join(root, "adapter_saved")).eval()
    assert pm.peft_config["default"].r == 4 and pm.peft_config["default"].lora_alpha == 8
    with torch.no_grad():
        la = pm(ids).logits
    close("peft logits with afinar's adapter vs the original adapter", la, cases["logits_adapter_a"], rtol=0, atol=0)

    print("1. merged_f32")
    m = load(os.path.join(root, "merged_f32"), dtype=torch.float32)
    with torch.no_grad():
        lf = m(ids).logits
    close("logits vs peft merge_and_unload", lf, cases["logits_merged_a"])
    close("logits vs peft (unmerged adapter)", lf, cases["logits_adapter_a"])

    print("2. merged_bf16")
    mb = load(os.path.join(root, "merged_bf16"))
    assert mb.config.dtype == torch.bfloat16 or str(mb.config.dtype) == "bfloat16", mb.config.dtype
    sd32, sd16 = m.state_dict(), mb.state_dict()
    for k, v in sd16.items():
        assert v.dtype == torch.bfloat16, (k, v.dtype)
        assert torch.equal(v, sd32[k].to(torch.bfloat16)), k
    print(f"  {len(sd16)} tensors, all bf16 and equal to bf16(merged_f32)")

    print("3. merged_sharded")
    files = sorted(f for f in os.listdir(os.path.join(root, "merged_sharded")) if f.endswith(".safetensors"))
    ms = load(os.path.join(root, "merged_sharded"), dtype=torch.float32)
    with torch.no_grad():
        ls = ms(ids).logits
    assert torch.equal(ls, lf)
    print(f"  {len(files)} shards; logits identical to merged_f32")

    print("4. nf4 (transformers + bitsandbytes)")
    m4 = load(os.path.join(root, "nf4"), device_map="cpu", dtype=torch.float32)
    qc = m4.config.quantization_config
    print(f"  quantization_config: quant_type {qc.bnb_4bit_quant_type}, double quant {qc.bnb_4bit_use_double_quant}, "
          f"compute {qc.bnb_4bit_compute_dtype}")
    ours = load_file(os.path.join(root, "nf4_afinar_outputs.safetensors"))
    n = 0
    for name, mod in m4.named_modules():
        if type(mod).__name__ == "Linear4bit":
            mod.support_avx512bf16_for_cpu = False  # reference path: dequantize_4bit + F.linear in f32
            w = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            assert torch.equal(w, ours[name + ".weight"]), name
            n += 1
    assert n == 7 * m4.config.num_hidden_layers, n
    print(f"  {n} Linear4bit weights: dequantize_4bit == afinar's dequantized weights, bit for bit")
    with torch.no_grad():
        l4 = m4(ids).logits
    close("4-bit logits vs afinar", ours["logits"], l4)

    print("5. bf16 NF4 exports")
    for d in ("nf4_bf16", "nf4_bf16_plain"):
        mb4 = load(os.path.join(root, d), device_map="cpu")
        ours = load_file(os.path.join(root, d + "_afinar_dequant.safetensors"))
        n = 0
        for name, mod in mb4.named_modules():
            if type(mod).__name__ == "Linear4bit":
                qs = mod.weight.quant_state
                w = bnbf.dequantize_4bit(mod.weight.data, qs)
                assert w.dtype == torch.bfloat16, (name, w.dtype)
                assert torch.equal(w, ours[name + ".weight"].to(torch.bfloat16)), name
                n += 1
        assert n == 7 * mb4.config.num_hidden_layers, n
        print(f"  {d}: double quant {mb4.config.quantization_config.bnb_4bit_use_double_quant}, {n} Linear4bit "
              f"weights: dequantize_4bit (bf16) == bf16(afinar's dequantized weights), bit for bit")

    print("6. tokenizer")
    for d in ("merged_f32", "nf4"):
        tok = AutoTokenizer.from_pretrained(os.path.join(root, d))
        assert tok("w5 w6").input_ids[-2:] == [5, 6], tok("w5 w6")
    print("  AutoTokenizer loads the copied tokenizer files")
    print("all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
