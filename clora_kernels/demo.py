"""`clora-demo`: build a small C-LoRA ViT, train two tiny tasks on random data, print the
per-task loss and the orthogonality loss. Runs on CPU in well under a minute."""
from __future__ import annotations

import argparse

import torch

from . import end_task, inject_clora, orthogonality_loss
from .nn import clora_layers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="clora-demo", description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lambda-orth", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import timm
    torch.manual_seed(args.seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4)
    inject_clora(model, rank=args.rank)
    model.head.requires_grad_(True)
    print(f"C-LoRA ViT-Tiny: {len(clora_layers(model))} adapted layers, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    for task in range(2):
        x = torch.randn(64, 3, 32, 32)
        y = torch.randint(0, 4, (64,))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        first = last = orth = None
        for _ in range(args.steps):
            task_loss = torch.nn.functional.cross_entropy(model(x), y)
            orth = orthogonality_loss(model)
            loss = task_loss + args.lambda_orth * orth
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = task_loss.item() if first is None else first
            last = task_loss.item()
        print(f"task {task}: loss {first:.4f} -> {last:.4f}   orthogonality loss {orth.item():.3e}")
        end_task(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
