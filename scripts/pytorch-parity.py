#!/usr/bin/env python3
"""Checks `batchnorm parity` against real PyTorch (`torch.nn.BatchNorm1d/2d/3d`) on fresh random cases:
every layout (NCHW, NHWC through a channels-last permutation, NC), train, eval and FrozenBN (metadata
`frozen`, against `bn.eval()` in a training model), with and without the fused ReLU (`fuse_relu`,
against `torch.relu(bn(x))`; channels with a value within 1e-5 of ReLU's kink are not judged in dx,
dweight, dbias), momentum a number (0, 1, and 1.5 and -0.25, which PyTorch also takes) or None
(cumulative average over num_batches_tracked), eps 0 (eval: PyTorch refuses it with batch statistics) and 1e-5 to 0.1, affine or not, tracked or not, weight,
bias and running statistics given or left to their defaults, f16 storage, float64 inputs (outputs then in
float64), odd and prime sizes, huge C, a constant channel, a large mean, forward only or with dy. For
each case it writes the inputs, runs the binary, and compares y, dx, dweight, dbias, the running
statistics, num_batches_tracked, save_mean and save_invstd with PyTorch's, and their dtypes.

    python3 scripts/pytorch-parity.py [--binary target/release/batchnorm] [--cases 40] [--seed S]

Reference: PyTorch in float64 on the same inputs (`--against-f32`: its float32 CPU kernel, which at mean
1e4 is itself ~5e-4 off in y). Tolerances:
max |ours - torch| / (1 + |torch|) <= 1e-4 for y, the statistics and the running statistics (f16 storage:
2^-10, one f16 ulp, for y and dx); dx, dweight, dbias relative to (1 + max |torch|) of the tensor <= 1e-4.
num_batches_tracked exactly. Needs torch, numpy and safetensors (not dependencies of the crate).
"""
import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


AGAINST_F32 = False


def torch_case(shape, layout, training, momentum, affine, tracked, nbt, dtype, mean, std, gen,
               frozen=False, relu=False, eps=1e-5, constant_channel=False, defaults=False,
               backward=True):
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean
    if constant_channel:
        # A channel whose values are all equal: variance exactly 0, invstd 1/sqrt(eps).
        x[:, c // 2] = mean + 0.25
    x = x.to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.rand(c, generator=gen) + 0.5
    bias = torch.randn(c, generator=gen)
    rm = torch.randn(c, generator=gen) * 0.1 + (mean if training else 0.0)
    rv = torch.rand(c, generator=gen) + 0.5
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[len(shape)]
    bn = cls(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=tracked)
    # `defaults`: the input file leaves out weight, bias and the running statistics, and the module
    # keeps PyTorch's fresh values (1, 0, 0, 1); the binary must assume the same.
    with torch.no_grad():
        if affine and not defaults:
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        if tracked:
            if not defaults:
                bn.running_mean.copy_(rm)
                bn.running_var.copy_(rv)
            bn.num_batches_tracked.fill_(nbt)
    # FrozenBN is PyTorch's `bn.eval()` inside a training model: running statistics normalize, gradients
    # still flow, nothing is updated.
    bn.train(training and not frozen)
    # PyTorch in float64 is the reference: its float32 CPU kernel subtracts a mean rounded to f32, so at
    # mean 1e4 its own y is off by ~5e-4 (this engine shifts by a channel value first and stays ~1e-7
    # from exact; `--against-f32` shows the difference).
    ref_dtype = torch.float32 if AGAINST_F32 else torch.float64
    bn = bn.to(ref_dtype)
    xf = x.to(ref_dtype).requires_grad_(True)
    y = bn(xf)
    # ReLU's kink: where bn(x) is 0 to rounding (f16 inputs can equal their channel's mean exactly, a
    # constant channel is 0 throughout), which side a kernel lands on is its rounding's choice, and
    # the flipped gradient reaches the whole channel's dx, dweight and dbias through the reductions.
    # Those channels are not judged there (the case line counts them).
    kinks = torch.zeros(c, dtype=torch.bool)
    if relu:
        dims = [d for d in range(len(shape)) if d != 1]
        kinks = (y.detach().abs() < 1e-5).amax(dim=dims)
        y = torch.relu(y)
    want = {"y": y.detach()}
    if backward:
        y.backward(dy.to(ref_dtype))
        want["dx"] = xf.grad
    uses_batch = (training and not frozen) or not tracked
    if affine and backward:
        want["dweight"], want["dbias"] = bn.weight.grad, bn.bias.grad
    if tracked:
        want["running_mean"], want["running_var"] = bn.running_mean, bn.running_var
        want["num_batches_tracked"] = bn.num_batches_tracked
    if uses_batch:
        dims = [d for d in range(len(shape)) if d != 1]
        xd = x.double()
        m = xd.mean(dims)
        v = xd.var(dims, unbiased=False)
        want["save_mean"], want["save_invstd"] = m, 1.0 / torch.sqrt(v + eps)
    inputs = {"x": x}
    if backward:
        inputs["dy"] = dy
    if affine and not defaults:
        inputs["weight"], inputs["bias"] = weight, bias
    if tracked and not defaults:
        inputs["running_mean"], inputs["running_var"] = rm, rv
    if layout == "NHWC":
        perm = [0] + list(range(2, len(shape))) + [1]
        for k in ("x", "dy"):
            if k in inputs:
                inputs[k] = inputs[k].permute(perm).contiguous()
        for k in ("y", "dx"):
            if k in want:
                want[k] = want[k].permute(perm).contiguous()
    meta = {"layout": layout, "eps": repr(eps), "momentum": "none" if momentum is None else repr(momentum),
            "training": str(training).lower(), "affine": str(affine).lower(),
            "track_running_stats": str(tracked).lower(), "num_batches_tracked": str(nbt)}
    if frozen:
        meta["frozen"] = "true"
    if relu:
        meta["fuse_relu"] = "true"
    return inputs, meta, want, kinks


def compare(name, got, want, f16):
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if want.numel() == 0:  # every channel on ReLU's kink
        return None
    if name == "num_batches_tracked":
        return None if int(got) == int(want) else f"{name}: {int(got)} vs {int(want)}"
    if name in ("dx", "dweight", "dbias"):
        err = ((got - want).abs().max() / (1 + want.abs().max())).item()
    else:
        err = ((got - want).abs() / (1 + want.abs())).max().item()
    tol = 2.0 ** -10 if f16 and name in ("y", "dx") else 1e-4
    return None if err <= tol else f"{name}: error {err:.2e} > {tol:.1e}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", default="target/release/batchnorm")
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    p.add_argument("--against-f32", action="store_true",
                   help="compare with PyTorch's float32 CPU kernel instead of float64")
    a = p.parse_args()
    global AGAINST_F32
    AGAINST_F32 = a.against_f32
    rng = random.Random(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    print(f"seed {a.seed}")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for case in range(a.cases):
            rank = rng.choice([2, 3, 4, 4, 5])
            layout = "NC" if rank == 2 else rng.choice(["NCHW", "NHWC"])
            sizes = [1, 2, 3, 5, 7, 13, 17, 31]
            shape = [rng.choice([2, 3, 7, 16, 61])] + [rng.choice(sizes) for _ in range(rank - 1)]
            training = rng.random() < 0.7
            tracked = rng.random() < 0.85
            momentum = rng.choice([0.1, 0.1, 0.5, 1.0, 0.0, None, 1.5, -0.25])
            eps = rng.choice([1e-5, 1e-5, 1e-3, 0.1, 0.0])
            affine = rng.random() < 0.85
            nbt = rng.choice([0, 0, 3])
            f16 = rng.random() < 0.2
            frozen = tracked and training and rng.random() < 0.15
            relu = rng.random() < 0.2
            defaults = rng.random() < 0.1
            # A constant channel normalizes to exactly 0, then shifted by beta. With beta 0 (no
            # affine, or the default bias) that is ReLU's kink: PyTorch's float64 kernel gives
            # +7e-15 there (its a*x + b rounding) and passes the gradient, its float32 kernel gives
            # -3e-6 and blocks it, this engine gives exactly 0 and blocks it (see `kinks`).
            if eps == 0.0 and ((training and not frozen) or not tracked):
                # PyTorch: "batch_norm eps must be positive during training" (batch statistics);
                # the binary refuses it too (tests/cli.rs). eps 0 is drawn for eval only.
                eps = 1e-5
            constant_channel = eps > 0 and rng.random() < 0.15  # eps 0: NaN in both
            backward = rng.random() < 0.9
            f64 = not f16 and rng.random() < 0.1
            if rng.random() < 0.05:
                shape = [rng.choice([2, 3]), rng.choice([4099, 65537])]  # huge C
                layout = "NC"
            mean, std = rng.choice([(0.0, 1.0), (3.0, 0.5), (1e4, 1.0)])
            if f16:
                mean = min(mean, 3.0)  # f16 cannot hold 1e4 + noise finely
            if training and shape[0] * int(torch.tensor(shape[2:]).prod()) < 2:
                shape[0] = 2
            dtype = torch.float16 if f16 else torch.float64 if f64 else torch.float32
            inputs, meta, want, kinks = torch_case(shape, layout, training, momentum, affine,
                                                   tracked, nbt, dtype, mean, std, gen, frozen,
                                                   relu, eps, constant_channel, defaults, backward)
            src, dst = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
            save_file(inputs, str(src), metadata=meta)
            run = subprocess.run([a.binary, "parity", "--input", str(src), "--output", str(dst)],
                                 capture_output=True, text=True)
            what = (f"case {case}: {layout} {shape} {str(dtype)[6:]} training={training} "
                    f"momentum={momentum} eps={eps} affine={affine} tracked={tracked} nbt={nbt} "
                    f"mean={mean}{' frozen' if frozen else ''}{' relu' if relu else ''}"
                    f"{' constant-channel' if constant_channel else ''}"
                    f"{' defaults' if defaults else ''}{'' if backward else ' forward-only'}")
            if run.returncode != 0:
                print(f"FAIL {what}: exit {run.returncode}: {run.stderr.strip()[-300:]}")
                failures += 1
                continue
            got = load_file(str(dst))
            if kinks.any():
                what += f" ({int(kinks.sum())} of {len(kinks)} channels on ReLU's kink)"
                keep = ~kinks
                for k in ("dx", "dweight", "dbias"):
                    if k in want and k in got:
                        # The channel axis: 1, or last in NHWC; per-channel tensors have only it.
                        axis = 0 if want[k].dim() == 1 else (want[k].dim() - 1 if layout == "NHWC" else 1)
                        want[k] = want[k].index_select(axis, keep.nonzero().flatten())
                        got[k] = got[k].index_select(axis, keep.nonzero().flatten())
            problems = [f"missing {k}" for k in want if k not in got]
            problems += [f"extra {k}" for k in got if k not in want]
            problems += [e for k in want if k in got for e in [compare(k, got[k], want[k], f16)] if e]
            # Outputs in x's precision, as a PyTorch module of that dtype gives them (per-channel
            # tensors stay float32 for an f16 x, as under autocast).
            for k in want:
                expect = (torch.int64 if k == "num_batches_tracked" else dtype if k in ("y", "dx")
                          else torch.float64 if f64 else torch.float32)
                if k in got and got[k].dtype != expect:
                    problems.append(f"{k}: dtype {got[k].dtype}, expected {expect}")
            if problems:
                failures += 1
                print(f"FAIL {what}: {'; '.join(problems)}")
            else:
                print(f"ok   {what}")
    print(f"{a.cases - failures} passed, {failures} failed (seed {a.seed})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
