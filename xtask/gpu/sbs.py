"""Afinar vs transformers + peft + bitsandbytes QLoRA on one GPU: the side by side that `run.sh` of the
GPU bundle (`cargo xtask gpu-bundle`) runs. Both sides train the same random Gemma-2 with the same
settings, which this script reads from the Afinar config the bundle carries (`afinar-sbs.toml`): LoRA
rank/alpha/dropout/targets, micro-batch, sequence length, lr, gradient clip, NF4 + double quant, bf16
compute, gradient checkpointing, paged AdamW.

Subcommands (each prints one JSON object on its last stdout line and, with --out, writes it there):

  make DIR --layers N [--vocab V]      random Gemma-2 with the Gemma-2-9B layer shape (needs torch and
                                       transformers, a GPU); copies the bundle's tokenizer into DIR
  data TEXTS.jsonl DIR [--rows N]      long {"text": …} rows (stdlib only): train.jsonl + eval.jsonl
  hf MODEL DATA CONFIG --steps N       transformers + peft + bitsandbytes QLoRA, median step after warm-up
  afinar BIN MODEL DATA CONFIG --steps N --run-dir D
                                       `afinar train` on the same model and data, same statistics
  report JSON... [--profile P]         Markdown table: tokens/s, step, peak GPU memory, ratio; profile
  repack-wheel IN.whl OUTDIR --keep-cuda 130
                                       a bitsandbytes wheel with only the CPU and one CUDA library

tokens/s on both sides = micro_batch × max_seq_len / median step time (steps after --warmup). Peak GPU
memory: nvidia-smi memory.used sampled every 250 ms during the whole process (includes the CUDA context
and, for Afinar, what the backend holds), minus the value before it started; torch's
max_memory_allocated for the transformers side.
"""
import argparse
import base64
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zipfile

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def emit(obj, out=None):
    text = json.dumps(obj)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------- config


def load_settings(config_path):
    """The shared settings, from the Afinar TOML (tomllib: Python ≥ 3.11)."""
    import tomllib

    with open(config_path, "rb") as f:
        c = tomllib.load(f)
    lora, train, data, model = c["lora"], c["train"], c["data"], c["model"]
    targets = lora.get("targets", ["all-linear"])
    if "all-linear" in targets:
        targets = SEVEN
    return {
        "r": int(lora["r"]),
        "alpha": float(lora["alpha"]),
        "dropout": float(lora.get("dropout", 0.0)),
        "targets": list(targets),
        "batch": int(train["micro_batch_size"]),
        "seq": int(data["max_seq_len"]),
        "lr": float(train["lr"]),
        "max_grad_norm": float(train.get("max_grad_norm", 1.0)),
        "checkpointing": bool(train.get("gradient_checkpointing", False)),
        "paged": bool(train.get("paged_optimizer", False)),
        "nf4": model.get("quantization", "none") == "nf4",
        "double_quant": bool(model.get("double_quant", True)),
        "dtype": model.get("dtype", "bf16"),
    }


# ------------------------------------------------------------------------------------ GPU memory sampler


class GpuMemory:
    """nvidia-smi memory.used (MiB) of GPU 0 every 250 ms, in a thread; `peak_mib` above the baseline."""

    def __init__(self):
        self.samples = []
        self.baseline = self._once()
        self.proc = None
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", "0", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                 "-lms", "250"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    @staticmethod
    def _once():
        try:
            out = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                 timeout=30).stdout
            return float(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not self.samples:
            return {"nvsmi_peak_mib": None, "nvsmi_baseline_mib": self.baseline}
        peak = max(self.samples)
        return {"nvsmi_peak_mib": peak - (self.baseline or 0.0), "nvsmi_baseline_mib": self.baseline,
                "nvsmi_samples": len(self.samples)}


def median_after_warmup(times, warmup):
    warm = times[warmup:] if len(times) > warmup else times
    return statistics.median(warm) if warm else None


# ----------------------------------------------------------------------------------------------- make


def cmd_make(a):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    t0 = time.time()
    cfg = Gemma2Config(vocab_size=a.vocab, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=a.layers, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                       hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                       rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=0, eos_token_id=1,
                       bos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    # Built on the GPU (seconds; the CPU init of 9 B parameters takes minutes), saved as bf16 shards.
    with torch.device("cuda"):
        m = Gemma2ForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in m.parameters())
    m.save_pretrained(a.dir, safe_serialization=True, max_shard_size="4GB")
    del m
    torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(a.tokenizer, name), os.path.join(a.dir, name))
    shards = [f for f in os.listdir(a.dir) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(a.dir, f)) for f in shards)
    emit({"made": a.dir, "layers": a.layers, "vocab": a.vocab, "params": n, "shards": len(shards),
          "bytes": size, "make_s": round(time.time() - t0, 1)}, a.out)


# ----------------------------------------------------------------------------------------------- data


def cmd_data(a):
    """Concatenates every string field of every record into rows of ≥ --chars characters (far more than
    max_seq_len tokens with the demo tokenizer), so each row truncates to exactly max_seq_len tokens."""
    pieces = []
    with open(a.texts) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            pieces.extend(v.strip() for v in rec.values() if isinstance(v, str) and v.strip())
    if not pieces:
        raise SystemExit(f"{a.texts}: no text fields")
    rng = random.Random(0)
    rows = []
    for _ in range(a.rows + 1):
        rng.shuffle(pieces)
        text, i = [], 0
        while sum(len(t) + 2 for t in text) < a.chars:
            text.append(pieces[i % len(pieces)])
            i += 1
        rows.append("\n\n".join(text))
    os.makedirs(a.dir, exist_ok=True)
    with open(os.path.join(a.dir, "train.jsonl"), "w") as f:
        for r in rows[:-1]:
            f.write(json.dumps({"text": r}, ensure_ascii=False) + "\n")
    with open(os.path.join(a.dir, "eval.jsonl"), "w") as f:
        f.write(json.dumps({"text": rows[-1]}, ensure_ascii=False) + "\n")
    emit({"data": a.dir, "train_rows": len(rows) - 1, "eval_rows": 1,
          "chars_per_row": min(len(r) for r in rows)}, a.out)


def batch_ids(data_dir, tokenizer_dir, batch, seq):
    """The first `batch` training rows as ids (BOS + text, truncated to seq) with the model's tokenizer,
    as Afinar's text format encodes them; random ids when the `tokenizers` package is missing."""
    import torch

    rows = []
    with open(os.path.join(data_dir, "train.jsonl")) as f:
        for line in f:
            rows.append(json.loads(line)["text"])
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        ids = []
        for r in rows[:batch]:
            e = tok.encode(r, add_special_tokens=False).ids
            ids.append(([2] + e)[:seq])
        if all(len(x) == seq for x in ids):
            return torch.tensor(ids, device="cuda"), "tokenized rows"
    except Exception:  # noqa: BLE001 - any tokenizer problem falls back to random ids (same count)
        pass
    g = torch.Generator(device="cuda").manual_seed(0)
    return torch.randint(3, 4096, (batch, seq), device="cuda", generator=g), "random ids"


# ------------------------------------------------------------------------------------------------- hf


def cmd_hf(a):
    s = load_settings(a.config)
    mem = GpuMemory()
    t_start = time.time()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t0 = time.time()
    if s["nf4"]:
        from peft import prepare_model_for_kbit_training

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=s["double_quant"],
                               bnb_4bit_compute_dtype=torch.bfloat16)
        m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, attn_implementation=a.impl,
                                                 quantization_config=q, device_map={"": 0})
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=s["checkpointing"],
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16,
                                                 attn_implementation=a.impl).cuda()
        if s["checkpointing"]:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()
    m = get_peft_model(m, LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                     task_type="CAUSAL_LM", target_modules=s["targets"]))
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    if s["paged"]:
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW32bit(params, lr=s["lr"])
    else:
        opt = torch.optim.AdamW(params, lr=s["lr"])
    ids, ids_kind = batch_ids(a.data, a.model, s["batch"], s["seq"])
    load_s = time.time() - t0
    import resource

    # Peak host RSS of the process up to here (Linux ru_maxrss is in KiB): the load's high-water mark.
    load_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(a.steps):
        torch.cuda.synchronize()
        t = time.time()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        if s["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.time() - t)
        losses.append(out.loss.item())
    peak_alloc = torch.cuda.max_memory_allocated()
    med = median_after_warmup(times, a.warmup)
    import peft
    import transformers

    try:
        import bitsandbytes as bnb_mod

        bnb_version = bnb_mod.__version__
    except ImportError:
        bnb_version = None

    quant = "QLoRA NF4" + ("+DQ" if s["double_quant"] else "") if s["nf4"] else "bf16 LoRA"
    emit({"side": f"transformers+peft+bitsandbytes {quant}, "
                  f"{'PagedAdamW32bit' if s['paged'] else 'AdamW'}, {a.impl} attention",
          "kind": "hf", "tokens_per_step": s["batch"] * s["seq"], "input": ids_kind,
          "step_s_median": round(med, 4), "tok_s": round(s["batch"] * s["seq"] / med, 1),
          "torch_peak_alloc_gib": round(peak_alloc / 2**30, 2), **mem.stop(),
          "load_s": round(load_s, 1), "load_host_peak_rss_gb": round(load_rss_gb, 2),
          "process_s": round(time.time() - t_start, 1),
          "step_times": [round(x, 4) for x in times], "losses": [round(x, 4) for x in losses],
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__, "bitsandbytes": bnb_version}}, a.out)


# --------------------------------------------------------------------------------------------- afinar


def cmd_afinar(a):
    s = load_settings(a.config)
    run_parent = os.path.dirname(os.path.abspath(a.run_dir))
    name = os.path.basename(os.path.abspath(a.run_dir))
    cmd = [a.bin, "train", "--config", a.config,
           "--set", f"model.path={a.model}",
           "--set", f"data.train={os.path.join(a.data, 'train.jsonl')}",
           "--set", f"data.eval={os.path.join(a.data, 'eval.jsonl')}",
           "--set", f"train.max_steps={a.steps}",
           "--output", run_parent, "--run-name", name, "--overwrite", "--json"]
    for kv in a.set:
        cmd += ["--set", kv]
    env = dict(os.environ, AFINAR_PROFILE="1")
    mem = GpuMemory()
    t0 = time.time()
    with open(a.log, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    process_s = time.time() - t0
    resolved = os.path.join(a.run_dir, "config.toml")
    if os.path.exists(resolved):
        # The run's resolved config: what --set changed counts (batch, length).
        s = load_settings(resolved)
    res = {"side": "Afinar " + ("QLoRA NF4" + ("+DQ" if s["double_quant"] else "") if s["nf4"]
                                else f"{s['dtype']} LoRA")
                   + (", paged AdamW" if s["paged"] else ", AdamW"),
           "kind": "afinar", "exit": rc, "tokens_per_step": s["batch"] * s["seq"], **mem.stop(),
           "process_s": round(process_s, 1)}
    metrics = os.path.join(a.run_dir, "metrics.jsonl")
    times, losses = [], []
    if os.path.exists(metrics):
        with open(metrics) as f:
            for line in f:
                r = json.loads(line)
                if r.get("tokens_per_s"):
                    # The trainer's per-step rate counts trained tokens; the step time is what both
                    # sides share.
                    times.append(r["tokens"] / r["tokens_per_s"])
                    losses.append(r.get("loss"))
    med = median_after_warmup(times, a.warmup)
    if med:
        res.update({"step_s_median": round(med, 4), "tok_s": round(s["batch"] * s["seq"] / med, 1),
                    "load_s": round(process_s - sum(times), 1)})
    # The loader's own summary line (model/stream.rs), printed on stderr when not quiet:
    # "loaded N tensors (X GB) in T s (R GB/s); host peak RSS P GB". When present, load_s is the
    # loader's time (checkpoint to a trainable model) and the process time minus the steps is kept
    # as startup_s (CUDA init, kernel compile, data, load).
    with open(a.log, errors="replace") as f:
        found = re.findall(r"loaded (\d+) tensors \(([\d.]+) GB\) in ([\d.]+) s \(([\d.]+) GB/s\)"
                           r"(?:; host peak RSS ([\d.]+) GB)?", f.read())
    if found:
        n, gb, secs, rate, rss = found[-1]
        if "load_s" in res:
            res["startup_s"] = res["load_s"]
        res.update({"load_s": float(secs), "load_tensors": int(n), "load_gb": float(gb),
                    "load_gb_per_s": float(rate)})
        if rss:
            res["load_host_peak_rss_gb"] = float(rss)
    res.update({"step_times": [round(x, 4) for x in times], "losses": losses,
                "profile": os.path.exists(os.path.join(a.run_dir, "profile.json"))})
    emit(res, a.out)
    if rc != 0:
        sys.exit(rc)


# --------------------------------------------------------------------------------------------- report


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def cmd_report(a):
    rows = []
    for p in a.results:
        if os.path.exists(p):
            with open(p) as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
            if lines:
                rows.append(json.loads(lines[-1]))
    out = ["| side | tokens/s | median step (s) | peak GPU MiB (nvidia-smi) | torch alloc GiB | load (s) |"
           " host peak RSS at load (GB) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.get('side', '?')} | {fmt(r.get('tok_s'), '.0f')} | {fmt(r.get('step_s_median'), '.3f')}"
                   f" | {fmt(r.get('nvsmi_peak_mib'), '.0f')} | {fmt(r.get('torch_peak_alloc_gib'), '.2f')}"
                   f" | {fmt(r.get('load_s'), '.1f')} | {fmt(r.get('load_host_peak_rss_gb'), '.2f')} |")
    af = next((r for r in rows if r.get("kind") == "afinar" and r.get("tok_s")), None)
    hf = next((r for r in rows if r.get("kind") == "hf" and r.get("tok_s")), None)
    out.append("")
    if af and hf:
        speed = af["tok_s"] / hf["tok_s"]
        line = f"Afinar / transformers: **{speed:.2f}× the speed**"
        if af.get("nvsmi_peak_mib") and hf.get("nvsmi_peak_mib"):
            line += f", {af['nvsmi_peak_mib'] / hf['nvsmi_peak_mib']:.2f}× the peak GPU memory"
        out.append(line + ".")
    else:
        out.append("Ratio: not available (a side failed; see its log).")
    if a.profile and os.path.exists(a.profile):
        with open(a.profile) as f:
            text = f.read()
        try:
            text = json.dumps(json.loads(text), indent=1)
        except ValueError:
            pass
        cut = text[: a.profile_chars]
        out += ["", "Afinar profile (profile.json" + (", truncated" if len(text) > len(cut) else "") + "):",
                "", "```json", cut, "```"]
    elif a.profile:
        out += ["", "Afinar profile: no profile.json in the run directory (the build has no profiler yet)."]
    print("\n".join(out))


# ---------------------------------------------------------------------------------------- repack-wheel


def cmd_repack_wheel(a):
    """Copies a bitsandbytes wheel without the native libraries of other CUDA/ROCm/XPU versions, and
    rewrites RECORD to match (pip reads it to install and uninstall)."""
    keep = {f"libbitsandbytes_cuda{a.keep_cuda}.so", "libbitsandbytes_cpu.so"}
    os.makedirs(a.outdir, exist_ok=True)
    dst = os.path.join(a.outdir, os.path.basename(a.wheel))
    dropped, kept = [], []
    with zipfile.ZipFile(a.wheel) as zin, zipfile.ZipFile(dst + ".part", "w", zipfile.ZIP_DEFLATED) as zout:
        names = zin.namelist()
        record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
        if record is None:
            raise SystemExit(f"{a.wheel}: no .dist-info/RECORD (not a wheel?)")
        for n in names:
            base = n.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and base.endswith(".so") and base not in keep:
                dropped.append(n)
                continue
            if n == record:
                continue
            kept.append(n)
            zout.writestr(zin.getinfo(n), zin.read(n))
        if not any(n.rsplit("/", 1)[-1] == f"libbitsandbytes_cuda{a.keep_cuda}.so" for n in kept):
            raise SystemExit(f"{a.wheel}: has no libbitsandbytes_cuda{a.keep_cuda}.so")
        lines = []
        for line in zin.read(record).decode().splitlines():
            path = line.split(",", 1)[0]
            if path in dropped:
                continue
            lines.append(line)
        zout.writestr(zin.getinfo(record), "\n".join(lines) + "\n")
    os.replace(dst + ".part", dst)
    emit({"wheel": dst, "bytes": os.path.getsize(dst), "dropped": len(dropped), "kept": len(kept) + 1}, a.out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--layers", type=int, required=True)
    m.add_argument("--vocab", type=int, default=256000)
    m.add_argument("--tokenizer", required=True, help="folder with tokenizer.json + tokenizer_config.json")

    d = sub.add_parser("data")
    d.add_argument("texts")
    d.add_argument("dir")
    d.add_argument("--rows", type=int, default=8)
    d.add_argument("--chars", type=int, default=20000)

    h = sub.add_parser("hf")
    h.add_argument("model")
    h.add_argument("data")
    h.add_argument("config")
    h.add_argument("--steps", type=int, required=True)
    h.add_argument("--warmup", type=int, default=2)
    h.add_argument("--impl", default="eager", help="attention implementation (eager honours the soft-cap)")

    f = sub.add_parser("afinar")
    f.add_argument("bin")
    f.add_argument("model")
    f.add_argument("data")
    f.add_argument("config")
    f.add_argument("--steps", type=int, required=True)
    f.add_argument("--warmup", type=int, default=2)
    f.add_argument("--run-dir", required=True)
    f.add_argument("--log", required=True)
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `afinar train --set` override (repeatable), e.g. model.device=cpu")

    r = sub.add_parser("report")
    r.add_argument("results", nargs="+")
    r.add_argument("--profile")
    r.add_argument("--profile-chars", type=int, default=6000)

    w = sub.add_parser("repack-wheel")
    w.add_argument("wheel")
    w.add_argument("outdir")
    w.add_argument("--keep-cuda", default="130")

    for sp in (m, d, h, f, w):
        sp.add_argument("--out", help="also write the JSON result to this file")
    a = p.parse_args(argv)
    {"make": cmd_make, "data": cmd_data, "hf": cmd_hf, "afinar": cmd_afinar, "report": cmd_report,
     "repack-wheel": cmd_repack_wheel}[a.cmd](a)


if __name__ == "__main__":
    main()
