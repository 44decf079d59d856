"""Benchmark shape suites (docs/design.md section 7)."""
from __future__ import annotations

from dataclasses import dataclass

VIT = {"vit_b16": (768, 3072), "vit_l16": (1024, 4096)}  # (hidden, mlp)
LLM = {"q/o 4096->4096": (4096, 4096), "up 4096->14336": (4096, 14336), "down 14336->4096": (14336, 4096),
       "kv 4096->1024": (4096, 1024)}
VIT_BATCHES = (1, 8, 64)
LLM_M = (1, 16, 512, 4096, 16384)
RANKS = (8, 16, 64)


@dataclass(frozen=True)
class Shape:
    suite: str
    layer: str
    m: int
    k: int
    n: int
    r: int


def _vit_layers(name: str, hidden: int, mlp: int):
    return [(f"{name}.qkv", hidden, 3 * hidden), (f"{name}.proj", hidden, hidden), (f"{name}.fc1", hidden, mlp),
            (f"{name}.fc2", mlp, hidden)]


def suite_shapes(suite: str, ranks=RANKS, size_div: int = 1) -> list:
    """Shapes of a suite; size_div > 1 shrinks every dimension (CPU smoke runs)."""
    rows = []
    if suite in ("vit", "full"):
        for name, (h, mlp) in VIT.items():
            for layer, k, n in _vit_layers(name, h, mlp):
                rows += [("vit", f"{layer}@b{b}", b * 197, k, n) for b in VIT_BATCHES]
    if suite in ("llm", "full"):
        for layer, (k, n) in LLM.items():
            rows += [("llm", layer, m, k, n) for m in LLM_M]
    if suite == "quick":
        rows = [("quick", "vit_b16.qkv@b8", 8 * 197, 768, 2304), ("quick", "vit_b16.fc2@b64", 64 * 197, 3072, 768),
                ("quick", "q/o 4096->4096", 16, 4096, 4096), ("quick", "up 4096->14336", 4096, 4096, 14336)]
    if not rows:
        raise ValueError(f"unknown suite {suite!r} (quick, vit, llm, full)")
    out = []
    for s, layer, m, k, n in rows:
        m, k, n = max(1, m // size_div), max(1, k // size_div), max(1, n // size_div)
        for r in ranks:
            if r <= min(k, n):
                out.append(Shape(s, layer, m, k, n, r))
    return out
