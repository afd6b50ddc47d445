#!/usr/bin/env python3
"""Golden fixture for Afinar's AdamW step (crates/kernels/src/cpu/adamw.rs): torch.optim.AdamW.

Run once, from the repository root, with the project's reference venv:
    /work/venv/bin/python tests/golden/make_adamw.py
It writes tests/golden/fixtures/adamw.json. Every float is stored as the 8-hex-digit big-endian string of
its IEEE-754 float32 bits (e.g. 1.0 -> "3f800000"), so the Rust test reads back exact values.

Contents: the hyper-parameters; for each parameter tensor its name, shape and initial values; for each of
the 10 steps the gradient fed to each parameter and, after `optimizer.step()`, the parameter, exp_avg and
exp_avg_sq. Gradients vary in scale per step (1, 1e-1, 1e-2, 1e-3, ...) and one parameter starts near 0.
"""
import json
import os
import sys

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "adamw.json")
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
STEPS = 10


def hexes(t):
    a = t.detach().contiguous().reshape(-1).numpy().astype(np.float32)
    return [format(int(u), "08x") for u in a.view(np.uint32)]


def main():
    g = torch.Generator().manual_seed(1234)
    shapes = {"w_37": (37,), "w_8x16": (8, 16), "w_5": (5,), "tiny_3x3": (3, 3)}
    init = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=g)
        if name == "tiny_3x3":
            x = x * 1e-4  # values near zero: the relative comparison is at its hardest here
        init[name] = x
    params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.AdamW(list(params.values()), foreach=False, **HP)
    steps = []
    for k in range(STEPS):
        scale = 10.0 ** (-(k % 4))
        grads = {n: torch.randn(s, generator=g) * scale for n, s in shapes.items()}
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
        steps.append({
            "grad": {n: hexes(grads[n]) for n in shapes},
            "param": {n: hexes(p) for n, p in params.items()},
            "exp_avg": {n: hexes(opt.state[p]["exp_avg"]) for n, p in params.items()},
            "exp_avg_sq": {n: hexes(opt.state[p]["exp_avg_sq"]) for n, p in params.items()},
        })
    out = {
        "what": "torch.optim.AdamW(foreach=False) for 10 steps; floats are hex float32 bits",
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
                     "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "hyper": {"lr": HP["lr"], "beta1": HP["betas"][0], "beta2": HP["betas"][1], "eps": HP["eps"],
                  "weight_decay": HP["weight_decay"]},
        "params": [{"name": n, "shape": list(s), "init": hexes(init[n])} for n, s in shapes.items()],
        "steps": steps,
    }
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
