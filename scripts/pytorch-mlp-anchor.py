#!/usr/bin/env python3
"""The PyTorch anchor for `batchnorm train` (the main job) on the machine it runs on: Ioffe's
784-100-100-100-10 sigmoid MLP, with BatchNorm1d after each hidden Linear unless --no-bn, trained on MNIST
(x / 255, batches of 60 drawn from a fresh shuffle per epoch) with SGD (lr 0.1, momentum 0.9) on the CPU,
timed with 1 and with 2 threads. Issue 5's speed target is stated against this (within 2x of PyTorch's
best), and a CPU differs from machine to machine, so this prints the anchor for the host at hand:

    python3 scripts/pytorch-mlp-anchor.py --data-dir data/mnist [--steps 3000] [--threads 1 2] [--no-bn]

Per thread count: the median ms per step over rounds of --round steps (after a warm-up), the samples/s it
gives, and the test accuracy after the run. Needs torch and numpy (not dependencies of the crate).
"""
import argparse
import gzip
import statistics
import struct
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(d: Path, split: str):
    x = idx(next(d.glob(f"{split}-images-idx3-ubyte*")))
    y = idx(next(d.glob(f"{split}-labels-idx1-ubyte*")))
    x = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0)
    return x, torch.from_numpy(y.astype(np.int64))


def network(bn: bool) -> nn.Sequential:
    layers, width = [], 784
    for hidden in (100, 100, 100):
        layers.append(nn.Linear(width, hidden))
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.Sigmoid())
        width = hidden
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers)
    # Ioffe's initialization, as `batchnorm train` uses: weights from N(0, 0.1²), zero biases.
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.1)
            nn.init.zeros_(m.bias)
    return model


def run(a, threads: int, xtr, ytr, xte, yte):
    torch.manual_seed(a.seed)
    torch.set_num_threads(threads)
    model = network(not a.no_bn)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(a.seed)
    per_epoch = len(xtr) // a.batch_size
    order, rounds, step, begun = None, [], 0, time.perf_counter()
    while step < a.steps:
        if step % per_epoch == 0:
            order = torch.randperm(len(xtr), generator=gen)
        b = step % per_epoch
        i = order[b * a.batch_size : (b + 1) * a.batch_size]
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(xtr[i]), ytr[i])
        loss.backward()
        opt.step()
        step += 1
        if step % a.round == 0:
            now = time.perf_counter()
            if step > a.warmup:
                rounds.append((now - begun) / a.round)
            begun = now
    loss = loss.item()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    ms = 1000 * statistics.median(rounds)
    print(f"{threads} thread(s): {ms:.3f} ms a step (median of {len(rounds)} rounds of {a.round}; "
          f"fastest {1000 * min(rounds):.3f}), {a.batch_size / ms * 1000:.0f} samples/s; "
          f"loss {loss:.4f}, test accuracy {100 * acc:.2f}% after {a.steps} steps")
    return ms


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("data/mnist"))
    p.add_argument("--no-bn", action="store_true")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=60)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--round", type=int, default=100, help="steps per timed round")
    p.add_argument("--warmup", type=int, default=200, help="steps before the timed rounds")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.steps < a.warmup + a.round:
        p.error(f"--steps must be at least --warmup + --round ({a.warmup + a.round})")
    xtr, ytr = load(a.data_dir, "train")
    xte, yte = load(a.data_dir, "t10k")
    print(f"torch {torch.__version__}, MLP {'with' if not a.no_bn else 'without'} BatchNorm, "
          f"batch {a.batch_size}, {a.steps} steps")
    best = min(run(a, t, xtr, ytr, xte, yte) for t in a.threads)
    print(f"best: {best:.3f} ms a step, {a.batch_size / best * 1000:.0f} samples/s; "
          f"issue 5's target on this host (within 2x): >= {a.batch_size / (2 * best) * 1000:.0f} samples/s, "
          f"<= {2 * best:.3f} ms a step")


if __name__ == "__main__":
    main()
