#!/usr/bin/env python3
"""Golden fixtures for Afinar's NF4 quantization (crates/kernels/src/nf4.rs), made with bitsandbytes on CPU.

Run once, from the repository root, with the project's reference venv:
    /work/venv/bin/python tests/golden/make_nf4.py
It writes tests/golden/fixtures/nf4_golden.safetensors (raw little-endian tensors, so the Rust test compares
bits, not decimal text) and prints what it found about bitsandbytes' CPU behaviour.

Per case `<c>` the file holds:
  <c>.input            f32 [numel]   the dense input (flattened row-major; its shape is in the metadata)
  <c>.packed           u8  [ceil(numel/2)]  quantize_4bit(..., blocksize=64, quant_type="nf4") packed codes
  <c>.absmax           f32 [blocks]  plain absmax (compress_statistics=False)
  <c>.dequant_plain    f32 [numel]   dequantize_4bit of the plain state
  <c>.absmax_code_cpu  u8  [blocks]  8-bit absmax codes as bitsandbytes' CPU kernel produced them
                                     (compress_statistics=True)
  <c>.absmax_code      u8  [blocks]  the same codes under the CUDA dQuantize<0> rule (re-implemented below,
                                     checked against the CPU codes; see `cpu_vs_cuda` in the metadata)
  <c>.nested_absmax    f32 [ceil(blocks/256)]  state2.absmax
  <c>.offset           f32 [1]       state.offset (torch f32 mean of the plain absmax)
  <c>.dequant_nested   f32 [numel]   dequantize_4bit of the nested state whose codes are `absmax_code`
                                     (the CUDA-rule codes), computed by bitsandbytes itself
plus, once:
  dynamic_map          f32 [256]     create_dynamic_map() (bitsandbytes' nested_quant_map)
  nf4_code             f32 [16]      get_4bit_type("nf4")
Metadata (`__metadata__`, all strings): `torch_mean_cases` (see torch_mean_cases()), `<c>.shape` (JSON list), `<c>.quant_state_json` (the exact
`quant_state.bitsandbytes__nf4` blob for dtype float32), `<c>.cpu_vs_cuda` (JSON list of
[block, cpu_code, cuda_code, reason]), `versions`.
"""
import json
import os
import sys

import numpy as np
import torch
import bitsandbytes
import bitsandbytes.functional as F
from bitsandbytes.utils import pack_dict_to_tensor, unpack_tensor_to_dict
from safetensors.torch import save_file

f32 = np.float32
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "nf4_golden.safetensors")


def cuda_dquantize(code, x):
    """bitsandbytes csrc/kernels.cu `dQuantize<0>` (General8bit, not stochastic), in float32."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = f32(-1.0), f32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower = pivot, val
            pivot += i
        else:
            upper_pivot, upper = pivot, val
            pivot -= i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        mid = f32(f32(upper + val) * f32(0.5))
        return upper_pivot if x > mid else pivot
    mid = f32(f32(lower + val) * f32(0.5))
    return lower_pivot if x < mid else pivot


def cuda_quantize_blockwise(a, code, blocksize=256):
    """CUDA kQuantizeBlockwise<General8bit>: absmax = max|a| per block, inv = 1.0f/absmax, code of a*inv.
    Returns (codes u8, absmax f32, tie-notes)."""
    a = a.astype(f32)
    n = a.size
    nb = -(-n // blocksize)
    codes = np.zeros(n, np.uint8)
    amax = np.zeros(nb, f32)
    for b in range(nb):
        blk = a[b * blocksize:(b + 1) * blocksize]
        m = f32(np.max(np.abs(blk)))
        amax[b] = m
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = f32(f32(1.0) / m)
            for j, x in enumerate(blk):
                codes[b * blocksize + j] = cuda_dquantize(code, f32(x * inv))
    return codes, amax


def classify(code, x, c_cpu, c_cuda):
    """Why the CPU and CUDA codes of normalized value x differ."""
    d_cpu = abs(float(x) - float(code[c_cpu]))
    d_cuda = abs(float(x) - float(code[c_cuda]))
    if d_cpu == d_cuda:
        return "exact tie between two codes (CUDA keeps the binary-search pivot)"
    if d_cuda < d_cpu:
        return f"CPU LUT not nearest (|x-cpu|={d_cpu:.3e} > |x-cuda|={d_cuda:.3e})"
    return f"CUDA f32 midpoint rounding (|x-cuda|={d_cuda:.3e} > |x-cpu|={d_cpu:.3e})"


NF4_T = None


def nf4_code(xn):
    """Number of f32 NF4 midpoints strictly below xn."""
    return int(np.sum(NF4_T < f32(xn)))


def flips(amax, count, rng):
    """Values x near code thresholds·amax for which x·(1/amax) and x/amax get DIFFERENT NF4 codes, so a
    block built from them tells bitsandbytes' reciprocal-multiply rule (full blocks) from its division rule
    (the partial last block)."""
    out = []
    inv = f32(f32(1.0) / amax)
    for t in NF4_T:
        c = f32(t * amax)
        for k in range(-8, 9):
            x = f32(np.nextafter(c, np.inf if k > 0 else -np.inf)) if k else c
            for _ in range(abs(k) - 1):
                x = f32(np.nextafter(x, np.inf if k > 0 else -np.inf))
            if nf4_code(f32(x * inv)) != nf4_code(f32(x / amax)):
                out.append(x)
    assert len(out) >= 3, (amax, len(out))
    rng.shuffle(out)
    return out[:count]  # fewer when fewer exist


def crafted_case():
    global NF4_T
    code = F.get_4bit_type("nf4", device="cpu").numpy().astype(f32)
    NF4_T = np.array([f32(f32(code[i] + code[i + 1]) / f32(2)) for i in range(15)], f32)
    rng = np.random.default_rng(7)
    # Block 0: absmax exactly 1.0, so xn == x; every threshold exactly (a tie: must take the LOWER code),
    # and one ulp either side of it.
    b0 = [f32(1.0), f32(-1.0)] + list(NF4_T) + [np.nextafter(t, f32(np.inf)) for t in NF4_T] + \
         [np.nextafter(t, f32(-np.inf)) for t in NF4_T]
    b0 += list(rng.uniform(-1, 1, 64 - len(b0)).astype(f32))
    # Block 1: absmax 1.7; values where reciprocal-multiply and division disagree.
    a1 = f32(1.7)
    b1 = [a1] + flips(a1, 30, rng)
    b1 += list(rng.uniform(-1.6, 1.6, 64 - len(b1)).astype(f32))
    # Partial block of 40: absmax 1.3; same kind of values.
    a2 = f32(1.3)
    b2 = [a2] + flips(a2, 20, rng)
    b2 += list(rng.uniform(-1.2, 1.2, 40 - len(b2)).astype(f32))
    x = np.array(b0 + b1 + b2, f32)
    assert x.size == 168
    return torch.from_numpy(x)


def make_cases():
    cases = {}
    g = torch.Generator().manual_seed(20240601)
    # A typical weight: N(0, 0.02^2), 128 blocks (one partial nested block of 128).
    cases["randn_128x64"] = torch.randn(128, 64, generator=g) * 0.02
    # An all-zero 64-block in the middle.
    x = torch.randn(8, 64, generator=g)
    x[3] = 0.0
    cases["zero_block_8x64"] = x
    # A single huge outlier among N(0,1).
    x = torch.randn(16, 64, generator=g)
    x[5, 17] = 1.0e4
    cases["outlier_16x64"] = x
    # numel not a multiple of 64 (130 = 2 blocks + a partial block of 2), even numel.
    cases["ragged_10x13"] = torch.randn(10, 13, generator=g)
    # odd numel (193 = 3 blocks + 1 element): a padding nibble in the last byte.
    cases["ragged_odd_193"] = torch.randn(193, generator=g)
    # A partial block that is all zeros (numel 100: block 1 has 36 zeros).
    x = torch.randn(100, generator=g)
    x[64:] = 0.0
    cases["zero_tail_100"] = x
    # One block only: the nested absmax is 0 (absmax - mean == 0).
    cases["one_block_48"] = torch.randn(3, 16, generator=g)
    # Crafted ties and rounding traps (numel 168 = 2 full blocks + a partial block of 40), see crafted_case().
    cases["crafted_ties_168"] = crafted_case()
    # More than 256 blocks: 300 blocks -> 2 nested blocks, the second one partial (44).
    cases["big_64x300"] = torch.randn(64, 300, generator=g)
    return cases


def mean_probe(n):
    """Deterministic f32 values reproducible in Rust without a fixture: h = ((k·2654435761) mod 2^32) >> 8,
    v = f32(f32(h / 2^24) · 3) + 0.1 (every step an f32 operation)."""
    k = np.arange(n, dtype=np.uint64)
    h = ((k * np.uint64(2654435761)) % np.uint64(2 ** 32)) >> np.uint64(8)
    u = (h.astype(f32) / f32(2 ** 24)).astype(f32)
    return ((u * f32(3.0)).astype(f32) + f32(0.1)).astype(f32)


def torch_mean_cases():
    """torch's f32 mean (the double-quant offset) of mean_probe(n) for many n, with torch running 1, 2 and 4
    threads: pins the summation order (`afinar_kernels::nf4::torch_mean_f32` and `torch_mean_f32_threads`)
    beyond the NF4 cases. From 32768 elements on, torch splits the sum into per-thread chunks, so the bits
    depend on the thread count. Entries: [n, {threads: hex f32 bits}, whether an f64 sum rounded to f32 gives
    the single-thread bits]."""
    lens = list(range(1, 80)) + [100, 127, 128, 129, 255, 256, 257, 511, 512, 1000, 1023, 4095, 4096, 4097,
                                 10000, 32767, 32768, 32769, 65537, 100000, 131072, 200003]
    saved = torch.get_num_threads()
    out = []
    for n in lens:
        x = mean_probe(n)
        bits = {}
        for t in (1, 2, 4):
            torch.set_num_threads(t)
            bits[str(t)] = format(int(torch.from_numpy(x).mean().numpy().view(np.uint32)), "08x")
        f64 = f32(f32(x.astype(np.float64).sum()) / f32(n))
        out.append([n, bits, format(int(np.array(f64).view(np.uint32)), "08x") == bits["1"]])
    torch.set_num_threads(saved)
    print(f"torch mean probes: {len(out)} lengths, {sum(not e[2] for e in out)} where an f64 sum differs, "
          f"{sum(len(set(e[1].values())) > 1 for e in out)} where the thread count matters")
    return out


def main():
    tensors = {}
    meta = {}
    dmap = F.create_dynamic_map()
    dmap_np = dmap.numpy().astype(f32)
    tensors["dynamic_map"] = dmap.clone()
    tensors["nf4_code"] = F.get_4bit_type("nf4", device="cpu").float().clone()
    findings = []
    for name, x in make_cases().items():
        x = x.float().contiguous()
        shape = list(x.shape)
        meta[f"{name}.shape"] = json.dumps(shape)
        tensors[f"{name}.input"] = x.reshape(-1).clone()

        packed, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
        tensors[f"{name}.packed"] = packed.reshape(-1).clone()
        tensors[f"{name}.absmax"] = st.absmax.clone()
        tensors[f"{name}.dequant_plain"] = F.dequantize_4bit(packed, st).reshape(-1).clone()

        packed2, st2 = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(packed, packed2)
        offset = st2.offset
        assert offset.dtype == torch.float32 and offset.numel() == 1
        # The offset is exactly the torch f32 mean of the plain absmax.
        assert offset.item() == st.absmax.mean().item()
        cpu_codes = st2.absmax.numpy().copy()
        centered = (st.absmax - offset).numpy().astype(f32)
        cuda_codes, cuda_amax = cuda_quantize_blockwise(centered, dmap_np, 256)
        nested = st2.state2.absmax.numpy()
        # The nested absmax (max |absmax - offset| per 256 values) must agree with the CUDA formula.
        assert np.array_equal(nested.view(np.uint32), cuda_amax.view(np.uint32)), (name, nested, cuda_amax)
        diffs = []
        for b in np.nonzero(cpu_codes != cuda_codes)[0]:
            with np.errstate(divide="ignore", invalid="ignore"):
                xn = f32(centered[b] * f32(f32(1.0) / cuda_amax[b // 256]))
            diffs.append([int(b), int(cpu_codes[b]), int(cuda_codes[b]),
                          f"xn={float(xn)!r}: " + classify(dmap_np, xn, cpu_codes[b], cuda_codes[b])])
        meta[f"{name}.cpu_vs_cuda"] = json.dumps(diffs)
        if diffs:
            findings.append((name, diffs))
        tensors[f"{name}.absmax_code_cpu"] = torch.from_numpy(cpu_codes.astype(np.uint8))
        tensors[f"{name}.absmax_code"] = torch.from_numpy(cuda_codes.astype(np.uint8))
        tensors[f"{name}.nested_absmax"] = st2.state2.absmax.clone()
        tensors[f"{name}.offset"] = offset.reshape(1).clone()
        # Dequantize with the CUDA-rule codes, by bitsandbytes itself.
        st2.absmax = torch.from_numpy(cuda_codes.astype(np.uint8))
        tensors[f"{name}.dequant_nested"] = F.dequantize_4bit(packed2, st2).reshape(-1).clone()

        # The serialized quant-state blob (float32 dtype here; bf16 models say "bfloat16").
        qs = st2.as_dict(packed=True)
        blob = bytes(qs["quant_state.bitsandbytes__nf4"].tolist()).decode("utf-8")
        meta[f"{name}.quant_state_json"] = blob
        assert unpack_tensor_to_dict(qs["quant_state.bitsandbytes__nf4"])["nested_offset"] == offset.item()

        print(f"{name}: shape {shape}, blocks {st.absmax.numel()}, packed {packed.numel()} B, "
              f"offset {offset.item()!r}, nested {st2.state2.absmax.tolist()[:3]}, cpu/cuda code diffs {len(diffs)}")
    meta["torch_mean_cases"] = json.dumps(torch_mean_cases())
    meta["versions"] = json.dumps({
        "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "numpy": np.__version__,
        "python": sys.version.split()[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    })
    for name, diffs in findings:
        for d in diffs:
            print(f"  CPU vs CUDA 8-bit code, {name} block {d[0]}: cpu {d[1]} cuda {d[2]} ({d[3]})")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, OUT, metadata=meta)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
