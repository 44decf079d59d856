"""Markdown tables from clora-bench JSON (for benchmarks/RESULTS.md).
Usage: python benchmarks/report.py BENCH.json [BENCH.json ...] [--per-shape] [--vs BASE ENGINE]

Where the rows carry the Triton tuner's choices, a count of the strategies it settled on follows
the summary, and --per-shape adds auto's (fwd/dx) to each row.

--vs torch cuda: per file and pass, the geomean speed-up of ENGINE over BASE (t_BASE / t_ENGINE)
for M <= 16 and for all shapes, and the worst shape (largest t_ENGINE / t_BASE)."""
import argparse
import json
import sys
from collections import Counter, defaultdict

from clora_kernels.bench.__main__ import summarize
from clora_kernels.bench.core import geomean

ORDER = ("merged", "torch", "compile", "peft", "hand", "triton", "cuda", "auto")


def _by_shape(data):
    by = defaultdict(dict)
    for r in data["results"]:
        by[(r["pass"], r["layer"], r["M"], r["K"], r["N"], r["r"])][r["backend"]] = r
    return by


def vs(data, base, engine):
    by = _by_shape(data)
    present = {b for v in by.values() for b in v}
    missing = [b for b in (base, engine) if b not in present]
    if missing:     # (an empty header, exit 0)
        print(f"\n--vs: no rows of {missing} in this file (its backends: {sorted(present)})")
        return
    print(f"\n{engine} vs {base} ({data['meta']['dtype']}; speed-up = t_{base} / t_{engine}):")
    for pas in ("fwd", "fwd+bwd"):
        pairs = [(k, v[base]["median_us"], v[engine]["median_us"]) for k, v in by.items()
                 if k[0] == pas and base in v and engine in v]
        if not pairs:
            continue
        small = [tb / te for k, tb, te in pairs if k[2] <= 16]
        worst = max(pairs, key=lambda p: p[2] / p[1])
        print(f"  {pas:8s} geomean all {geomean([tb / te for _, tb, te in pairs]):.3f}x"
              + (f"   M<=16 {geomean(small):.3f}x" if small else "")
              + f"   worst {worst[1] / worst[2]:.3f}x at {worst[0][1]} M={worst[0][2]} ({len(pairs)} shapes)")


def strategies(data):
    """Per (backend, pass, kind): how many shapes the tuner settled on each strategy for."""
    counts = defaultdict(Counter)
    for r in data["results"]:
        for kind, strategy in r.get("plans", {}).items():
            counts[(r["backend"], r["pass"], kind)][strategy] += 1
    if counts:
        print("\nstrategies chosen by the tuner (shapes):")
    for (backend, pas, kind), c in sorted(counts.items()):
        print(f"  {backend:7s} {pas:8s} {kind:4s} " + ", ".join(f"{s} {n}" for s, n in c.most_common()))


def main(path, per_shape=False, versus=None):
    data = json.load(open(path))
    m = data["meta"]
    where = f"{m['gpu']} (driver {m['driver']})" if m.get("gpu") else m.get("cpu") or m.get("device")
    print(f"- device: {where}, torch {m['torch']}, triton {m['triton']}, "
          f"peft {m['peft']}, {m['dtype']}, {m['date']}")
    print(f"- command: `{m['command']}`")
    c = m.get("ceilings") or {}
    print(f"- timing: {m['timing']}" + (f"; ceilings measured at start: GEMM {c['gemm_tflops']:.0f} TFLOP/s, "
                                       f"copy {c['copy_gbps']:.0f} GB/s" if c.get("gemm_tflops") else ""))
    print(f"- rows: {len(data['results'])}\n\n```")
    print("\n".join(summarize(data)))
    if versus:
        vs(data, *versus)
    strategies(data)
    print("```")
    if not per_shape:
        return
    by = _by_shape(data)
    backends = [b for b in ORDER if any(b in v for v in by.values())]
    plans = any("plans" in r for r in data["results"])
    print("\n| pass | layer | M | K | N | r | merged µs | " + " | ".join(f"{b} ×" for b in backends[1:])
          + (" | auto plan (fwd/dx)" if plans else "") + " |")
    print("|" + "---|" * (7 + len(backends) - 1 + plans))
    for k, v in by.items():
        # (a shape whose merged row failed has no ratios: clora-bench writes None there)
        cells = [f"{v[b]['ratio_to_merged']:.2f}" if v.get(b, {}).get("ratio_to_merged") is not None else "-"
                 for b in backends[1:]]
        if plans:
            p = v.get("auto", {}).get("plans", {})
            cells.append("/".join(p[kind] for kind in ("fwd", "dx") if kind in p) or "-")
        merged = f"{v['merged']['median_us']:.1f}" if "merged" in v else "-"
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {k[5]} | {merged} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--per-shape", action="store_true")
    ap.add_argument("--vs", nargs=2, metavar=("BASE", "ENGINE"), default=None)
    a = ap.parse_args()
    failed = False
    for p in a.paths:
        try:
            main(p, a.per_shape, a.vs)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"{p}: {exc}", file=sys.stderr)
            failed = True
        except (KeyError, TypeError) as exc:
            print(f"{p}: not a clora-bench JSON ({type(exc).__name__}: {exc})", file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)
