"""Peak memory of one training step of a C-LoRA ViT on CPU, backend "torch" (the unmerged ops)
against "auto" (the per-call merged weight where M > K): the check behind auto's memory rule
(backends/auto.py). Each backend runs in its own process; the peak is the process's resident high
water mark (VmHWM, reset through /proc/self/clear_refs just before the step), with glibc told to
mmap every allocation of 64 KiB or more so that freed tensors leave the resident set. Linux only.
Usage: python benchmarks/peak_memory.py [--model vit_small_patch16_224] [--batch 16] [--rank 16]
"""
import argparse
import json
import os
import subprocess
import sys


def step(backend: str, model_name: str, batch: int, rank: int) -> dict:
    import timm
    import torch

    import clora_kernels as ck
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=10)
    ck.inject_clora(model, rank=rank, backend=backend)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 10, (batch,))

    def train_step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for p in model.parameters():
            p.grad = None
    train_step()                                   # warm-up: libraries, thread pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                               # reset VmHWM to the current resident set
    rss0 = _status("VmRSS")
    train_step()
    return {"backend": backend, "peak_above_start_mib": (_status("VmHWM") - rss0) / 1024}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])      # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(step(args.child, args.model, args.batch, args.rank)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for backend in ("torch", "auto", "torch", "auto"):
        out = subprocess.run([sys.executable, __file__, "--child", backend, "--model", args.model, "--batch",
                              str(args.batch), "--rank", str(args.rank)], env=env, capture_output=True, text=True,
                             check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"peak resident memory above the step's start, one training step of {args.model}, batch {args.batch}, "
          f"rank {args.rank}, CPU (MiB):")
    for r in rows:
        print(f"  {r['backend']:6s} {r['peak_above_start_mib']:8.1f}")


if __name__ == "__main__":
    main()
