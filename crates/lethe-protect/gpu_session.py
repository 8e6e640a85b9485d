#!/usr/bin/env python3
"""One GPU session's protection checks, in one call: what a lent GPU
machine runs (it has no Rust: `cargo xtask gpu-bundle` builds here what
this runs there, into `gpu/`).

1. lethe-model's CUDA unit tests (GPU against CPU: lethe's CUDA kernels,
   the batch-norm fold, ResNet/CNN logits and input gradients, the cuDNN
   algorithm cache);
2. an A/B of the GPU paths on `--ab-images` images, each beside PyTorch in
   the same call (`bench_protect_torch.py`): the default, with the CPU check
   of a short digits protection, then autograd input gradients
   (LETHE_FROZEN_GRAD=off: the path of run 10);
3. the EM round on `--images` (50 000) images beside PyTorch, on the default
   path if the tests passed, else on the autograd path; within what is
   left of `--budget-s`.

Results: `OUT/tests.txt`, `OUT/ab_*.json`, `OUT/round.json` and a summary
`OUT/session.json`. Merge what matters into
`evals/results/protect-bench-gpu.json` by hand, with the run's reading.

Usage (repository root, device tool `run` with carry
["gpu", ".lethe/cache/sklearn-data"]):
  python3 crates/lethe-protect/gpu_session.py --out $OUT
"""
import argparse
import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
AUTOGRAD_PATH = {"LETHE_FROZEN_GRAD": "off"}
CUDA_TESTS = ["cuda_kernels_match", "models_on_cuda", "cudnn_algorithm"]


def library_path():
    """CUDA and cuDNN libraries: the system toolkit's, and those of the
    NVIDIA wheels beside PyTorch (cuDNN is only there)."""
    dirs = ["/usr/local/cuda/targets/x86_64-linux/lib"]
    try:
        import torch

        nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
        for sub in ("cudnn/lib", "cu13/lib"):
            dirs.append(os.path.join(nvidia, sub))
    except ImportError:
        pass
    dirs = [d for d in dirs if os.path.isdir(d)]
    return ":".join(dirs + [os.environ.get("LD_LIBRARY_PATH", "")])


def unpack(bundle, name, dest):
    path = os.path.join(dest, name)
    with gzip.open(os.path.join(bundle, name + ".gz"), "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="gpu", help="folder written by cargo xtask gpu-bundle")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--ab-images", type=int, default=4096)
    ap.add_argument("--budget-s", type=float, default=420,
                    help="seconds this whole script may take (the call's limit, less a margin)")
    args = ap.parse_args()
    start = time.monotonic()
    left = lambda: args.budget_s - (time.monotonic() - start)
    os.makedirs(args.out, exist_ok=True)
    work = "/tmp/lethe-gpu"
    os.makedirs(work, exist_ok=True)
    bench = unpack(args.bundle, "bench_protect", work)
    tests = unpack(args.bundle, "lethe_model_tests", work)
    env = dict(os.environ, LD_LIBRARY_PATH=library_path(), PYTHONUNBUFFERED="1")
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True).stdout.strip()
    except OSError as e:
        gpu = f"nvidia-smi failed: {e}"
    session = {"gpu": gpu}
    print("gpu:", session["gpu"], flush=True)

    # 1. CUDA unit tests.
    with open(os.path.join(args.out, "tests.txt"), "w") as log:
        try:
            rc = subprocess.run([tests, *CUDA_TESTS, "--test-threads", "1", "--nocapture"],
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=min(180, left())).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = open(os.path.join(args.out, "tests.txt")).read()
    session["tests"] = {"rc": rc, "lines": [l for l in text.splitlines()
                                            if l.startswith("test ") or "differs" in l]}
    if rc != 0:
        session["tests"]["tail"] = text[-1500:]
    print("\n".join(session["tests"]["lines"]), f"\ntests rc={rc}", flush=True)
    tests_ok = rc == 0

    # 2. A/B of the GPU paths, each beside PyTorch.
    compare = [sys.executable, os.path.join(HERE, "bench_protect_torch.py"),
               "--lethe-bin", bench, "--variants", "tf32"]
    session["ab"] = {}
    for name, extra, check in [("default", {}, True), ("autograd_path", AUTOGRAD_PATH, False)]:
        out = os.path.join(args.out, f"ab_{name}.json")
        cmd = compare + ["--images", str(args.ab_images), "--out", out] + (["--check"] if check else [])
        try:
            proc = subprocess.run(cmd, env=dict(env, **extra), capture_output=True, text=True,
                                  timeout=min(150, max(1, left() - 200)))
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-1500:])
            d = json.load(open(out))
            lethe = d["lethe_tf32"]
            session["ab"][name] = {
                "pytorch_image_steps_per_s": d["pytorch"]["image_steps_per_s"],
                "lethe_image_steps_per_s": lethe.get("lethe", {}).get("em_round", {}).get("image_steps_per_s"),
                "over_pytorch": lethe.get("over_pytorch"),
                "error": lethe.get("lethe_error"),
                "check_against_cpu": lethe.get("check_against_cpu") or d.get("check_against_cpu"),
            }
        except (subprocess.TimeoutExpired, RuntimeError, OSError, ValueError, KeyError) as e:
            session["ab"][name] = {"error": repr(e)}
        print(name, json.dumps(session["ab"][name])[:600], flush=True)

    # 3. The full round, on what is left of the budget.
    path = {} if tests_ok else AUTOGRAD_PATH
    session["round_path"] = "default" if tests_ok else "autograd_path (CUDA tests failed)"
    out = os.path.join(args.out, "round.json")
    try:
        proc = subprocess.run(compare + ["--images", str(args.images), "--out", out],
                              env=dict(env, **path), capture_output=True, text=True,
                              timeout=max(1, left() - 5))
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-1500:])
        d = json.load(open(out))
        lethe = d["lethe_tf32"]
        session["round"] = {
            "images": args.images,
            "pytorch_round_s": d["pytorch"]["round_s"],
            "lethe_round_s": lethe.get("lethe", {}).get("em_round", {}).get("round_s"),
            "over_pytorch": lethe.get("over_pytorch"),
            "error": lethe.get("lethe_error"),
        }
    except (subprocess.TimeoutExpired, RuntimeError, OSError, ValueError, KeyError) as e:
        session["round"] = {"error": repr(e)}
    print("round:", json.dumps(session["round"]), flush=True)
    session["seconds"] = round(time.monotonic() - start, 1)
    with open(os.path.join(args.out, "session.json"), "w") as f:
        json.dump(session, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
