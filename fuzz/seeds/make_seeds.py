"""Writes the small seed corpus of each fuzz target into fuzz/seeds/<target>/ (deterministic).

Run from the repository root: /work/venv/bin/python fuzz/seeds/make_seeds.py
Input layouts are described at the top of each fuzz/fuzz_targets/*.rs; SEP separates files.
"""
import json
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fuzz" / "seeds"
SEP = b"\n=====\n"


def write(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def st(tensors, metadata=None):
    """A safetensors file from [(name, dtype, shape, bytes)] (data laid out in the given order)."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors)


def f32(vals):
    return struct.pack(f"<{len(vals)}f", *vals)


# --- dataset: byte 0 = options, byte 1 = max_seq_len (<< 1 | drop), rest = file ----------------
train = (ROOT / "datasets/academico-riguroso/train.jsonl").read_text().splitlines()
write("dataset", "auto_jsonl", bytes([4, 64 << 1]) + "\n".join(train[:2]).encode() + b"\n")
alp = [
    {"instruction": "Suma", "input": "1 y 2", "output": "3"},
    {"instruction": "Hola", "output": "Buenas", "system": "Sé breve."},
]
write("dataset", "alpaca_array", bytes([0, 255]) + json.dumps(alp, ensure_ascii=False).encode())
msgs = {"messages": [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "content": "a2"},
]}
write("dataset", "messages_gemma", bytes([1 | 2 << 3 | 1 << 6, 40]) + json.dumps(msgs).encode() + b"\n")
write("dataset", "messages_chatml", bytes([1 | 1 << 3, 9]) + json.dumps(msgs).encode() + b"\n")
write("dataset", "messages_tokenizer", bytes([4 | 4 << 3, 80]) + json.dumps(msgs).encode())
sg = [{"conversations": [{"from": "human", "value": "hola"}, {"from": "gpt", "value": "qué tal"}]}]
write("dataset", "sharegpt_llama3", bytes([2 | 3 << 3, 100]) + json.dumps(sg).encode())
write("dataset", "text_drop", bytes([3, 7]) + b'{"text": "uno dos tres"}\n{"text": ""}\n')

# --- jinja: the template source --------------------------------------------------------------
cfg = json.loads((ROOT / "tests/fixtures/tokenizer/tokenizer_config.json").read_text())
write("jinja", "gemma", cfg["chat_template"].encode())
write("jinja", "chatml_ns", (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
).encode())
write("jinja", "strftime", (
    "{{ bos_token }}Hoy: {{ strftime_now('%Y-%m-%d %-d %_5A %^b %j %U %G-W%V %f %%') }}"
    "{% for m in messages %}{% generation %}{{ m.content | tojson }}{% endgeneration %}"
    "{{ eos_token }}{% endfor %}"
).encode())

# --- safetensors: byte 0 = mode (bit 0: sharded) ---------------------------------------------
single = st([
    ("model.embed_tokens.weight", "F32", [2, 3], f32([1, 2, 3, 4, 5, 6])),
    ("model.norm.weight", "BF16", [2], b"\x80\x3f\x00\x40"),
    ("h", "F16", [1], b"\x00\x3c"),
    ("d", "F64", [1], struct.pack("<d", 0.5)),
    ("empty", "F32", [0, 5], b""),
], metadata={"format": "pt"})
write("safetensors", "single", b"\x00" + single)
# A bitsandbytes NF4 weight [2, 64] (blocksize 64: 2 blocks), not double-quantized.
nf4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
qs = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 64]}).encode()
w = "model.layers.0.self_attn.q_proj.weight"
bnb = st([
    (w, "U8", [64, 1], bytes(range(64))),
    (w + ".absmax", "F32", [2], f32([0.5, 2.0])),
    (w + ".quant_map", "F32", [16], f32(nf4)),
    (w + ".quant_state.bitsandbytes__nf4", "U8", [len(qs)], qs),
])
write("safetensors", "bnb", b"\x00" + bnb)
index = json.dumps({"metadata": {"total_size": 20}, "weight_map": {
    "a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}}).encode()
s1 = st([("a", "F32", [2], f32([1, 2]))])
s2 = st([("b", "F32", [1], f32([3])), ("c", "BF16", [1, 1], b"\x80\x3f")])
write("safetensors", "sharded", b"\x01" + index + SEP + s1 + SEP + s2)

# --- model_json: byte 0 % 4 = config / adapter config / quant state / adapter dir ---------------
write("model_json", "config_demo", b"\x00" + (ROOT / "models/afinar-demo/config.json").read_bytes())
write("model_json", "config_tiny", b"\x00" + (ROOT / "tests/golden/fixtures/gemma_tiny_a/config.json").read_bytes())
acfg = (ROOT / "tests/golden/fixtures/gemma_tiny_c/adapter/adapter_config.json").read_bytes()
write("model_json", "adapter_config", b"\x01" + acfg)
write("model_json", "quant_state", b"\x02" + json.dumps({
    "quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, 128],
    "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0125}).encode())
p = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"
ad = []
for layer in range(2):
    for t in ["q_proj", "v_proj"]:
        ad.append((p.format(layer, t, "A"), "F32", [2, 4], f32([0.1 * i for i in range(8)])))
        ad.append((p.format(layer, t, "B"), "F32", [4, 2], f32([0.2 * i for i in range(8)])))
acfg2 = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
                    "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                    "use_rslora": False, "bias": "none"}).encode()
write("model_json", "adapter_dir", b"\x03" + acfg2 + SEP + st(ad))

# --- trainer: byte 0 bit 0 = config TOML (+ --set lines) / checkpoint dir ----------------------
for name in ["default", "gemma2-9b-qlora"]:
    toml = (ROOT / f"configs/{name}.toml").read_bytes()
    write("trainer", f"config_{name}", b"\x00" + toml + SEP + b"train.lr=0.0001\nlora.r=4\ndata.template_date=2026-01-02")
state = {"step": 3, "adam_t": 3, "total_steps": 10, "warmup_steps": 1,
         "cursor": {"epoch": 0, "position": 3, "fingerprint": 12345},
         "rng": {"seed": list(range(32)), "stream": 0, "word_pos": "64"},
         "nonfinite_in_row": 0, "tokens": 99, "elapsed_s": 1.5, "config_hash": "abc",
         "last_eval_loss": None, "loss_scale": {"scale": 65536.0, "growth_tracker": 2}}
tens = []
for k in ["param", "adam_m", "adam_v"]:
    tens.append((f"{k}/layers.0.q_proj.lora_A", "F32", [2, 3], f32([0.5] * 6)))
write("trainer", "checkpoint", b"\x01" + json.dumps(state).encode() + SEP + b"[train]\nlr = 0.1\n" + SEP + st(tens))

# --- tokenizer: byte 0 bit 0 = tokenizer_config.json (0) or tokenizer.json (1) ------------------
write("tokenizer", "config", b"\x00" + (ROOT / "tests/fixtures/tokenizer/tokenizer_config.json").read_bytes())
small = {"version": "1.0", "truncation": None, "padding": None,
         "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                           "normalized": False, "special": True}
                          for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"])],
         "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
         "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
         "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                   "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                   "vocab": {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 4, "<end_of_turn>": 5,
                             "h": 6, "o": 7, "l": 8, "a": 9, "ho": 10},
                   "merges": [["h", "o"]]}}
write("tokenizer", "small_bpe", b"\x01" + json.dumps(small).encode())
