#!/usr/bin/env python3
"""Loads a `batchnorm train` MLP checkpoint into PyTorch and evaluates it there: the state dict goes into
an equal `torch.nn.Sequential` with `load_state_dict(strict=True)` (every name and shape must match
PyTorch's), then the test set runs in eval mode (running statistics). The accuracy and loss should equal
the run's summary.json.

    python3 scripts/pytorch-load-checkpoint.py runs/<name>/checkpoint.safetensors [--data-dir data/mnist]

Needs torch, numpy and safetensors (not dependencies of the crate). MLP models only
(`mlp-784-100-...-10[-bn]`); the CNN's layer list is in src/train (`scripts/pytorch-cnn-anchor.py` builds it).
"""
import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file


def idx(path):
    data = gzip.open(path).read() if str(path).endswith(".gz") else Path(path).read_bytes()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def mlp(widths, bn):
    """The `nn.Sequential` of a `batchnorm train` MLP: Linear, [BatchNorm1d], Sigmoid per hidden width,
    then a Linear head (scripts/pytorch-train-parity.py builds its twin with this too)."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        if i + 2 < len(widths):
            if bn:
                layers.append(torch.nn.BatchNorm1d(fan_out))
            layers.append(torch.nn.Sigmoid())
    return torch.nn.Sequential(*layers)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default="data/mnist")
    a = p.parse_args()
    with safe_open(a.checkpoint, "pt") as f:
        meta = f.metadata()
    model = meta.get("model", "")
    if not model.startswith("mlp-"):
        sys.exit(f"{a.checkpoint}: model '{model}' is not an MLP; this script builds MLPs only")
    parts = model.split("-")[1:]
    bn = parts[-1] == "bn"
    widths = [int(w) for w in (parts[:-1] if bn else parts)]
    net = mlp(widths, bn)
    state = {k: v for k, v in load_file(a.checkpoint).items() if not k.startswith("optimizer.")}
    net.load_state_dict(state, strict=True)
    net.eval()
    d = Path(a.data_dir)
    x = torch.tensor(idx(d / "t10k-images-idx3-ubyte.gz").reshape(-1, widths[0]) / 255.0,
                     dtype=torch.float32)
    y = torch.tensor(idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    with torch.no_grad():
        logits = net(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    print(f"{model}, step {meta.get('step')}: loaded into torch {torch.__version__} (strict); "
          f"test accuracy {100 * acc:.2f}%, loss {loss:.4f}")


if __name__ == "__main__":
    main()
