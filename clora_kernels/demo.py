"""`clora-demo`: build a small C-LoRA ViT, train two tiny tasks on random data, print the
per-task loss and the orthogonality loss. Runs on CPU in well under a minute."""
from __future__ import annotations

import argparse

import torch

from . import _cli, end_task, inject_clora, orthogonality_loss
from .nn import clora_layers

WIDTH = 192        # vit_tiny_patch16_224's embedding width: the smallest layer's min(in, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="clora-demo", description=__doc__,
                                 formatter_class=_cli.Help)
    ap.add_argument("--steps", type=_cli.positive_int, default=30, help="AdamW steps per task")
    ap.add_argument("--rank", type=_cli.positive_int, default=8, help=f"at most {WIDTH} (the ViT's width)")
    ap.add_argument("--lambda-orth", type=_cli.non_negative, default=0.1,
                    help="weight of the orthogonality loss")
    ap.add_argument("--seed", type=_cli.seed, default=0, help="seed of the tasks and the model")
    args = ap.parse_args(argv)
    if args.rank > WIDTH:
        ap.error(f"argument --rank: must be <= {WIDTH} (the demo ViT's layers are {WIDTH} wide), got {args.rank}")
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
