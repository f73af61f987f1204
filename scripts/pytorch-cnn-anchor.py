#!/usr/bin/env python3
"""The PyTorch anchor for `batchnorm train --model cnn`: the same VGG-style network (conv3x3-BN-ReLU
blocks, a 2x2 max-pool after each stage, Flatten, optionally a hidden Linear-BN-ReLU, Linear), data (Fashion-MNIST IDX files, x / 255),
optimizer (SGD with momentum, PyTorch's default init) and schedule (batch B, drop the last partial batch,
a fresh shuffle per epoch), trained on the CPU. Prints the test accuracy after each epoch and the
samples/s, so a network can be sized here before it is trained on a CPU Vulkan driver.

    python3 scripts/pytorch-cnn-anchor.py --data-dir ../shared/data/fashion-mnist --stages 16 32 [--no-bn]
    python3 scripts/pytorch-cnn-anchor.py --data-dir ... --stages 16 32 --hidden 128 --checkpoint RUN/checkpoint.safetensors

With --checkpoint it loads a `batchnorm train --model cnn` checkpoint into the same PyTorch network instead
(strict: every state-dict name and shape must match) and prints its test accuracy, to compare with the
run's summary.json. Needs torch, numpy and safetensors (not dependencies of the crate).
"""
import argparse
import gzip
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
    return torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def network(stages, bn: bool, hw: int, classes: int, hidden: int) -> nn.Sequential:
    layers, c = [], 1
    for stage in stages:
        for width in stage:
            layers.append(nn.Conv2d(c, width, 3, padding=1, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            c = width
        layers.append(nn.MaxPool2d(2))
        hw //= 2
    layers.append(nn.Flatten())
    features = c * hw * hw
    if hidden:
        layers.append(nn.Linear(features, hidden))  # with a bias, as batchnorm's Linear always has
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        features = hidden
    layers.append(nn.Linear(features, classes))
    return nn.Sequential(*layers)


def accuracy(model, x, y) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            right += (model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item()
    model.train()
    return right / len(x)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--stages", nargs="+", default=["16", "32"],
                   help="one argument per stage, widths joined by commas: 32,32 64,64")
    p.add_argument("--no-bn", action="store_true")
    p.add_argument("--hidden", type=int, default=0, help="a hidden Linear-BN-ReLU of this width before the head")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: from --lr to 0 over --steps (batchnorm train --lr-schedule cosine)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=938)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", type=Path,
                   help="instead of training: load this `batchnorm train --model cnn` checkpoint into the "
                        "same network (strict, PyTorch's state-dict names) and print its test accuracy")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    stages = [[int(w) for w in s.split(",")] for s in a.stages]
    xtr, ytr = load(a.data_dir, "train")
    xte, yte = load(a.data_dir, "t10k")
    model = network(stages, not a.no_bn, xtr.shape[-1], 10, a.hidden)
    if a.checkpoint:
        from safetensors.torch import load_file
        state = {k: v for k, v in load_file(str(a.checkpoint)).items() if not k.startswith("optimizer.")}
        model.load_state_dict(state, strict=True)
        print(f"{a.checkpoint}: {len(state)} tensors loaded strictly; "
              f"test accuracy in PyTorch {100 * accuracy(model, xte, yte):.2f}%")
        return
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps) if a.lr_schedule == "cosine"
             else None)
    loss_fn = nn.CrossEntropyLoss()
    per_epoch = len(xtr) // a.batch_size
    gen = torch.Generator().manual_seed(a.seed)
    print(f"stages {stages} bn {not a.no_bn}: {sum(p.numel() for p in model.parameters())} parameters")
    start, step = time.time(), 0
    while step < a.steps:
        order = torch.randperm(len(xtr), generator=gen)
        for b in range(per_epoch):
            if step == a.steps:
                break
            i = order[b * a.batch_size : (b + 1) * a.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xtr[i]), ytr[i])
            loss.backward()
            opt.step()
            if sched:
                sched.step()
            step += 1
            if step % per_epoch == 0 or step == a.steps:
                secs = time.time() - start
                print(f"step {step} (epoch {step / per_epoch:.2f}): loss {loss.item():.4f}, "
                      f"test accuracy {100 * accuracy(model, xte, yte):.2f}%, "
                      f"{step * a.batch_size / secs:.0f} samples/s")


if __name__ == "__main__":
    main()
