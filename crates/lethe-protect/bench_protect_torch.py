#!/usr/bin/env python3
"""GPU comparison for `lethe protect` (H100 or H200): one EM round on 50k
32x32 images, timed in PyTorch and in lethe (candle, CUDA build) from the
same script.

Not run on CPU CI (needs a CUDA GPU, PyTorch, and a `cuda` build of lethe).

One EM round = the research notes' unit (shared/research/protection-salm.md
section 5.2, Huang et al.'s perturbation.py loop):
  * 10 surrogate SGD steps (lr 0.1, momentum 0.9, wd 5e-4, clip 5) on
    batches of 128 protected images, train mode;
  * 20 PGD sign-gradient *descent* steps (eps 8/255, step 0.8/255) over all
    images in batches of 512, eval mode, weights frozen;
  * one accuracy pass over the protected images.
Surrogate: ResNet-18, CIFAR variant (3x3 stem, no max-pool), fp32 (TF32 as
PyTorch defaults), the architecture lethe-model's `ResNet18` reproduces.
Images: 50k random uint8 RGB 32x32, 10 classes (the timing does not depend
on content; CIFAR-10 itself is not available offline).

Usage:
  python3 crates/lethe-protect/bench_protect_torch.py [--images 50000]
      [--steps 20] [--skip-lethe] [--out evals/results/protect-bench-gpu.json]

The lethe side runs
  cargo run --release --features cuda -p lethe-protect --example bench_protect
      -- --cifar-only --device cuda --images N --steps K
and reads the JSON it prints.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(y + s)


class ResNet18(nn.Module):
    def __init__(self, classes=10, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for stage in range(4):
            cout = width << stage
            for i in range(2):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(x.mean((2, 3)))


def pgd_descent(model, images, labels, delta, steps, batch=512):
    """Huang et al.'s noise step: `steps` sign-gradient descent steps (eps
    8/255, step 0.8/255) for every image in batches of `batch`, model in
    eval mode with frozen weights; updates `delta` in place."""
    eps, alpha = 8 / 255, 0.8 / 255
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for s in range(0, images.shape[0], batch):
        x0, y, d = images[s : s + batch], labels[s : s + batch], delta[s : s + batch]
        for _ in range(steps):
            x = (x0 + d).clamp(0, 1).requires_grad_(True)
            loss = F.cross_entropy(model(x), y)
            (grad,) = torch.autograd.grad(loss, x)
            d = (d - alpha * grad.sign()).clamp(-eps, eps)
            d = (x0 + d).clamp(0, 1) - x0
        delta[s : s + batch] = d.detach()


def em_round(images, labels, steps, device):
    n = images.shape[0]
    model = ResNet18().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    delta = torch.zeros_like(images)
    g = torch.Generator(device="cpu").manual_seed(0)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    # (a) 10 surrogate steps.
    model.train()
    for _ in range(10):
        idx = torch.randperm(n, generator=g)[:128].to(device)
        x = (images[idx] + delta[idx]).clamp(0, 1)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    torch.cuda.synchronize()
    t_train = time.perf_counter() - t0
    # (b) PGD descent over every batch.
    pgd_descent(model, images, labels, delta, steps)
    torch.cuda.synchronize()
    t_pgd = time.perf_counter() - t0 - t_train
    # (c) accuracy pass.
    correct = 0
    with torch.no_grad():
        for s in range(0, n, 512):
            x = (images[s : s + 512] + delta[s : s + 512]).clamp(0, 1)
            correct += (model(x).argmax(1) == labels[s : s + 512]).sum().item()
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    return {
        "round_s": round(total, 3),
        "train_s": round(t_train, 3),
        "pgd_s": round(t_pgd, 3),
        "image_steps_per_s": round(n * steps / total, 1),
        "accuracy_after_round": correct / n,
    }


def lethe_cmd(args, images, steps, check=False, tf32=False):
    if args.lethe_bin:
        cmd = [args.lethe_bin]
    else:
        cmd = [
            "cargo", "run", "--release", "--features", "cuda", "-p", "lethe-protect",
            "--example", "bench_protect", "--",
        ]
    cmd += ["--cifar-only", "--device", "cuda", "--images", str(images), "--steps", str(steps)]
    return cmd + (["--check"] if check else []) + (["--tf32"] if tf32 else [])


def run_lethe(args, tf32=False, conv=None, check=False):
    """Times lethe's round on the same images and steps. With `--budget-s`,
    a probe round on `--probe-images` images first predicts the full round;
    when that would exceed the budget the round runs on as many images as
    fit (the rate per image-step is what is compared, and is recorded)."""
    env = dict(os.environ, BENCH_OUT="/dev/null")
    if conv:
        env["LETHE_GPU_CONV"] = conv
    out = {}

    def call(images, check=False):
        t0 = time.perf_counter()
        cmd = lethe_cmd(args, images, args.steps, check, tf32)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-4000:])
        return json.loads(proc.stdout), wall

    try:
        images = args.images
        if args.budget_s:
            probe, wall = call(args.probe_images, check=check)
            out["lethe_probe"] = probe["cifar_resnet18"]["em_round"]
            if "check_against_cpu" in probe:
                out["check_against_cpu"] = probe["check_against_cpu"]
            per_image = probe["cifar_resnet18"]["em_round"]["round_s"] / args.probe_images
            predicted = per_image * args.images
            out["lethe_predicted_full_round_s"] = round(predicted, 1)
            if predicted > args.budget_s:
                images = max(args.probe_images, int(args.budget_s / per_image) // 512 * 512)
        # The CPU check runs once: with the probe when there is one.
        doc, wall = call(images, check=check and not args.budget_s)
        if "check_against_cpu" in doc:
            out["check_against_cpu"] = doc["check_against_cpu"]
        lethe = doc["cifar_resnet18"]
        out["lethe"] = lethe
        out["lethe_images"] = images
        out["lethe_wall_s"] = round(wall, 1)
        return out
    except (RuntimeError, json.JSONDecodeError, KeyError) as e:
        out["lethe_error"] = str(e)[-4000:]
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-lethe", action="store_true")
    ap.add_argument("--lethe-bin", help="prebuilt bench_protect example (CUDA build); default: cargo run")
    ap.add_argument("--budget-s", type=float, default=0, help="cap on lethe's timed round (0: none)")
    ap.add_argument("--probe-images", type=int, default=2048)
    ap.add_argument("--check", action="store_true", help="lethe compares a CPU and a GPU run first")
    ap.add_argument("--strict", action="store_true", help="also time PyTorch with TF32 off")
    ap.add_argument("--variants", default="strict,tf32",
                    help="lethe runs: strict|tf32, each optionally -candle (candle's conv2d and its "
                         "own backward) or -im2col (im2col from primitive ops); default: lethe's "
                         "conv2d with the convolution backward (LETHE_GPU_CONV unset)")
    ap.add_argument("--out", default="evals/results/protect-bench-gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("a CUDA GPU is required")
    device = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(7)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), generator=g).float().div(255).to(device)
    labels = (torch.arange(args.images) % 10).to(device)
    em_round(images[:1024], labels[:1024], 2, device)  # warm-up (cuDNN autotune)
    # PyTorch's defaults: TF32 in cuDNN convolutions, not in matmul.
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "images": args.images,
        "pgd_steps": args.steps,
        "pytorch": em_round(images, labels, args.steps, device),
        "pytorch_note": "defaults: cudnn.allow_tf32=%s, matmul.allow_tf32=%s"
        % (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32),
    }
    if args.strict:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        # On a fifth of the images (the rate per image-step is compared).
        k = max(512, args.images // 5 // 512 * 512)
        result["pytorch_strict_fp32"] = dict(
            em_round(images[:k], labels[:k], args.steps, device), images=k
        )
    if not args.skip_lethe:
        # lethe strict f32 against PyTorch strict (or default when not run),
        # lethe with TF32 against PyTorch's default (TF32 convolutions).
        # A variant is `strict` or `tf32`, optionally `-candle` or `-im2col`
        # (the GPU convolution, LETHE_GPU_CONV; default: convolutions as
        # the backward, lethe-model's conv_grad).
        for i, variant in enumerate(args.variants.split(",")):
            tf32 = variant.startswith("tf32")
            conv = variant.split("-", 1)[1] if "-" in variant else None
            if conv not in (None, "candle", "im2col"):
                sys.exit(f"unknown variant {variant!r}: strict|tf32[-candle|-im2col]")
            r = run_lethe(args, tf32, conv, check=args.check and i == 0)
            if "check_against_cpu" in r:
                result["check_against_cpu"] = r.pop("check_against_cpu")
            name = "lethe_" + variant.replace("-", "_")
            result[name] = r
            if "lethe" in r:
                rate_l = r["lethe"]["em_round"]["image_steps_per_s"]
                peer = "pytorch" if tf32 or not args.strict else "pytorch_strict_fp32"
                rate_t = result[peer]["image_steps_per_s"]
                # Time per image-step, lethe over PyTorch (> 1: lethe slower);
                # equal to the ratio of round times when both ran every image.
                r["over_" + peer] = round(rate_t / rate_l, 2)
                r["full_round_s"] = round(args.images * args.steps / rate_l, 1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
