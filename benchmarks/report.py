"""Markdown tables from clora-bench JSON (for benchmarks/RESULTS.md).
Usage: python benchmarks/report.py BENCH.json [--per-shape]"""
import json
import sys
from collections import defaultdict

from clora_kernels.bench.__main__ import summarize


def main(path, per_shape=False):
    data = json.load(open(path))
    m = data["meta"]
    print(f"- device: {m['gpu']} (driver {m['driver']}), torch {m['torch']}, triton {m['triton']}, "
          f"peft {m['peft']}, {m['dtype']}, {m['date']}")
    print(f"- command: `{m['command']}`")
    print(f"- timing: {m['timing']}; ceilings measured at start: "
          f"GEMM {m['ceilings']['gemm_tflops']:.0f} TFLOP/s, copy {m['ceilings']['copy_gbps']:.0f} GB/s")
    print(f"- rows: {len(data['results'])}\n\n```")
    print("\n".join(summarize(data)))
    print("```")
    if not per_shape:
        return
    by = defaultdict(dict)
    for r in data["results"]:
        by[(r["pass"], r["layer"], r["M"], r["K"], r["N"], r["r"])][r["backend"]] = r
    backends = [b for b in ("merged", "torch", "compile", "peft", "triton", "auto")
                if any(b in v for v in by.values())]
    print("\n| pass | layer | M | K | N | r | merged µs | " + " | ".join(f"{b} ×" for b in backends[1:]) + " |")
    print("|" + "---|" * (7 + len(backends) - 1))
    for k, v in by.items():
        cells = [f"{v[b]['ratio_to_merged']:.2f}" if b in v else "-" for b in backends[1:]]
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {k[5]} | {v['merged']['median_us']:.1f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], "--per-shape" in sys.argv)
