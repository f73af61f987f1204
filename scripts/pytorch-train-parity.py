#!/usr/bin/env python3
"""Checks short training runs of the engine against PyTorch doing the same steps. The engine
(`examples/train_trace.rs`) trains Ioffe's MLP or a small CNN of the `--model cnn` kind on random batches
and writes its initial checkpoint, the batches, each step's loss and its checkpoint after every step.
PyTorch loads them into an equal `torch.nn.Sequential` (strict state-dict names; the CNN's twin from
scripts/pytorch-cnn-anchor.py) with `torch.optim.SGD` / `torch.optim.Adam` and the same settings, in
float64, and compares:

- each step, replayed from the engine's own state before it (weights, BatchNorm's running statistics and
  `num_batches_tracked`, the optimizer's state: momentum buffers, Adam's exp_avg, exp_avg_sq and step):
  the step's loss within 1e-5 relative, and every tensor after it, optimizer state included, within
  max |ours - torch| / (1 + max |torch|) <= 1e-5 (5e-5 for Adam, whose step divides by sqrt(exp_avg_sq) +
  eps and so magnifies float32's rounding of small gradients; `num_batches_tracked` exactly). This judges
  each step's semantics apart from what the steps before did.
  A max-pool window whose two largest values are within float32's rounding of each other may send the
  gradient to the other input in float32 than in float64 (`cnn-sgd-bn`, seed 0, step 10: 0.54827895
  against 0.54827944 in the second pool). Where a step disagrees, every window whose two largest values
  are within 1e-5 relative is tried with its runner-up made the largest, one at a time: if the step then
  agrees, it is reported as agreeing after that flip (proven to be the float32 tie, not a semantic
  difference); otherwise it fails. The same for a ReLU input within 1e-6 (of its tensor's largest
  magnitude) of zero, whose sign float32 may decide the other way (step 40: 5.6e-8);
- the whole run from the initial state (PyTorch never sees the engine's later states): each step's loss
  and the final state within 1e-5 / 1e-4 (2e-4 for Adam) for the MLP. For the CNN this is reported, not
  judged: after such a flip the runs part.

    python3 scripts/pytorch-train-parity.py [--steps 20] [--configs all|NAME,...] [--keep DIR]

One more exception, stated: the bias of a Linear or convolution followed by a BatchNorm has a zero
gradient in exact arithmetic (the BatchNorm subtracts it with the mean), so in float32 its gradient is
rounding noise (~1e-9 against float64's ~1e-17); SGD moves it by lr times that, but Adam divides by the
noise's own size and moves it by up to lr a step. Under Adam such a bias, the running mean of the
BatchNorm after it and their Adam moments are held to |ours - torch| <= lr * steps for the bias and
running mean, and are not judged for the moments. Needs torch and safetensors (not dependencies of the
crate); builds the example with cargo.
"""
import argparse
import importlib.util
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
    "cnn-sgd-bn": ["--cnn", "--batch", "16", "--lr", "0.05"],
    "cnn-adam-nobn": ["--cnn", "--batch", "16", "--adam", "--no-bn"],
}


def sibling(name):
    """Another script of this folder, loaded as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), Path(__file__).with_name(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mlp(bn):
    """Ioffe's MLP as train_trace builds it, from pytorch-load-checkpoint.py's builder."""
    return sibling("pytorch-load-checkpoint.py").mlp([784, 100, 100, 100, 10], bn)


def cnn(bn):
    """The CNN train_trace builds with --cnn, from pytorch-cnn-anchor.py's builder."""
    return sibling("pytorch-cnn-anchor.py").network([[8], [16]], bn, 28, 10, 32)


def rel_err(ours, ref):
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / (1 + ref.abs().max())).item()


class Replay:
    """The PyTorch twin of one traced run."""

    def __init__(self, meta):
        self.bn = meta["bn"] == "true"
        self.cnn = meta["arch"].startswith("cnn")
        self.adam = meta["optimizer"] == "adam"
        self.lr = float(meta["lr"])
        self.wd = float(meta["weight_decay"])
        self.momentum = float(meta["momentum"])
        self.nesterov = meta["nesterov"] == "true"
        self.net = (cnn if self.cnn else mlp)(self.bn).double()
        self.names = {id(p): n for n, p in self.net.named_parameters()}
        # Biases with a zero gradient in exact arithmetic, and the running means that follow them.
        self.gauge = set()
        net = self.net
        for i in range(len(net) - 1):
            if isinstance(net[i], (torch.nn.Linear, torch.nn.Conv2d)) and net[i].bias is not None \
                    and isinstance(net[i + 1], (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                self.gauge |= {f"{i}.bias", f"{i + 1}.running_mean"}

    def optimizer(self):
        if self.adam:
            return torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.wd)
        return torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=self.momentum,
                               weight_decay=self.wd, nesterov=self.nesterov)

    def load(self, ckpt, opt):
        """The engine's checkpoint into the network (strict) and the optimizer's state."""
        model = {k: v for k, v in ckpt.items() if not k.startswith("optimizer.")}
        self.net.load_state_dict(model, strict=True)
        for p in self.net.parameters():
            prefix = f"optimizer.{self.names[id(p)]}."
            slots = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
            state = {}
            if self.adam:
                state["step"] = slots["step"].double().reshape(())
                state["exp_avg"] = slots["exp_avg"].double().reshape(p.shape)
                state["exp_avg_sq"] = slots["exp_avg_sq"].double().reshape(p.shape)
            elif self.momentum != 0:
                state["momentum_buffer"] = slots["momentum_buffer"].double().reshape(p.shape)
            opt.state[p] = state

    def step(self, x, y, flip=None):
        """One training step; returns the loss. Records in self.ties the float32 coin tosses of the
        forward: each max-pool window whose two largest values (the largest positive) are within 1e-5
        relative, as (layer, window, gap), and each ReLU input within 1e-6 of its tensor's largest
        magnitude of zero, as (layer, index, value); `flip` = one of them decided the other way (the
        window's runner-up made the largest, the ReLU input's sign turned)."""
        if self.cnn:
            x = x.reshape(-1, 1, 28, 28)
        self.ties = []
        hooks = [m.register_forward_pre_hook(self._pool_hook(i, flip))
                 for i, m in enumerate(self.net) if isinstance(m, torch.nn.MaxPool2d)]
        hooks += [m.register_forward_pre_hook(self._relu_hook(i, flip))
                  for i, m in enumerate(self.net) if isinstance(m, torch.nn.ReLU)]
        self.net.train()
        loss = torch.nn.functional.cross_entropy(self.net(x.double()), y)
        for h in hooks:
            h.remove()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def _relu_hook(self, layer, flip):
        def hook(module, inputs):
            a = inputs[0]
            near = a.detach().abs() <= 1e-6 * a.detach().abs().max()
            for idx in near.nonzero().tolist():
                self.ties.append((layer, tuple(idx), a[tuple(idx)].item()))
            if flip is None or flip[0] != layer:
                return None
            bump = torch.zeros_like(a)
            bump[flip[1]] = -2 * flip[2]
            return (a + bump,)
        return hook

    def _pool_hook(self, layer, flip):
        def hook(module, inputs):
            a = inputs[0]
            n, c, h, w = a.shape
            windows = a.detach()[:, :, :h // 2 * 2, :w // 2 * 2].unfold(2, 2, 2).unfold(3, 2, 2)
            top = windows.reshape(n, c, h // 2, w // 2, 4).topk(2, dim=-1)
            gap = top.values[..., 0] - top.values[..., 1]
            near = (top.values[..., 0] > 0) & (gap <= 1e-5 * top.values[..., 0])
            for idx in near.nonzero().tolist():
                self.ties.append((layer, tuple(idx), gap[tuple(idx)].item()))
            if flip is None or flip[0] != layer:
                return None
            wn, wc, wh, ww = flip[1]
            dy, dx = divmod(top.indices[wn, wc, wh, ww, 1].item(), 2)
            bump = torch.zeros_like(a)
            bump[wn, wc, 2 * wh + dy, 2 * ww + dx] = 2 * flip[2]
            return (a + bump,)
        return hook

    def compare(self, ckpt, tol, steps):
        """(failures, worst error and key) of the twin's state against an engine checkpoint."""
        failures, worst = [], (0.0, "")
        for key, ref in self.net.state_dict().items():
            ours = ckpt[key]
            if key.endswith("num_batches_tracked"):
                if ours.item() != ref.item():
                    failures.append(f"{key}: {ours.item()} vs torch {ref.item()}")
                continue
            if self.adam and key in self.gauge:
                drift = (ours.double() - ref).abs().max().item()
                if drift > self.lr * steps:
                    failures.append(f"{key}: |ours - torch| {drift:.2e} > lr * steps (zero-gradient bias)")
                continue
            err = rel_err(ours, ref)
            worst = max(worst, (err, key))
            if err > tol:
                failures.append(f"{key}: error {err:.2e} > {tol:.0e}")
        for p in self.net.parameters():
            name = self.names[id(p)]
            for slot, ref in self.opt.state[p].items():
                key = f"optimizer.{name}.{slot}"
                if key not in ckpt:
                    failures.append(f"the engine saved no {key}")
                    continue
                if self.adam and name in self.gauge:
                    continue
                ref = ref if torch.is_tensor(ref) else torch.tensor(ref)
                err = rel_err(ckpt[key].reshape(ref.shape), ref)
                worst = max(worst, (err, key))
                if err > tol:
                    failures.append(f"{key}: error {err:.2e} > {tol:.0e}")
        return failures, worst


def check(name, args, steps, keep):
    work = Path(keep) / name if keep else Path(tempfile.mkdtemp(prefix=f"train-parity-{name}-"))
    subprocess.run(["cargo", "run", "--release", "--quiet", "--example", "train_trace", "--",
                    str(work), "--steps", str(steps), "--states", *args], check=True)
    with safe_open(work / "trace.safetensors", "pt") as f:
        meta = f.metadata()
    trace = load_file(work / "trace.safetensors")
    states = [load_file(work / "init.safetensors")] + [
        load_file(work / f"state-{k}.safetensors") for k in range(1, steps + 1)]
    losses = trace["loss"].tolist()
    failures = []

    # Each step from the engine's own state before it.
    twin = Replay(meta)
    worst_step = (0.0, "")
    worst_step_loss = 0.0
    flipped = []
    for k in range(steps):
        twin.opt = twin.optimizer()
        twin.load(states[k], twin.opt)
        loss = twin.step(trace["x"][k], trace["y"][k])
        err = abs(losses[k] - loss) / abs(loss)
        worst_step_loss = max(worst_step_loss, err)
        if err > 1e-5:
            failures.append(f"step {k} from the engine's state: loss {losses[k]:.8f} vs {loss:.8f}")
        step_tol = 5e-5 if twin.adam else 1e-5
        bad, worst = twin.compare(states[k + 1], step_tol, 1)
        for tie in (twin.ties if bad else []):
            twin.opt = twin.optimizer()
            twin.load(states[k], twin.opt)
            twin.step(trace["x"][k], trace["y"][k], flip=tie)
            bad_flipped, worst_flipped = twin.compare(states[k + 1], step_tol, 1)
            if not bad_flipped:
                what = "max-pool" if isinstance(twin.net[tie[0]], torch.nn.MaxPool2d) else "ReLU"
                flipped.append(f"step {k}: {what} {tie[0]} at {tie[1]} ({tie[2]:.1e})")
                bad, worst = [], worst_flipped
                break
        worst_step = max(worst_step, (worst[0], f"{worst[1]} at step {k}"))
        failures += [f"step {k} from the engine's state: {b}" for b in bad]

    # The whole run from the initial state.
    run = Replay(meta)
    run.opt = run.optimizer()
    run.load(states[0], run.opt)
    judged = not run.cnn
    worst_run_loss, parted = 0.0, None
    for k in range(steps):
        loss = run.step(trace["x"][k], trace["y"][k])
        err = abs(losses[k] - loss) / abs(loss)
        worst_run_loss = max(worst_run_loss, err)
        if err > 1e-5 and parted is None:
            parted = k
            if judged:
                failures.append(f"whole run: step {k} loss {losses[k]:.8f} vs torch {loss:.8f}")
    bad, worst_run = run.compare(states[-1], 2e-4 if run.adam else 1e-4, steps)
    if judged:
        failures += [f"whole run: {b}" for b in bad]

    status = "ok" if not failures else "FAILED"
    print(f"{name}: {status}; {steps} steps, losses {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"    each step from the engine's state: loss within {worst_step_loss:.1e}, state within "
          f"{worst_step[0]:.1e} ({worst_step[1]})")
    for f in flipped:
        print(f"    agrees after the float32 tie's flip at {f}")
    run_text = (f"    the whole run: loss within {worst_run_loss:.1e}, final state within "
                f"{worst_run[0]:.1e} ({worst_run[1]})")
    if not judged:
        run_text += (" (reported, not judged" +
                     (f"; parted at step {parted}" if parted is not None else "") + ")")
    print(run_text)
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
