#!/usr/bin/env python3
"""Checks a short MLP training run of the engine against PyTorch doing the same steps: the engine
(`examples/train_trace.rs`) writes its initial checkpoint, random batches, each step's loss and its final
checkpoint; PyTorch loads the initial state dict into an equal `torch.nn.Sequential` (strict), trains on the
same batches with `torch.optim.SGD` / `torch.optim.Adam` and the same settings, and the two are compared
step by step: the losses, then every tensor of the final state dict (weights, biases, BatchNorm's running
statistics, `num_batches_tracked` exactly) and the optimizer's state (momentum buffers; Adam's exp_avg,
exp_avg_sq and step).

    python3 scripts/pytorch-train-parity.py [--steps 20] [--configs all|default] [--keep DIR]

PyTorch runs in float64 on the engine's float32 inputs and initial state, so the differences are the
engine's float32 rounding, grown over the steps. Tolerances (stated, per config): each step's loss within
1e-5 relative; each final tensor max |ours - torch| / (1 + max |torch|) <= 1e-4 (2e-4 for Adam, whose
update divides by sqrt(exp_avg_sq) + eps, a small number early on). One exception: the bias of a Linear
followed by a BatchNorm has a zero gradient in exact arithmetic (the BatchNorm subtracts it with the
mean), so in float32 its gradient is rounding noise (~1e-9 against float64's ~1e-17); SGD moves it by lr
times that, but Adam divides by the noise's own size and moves it up to lr a step. Under Adam such a bias,
and the running mean of the BatchNorm after it, are held to |ours - torch| <= lr * steps, the most Adam
can move them. Needs torch and safetensors (not dependencies of the crate); builds the example with cargo.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

CONFIGS = {
    "sgd-bn": [],
    "sgd-nobn": ["--no-bn"],
    "sgd-nesterov-wd": ["--nesterov", "--weight-decay", "0.01"],
    "sgd-no-momentum": ["--momentum", "0", "--lr", "0.5"],
    "adam-bn": ["--adam"],
    "adam-wd-nobn": ["--adam", "--no-bn", "--weight-decay", "0.001", "--lr", "0.003"],
}


def mlp(bn):
    widths = [784, 100, 100, 100, 10]
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        if i + 2 < len(widths):
            if bn:
                layers.append(torch.nn.BatchNorm1d(fan_out))
            layers.append(torch.nn.Sigmoid())
    return torch.nn.Sequential(*layers)


def rel_err(ours, ref):
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / (1 + ref.abs().max())).item()


def check(name, args, steps, keep):
    work = Path(keep) / name if keep else Path(tempfile.mkdtemp(prefix=f"train-parity-{name}-"))
    subprocess.run(["cargo", "run", "--release", "--quiet", "--example", "train_trace", "--",
                    str(work), "--steps", str(steps), *args], check=True)
    with safe_open(work / "trace.safetensors", "pt") as f:
        meta = f.metadata()
    trace = load_file(work / "trace.safetensors")
    init = load_file(work / "init.safetensors")
    final = load_file(work / "final.safetensors")
    bn = meta["bn"] == "true"
    net = mlp(bn)
    net.load_state_dict({k: v for k, v in init.items() if not k.startswith("optimizer.")}, strict=True)
    net = net.double().train()
    lr = float(meta["lr"])
    wd = float(meta["weight_decay"])
    if meta["optimizer"] == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=wd)
        tol = 2e-4
    else:
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=float(meta["momentum"]),
                              weight_decay=wd, nesterov=meta["nesterov"] == "true")
        tol = 1e-4
    # Biases with a zero gradient in exact arithmetic, and the running means that follow them.
    gauge = set()
    for i in range(len(net) - 1):
        if isinstance(net[i], torch.nn.Linear) and isinstance(net[i + 1], torch.nn.BatchNorm1d):
            gauge |= {f"{i}.bias", f"{i + 1}.running_mean"}
    adam = meta["optimizer"] == "adam"
    failures = []
    worst_loss = 0.0
    for k in range(steps):
        x = trace["x"][k].double()
        y = trace["y"][k]
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours = trace["loss"][k].item()
        err = abs(ours - loss.item()) / abs(loss.item())
        worst_loss = max(worst_loss, err)
        if err > 1e-5:
            failures.append(f"step {k}: loss {ours:.8f} vs torch {loss.item():.8f} ({err:.2e})")
    worst = (0.0, "")
    state = net.state_dict()
    names = {id(p): n for n, p in net.named_parameters()}
    for key, ref in state.items():
        ours = final[key]
        if key.endswith("num_batches_tracked"):
            if ours.item() != ref.item():
                failures.append(f"{key}: {ours.item()} vs torch {ref.item()}")
            continue
        if adam and key in gauge:
            drift = (ours.double() - ref).abs().max().item()
            if drift > lr * steps:
                failures.append(f"{key}: |ours - torch| {drift:.2e} > lr * steps (zero-gradient bias)")
            continue
        err = rel_err(ours, ref)
        worst = max(worst, (err, key))
        if err > tol:
            failures.append(f"{key}: error {err:.2e} > {tol:.0e}")
    for group in opt.param_groups:
        for p in group["params"]:
            for slot, ref in opt.state[p].items():
                key = f"optimizer.{names[id(p)]}.{slot}"
                if key not in final:
                    # PyTorch keeps no momentum buffer when momentum is 0; the engine keeps zeros.
                    continue
                ours = final[key]
                ref = ref if torch.is_tensor(ref) else torch.tensor(ref)
                err = rel_err(ours.reshape(ref.shape), ref)
                worst = max(worst, (err, key))
                if err > tol:
                    failures.append(f"{key}: error {err:.2e} > {tol:.0e}")
            if meta["optimizer"] == "sgd" and float(meta["momentum"]) == 0:
                continue
            missing = [s for s in opt.state[p] if f"optimizer.{names[id(p)]}.{s}" not in final]
            if missing:
                failures.append(f"{names[id(p)]}: the engine saved no {missing}")
    status = "ok" if not failures else "FAILED"
    print(f"{name}: {status}; {steps} steps, losses {trace['loss'][0].item():.4f} -> "
          f"{trace['loss'][-1].item():.4f}, worst loss error {worst_loss:.1e}, worst state error "
          f"{worst[0]:.1e} ({worst[1]})")
    for f in failures[:10]:
        print("   ", f)
    return not failures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--configs", default="all", help="all, or comma-separated names: " + ", ".join(CONFIGS))
    p.add_argument("--keep", help="write each config's files under this folder instead of a temporary one")
    a = p.parse_args()
    names = list(CONFIGS) if a.configs == "all" else a.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    ok = [check(n, CONFIGS[n], a.steps, a.keep) for n in names]
    print(f"{sum(ok)}/{len(ok)} configs agree with torch {torch.__version__}")
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
