#!/usr/bin/env python3
"""CPU comparison for `lethe protect`: the noise step of `bench_protect`'s
CPU datasets, timed in PyTorch and in lethe (candle, CPU) from one script,
with the same threads.

Not run by CI (needs PyTorch). Install it into a virtual environment of
your own (`python3 -m venv V && V/bin/pip install torch numpy`) and run

  V/bin/python crates/lethe-protect/bench_protect_torch_cpu.py \\
      [--lethe-bin target/release/examples/bench_protect] \\
      [--threads 2] [--out evals/results/protect-bench-cpu-torch.json]

What is timed is `bench_protect`'s `pgd_only` unit on each dataset: 20
sign-gradient descent steps (eps 8/255, step 0.8/255) for every image in
batches of 512, surrogate in eval mode with frozen weights, then one
accuracy pass over the protected images. The rate is image-steps per
second (one forward+backward of one image = one image-step), the unit of
`evals/results/protect-bench.json`:

  * digits_cnn:     1797 8x8 gray images, CNN 32-64 (batch norm);
  * lesions_cnn:    256 32x32 gray images, CNN 32-64-128 (batch norm);
  * cifar_resnet18: 64 32x32 RGB images, ResNet-18 width 64, 2 steps.

The CNN is lethe-model's `SmallCnn`: per block conv3x3 (padding 1, no
bias) -> batch norm -> 2x2 max-pool -> ReLU (pooling first, as lethe does:
the two commute and ReLU then touches a quarter of the activations), then
one linear layer on the flattened features. Random pixels: the timing
does not depend on content.
lethe's side is `bench_protect` on the CPU (`CANDLE_NUM_THREADS=1`,
`RAYON_NUM_THREADS` = threads, its own defaults), read from the JSON it
writes; each side is timed `--repeats` times and the fastest run kept.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_protect_torch import ResNet18, pgd_descent  # noqa: E402  (the H100 script's)


class SmallCnn(nn.Module):
    def __init__(self, cin, side, classes, channels):
        super().__init__()
        blocks = []
        for cout in channels:
            blocks += [
                nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.MaxPool2d(2),
                nn.ReLU(),
            ]
            cin, side = cout, side // 2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin * side * side, classes)

    def forward(self, x):
        return self.head(self.blocks(x).flatten(1))


def pgd_only(model, images, labels, steps, batch=512):
    """lethe's `pgd_only` unit: PGD descent over every batch, then the
    accuracy pass; seconds and image-steps per second."""
    n = images.shape[0]
    delta = torch.zeros_like(images)
    t0 = time.perf_counter()
    pgd_descent(model, images, labels, delta, steps, batch)
    with torch.no_grad():
        for s in range(0, n, batch):
            model((images[s : s + batch] + delta[s : s + batch]).clamp(0, 1)).argmax(1)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "pgd_image_steps_per_s": round(n * steps / seconds, 2)}


CASES = {
    # name: (images, channels, side, classes, steps, model)
    "digits_cnn": (1797, 1, 8, 10, 20, lambda: SmallCnn(1, 8, 10, [32, 64])),
    "lesions_cnn": (256, 1, 32, 4, 20, lambda: SmallCnn(1, 32, 4, [32, 64, 128])),
    "cifar_resnet18": (64, 3, 32, 10, 2, lambda: ResNet18(10, 64)),
}


def torch_side(repeats):
    out = {}
    g = torch.Generator().manual_seed(7)
    for name, (n, c, side, classes, steps, make) in CASES.items():
        torch.manual_seed(0)
        model = make()
        images = torch.randint(0, 256, (n, c, side, side), generator=g).float().div(255)
        labels = torch.arange(n) % classes
        pgd_only(model, images[:64], labels[:64], 1)  # warm-up
        runs = [pgd_only(model, images, labels, steps) for _ in range(repeats)]
        best = max(runs, key=lambda r: r["pgd_image_steps_per_s"])
        out[name] = dict(best, images=n, pgd_steps=steps, runs=[r["seconds"] for r in runs])
    return out


def lethe_side(args):
    cmd = [args.lethe_bin] if args.lethe_bin else [
        "cargo", "run", "--release", "-p", "lethe-protect", "--example", "bench_protect",
    ]
    best = {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.json")
            env = dict(os.environ, BENCH_OUT=path, RAYON_NUM_THREADS=str(args.threads),
                       CANDLE_NUM_THREADS="1")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-4000:])
            doc = json.load(open(path))
        for name in CASES:
            r = doc[name]["pgd_only"]
            if name not in best or r["pgd_image_steps_per_s"] > best[name]["pgd_image_steps_per_s"]:
                best[name] = r
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lethe-bin", help="prebuilt bench_protect example; default: cargo run")
    ap.add_argument("--out", default="evals/results/protect-bench-cpu-torch.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "unit": "image-steps/s, pgd_only (20 PGD steps per image at batch 512 + accuracy pass)",
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                     if l.startswith("model name")), "unknown"),
        "pytorch": torch_side(args.repeats),
        "lethe": lethe_side(args),
    }
    # Time per image-step, lethe over PyTorch (> 1: lethe slower).
    result["lethe_over_pytorch"] = {
        name: round(result["pytorch"][name]["pgd_image_steps_per_s"]
                    / result["lethe"][name]["pgd_image_steps_per_s"], 2)
        for name in CASES
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
