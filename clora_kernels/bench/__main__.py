"""clora-bench: time every variant of every shape of a suite in one process run; print a table,
write JSON (--json) and a PNG of the ratios to `merged` (--plot)."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings

import torch

from .. import _cli, available_backends
from .._io import parent_made, provenance, write_json_atomic
from .core import BASELINES, DTYPES, ENGINE, build_variant, floor_ratio, flops_bytes, geomean, graph_sets, \
    make_case, measure_ceilings, peak_mem, raise_compile_limits, time_graph_us, time_us, usable_for_timing
from .shapes import RANKS, suite_shapes


def _meta(args, device) -> dict:
    meta = {"device": str(device), "gpu": None, "driver": None, "cuda": torch.version.cuda, "dtype": args.dtype,
            **provenance("clora-bench", args.argv)}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        try:
            import subprocess
            meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            meta["driver"] = None
    else:
        meta["cpu"] = _cpu_name()
        meta["cpu_count"] = os.cpu_count()
    return meta


def _cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux: platform.processor() is '' there), else what
    platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _select_variants(requested, device) -> tuple:
    usable = available_backends()
    chosen, skipped = [], []
    names = requested or list(BASELINES) + list(ENGINE)
    unknown = [n for n in names if n not in BASELINES + ENGINE]
    if unknown:
        raise ValueError(f"argument --backends: unknown backend(s) {unknown}; choose from {list(BASELINES + ENGINE)}")
    for name in names:
        if name in ("triton", "cuda", "auto", "torch"):
            if name == "auto":
                env = os.environ.get("CLORA_BACKEND")
                if env and env != "auto":   # (it named the row auto and timed `env`, with auto's plan in the JSON)
                    raise ValueError(f"argument --backends: CLORA_BACKEND={env} is set, so the auto row would time the "
                                     f"{env} backend; unset it (--backends picks the rows: --backends {env})")
                chosen.append(name)
                continue
            ok, why = usable_for_timing(name, device, usable)
            (chosen if ok else skipped).append(name if ok else (name, why))
        elif name == "peft":
            try:
                import peft  # noqa: F401
                chosen.append(name)
            except ImportError:
                skipped.append((name, "peft is not installed (pip install '.[bench]')"))
        elif name in ("merged", "compile", "hand"):
            chosen.append(name)
    if "merged" not in chosen:
        chosen.insert(0, "merged")
    return chosen, skipped


def _chosen_strategies(name, shape, dtype, device, training) -> dict:
    """The plan per kind (fwd, dx) for this shape: on CPU the torch backend's under auto (`auto.torch_plan`,
    eager or merge; the torch row always runs eager); on a GPU the Triton tuner's, for the triton and auto
    rows."""
    if name == "auto" and device.type == "cpu":
        from ..backends.auto import torch_plan
        x, g = torch.empty(shape.m, shape.k, dtype=dtype), torch.empty(shape.m, shape.n, dtype=dtype)
        plans = {"fwd": torch_plan(x, shape.n, shape.r, training)}
        if training:
            plans["dx"] = torch_plan(g, shape.k, shape.r, True)
        return plans
    if name not in ("triton", "auto") or device.type != "cuda" or not available_backends()["triton"][0]:
        return {}
    from ..backends.triton.tune import chosen_strategies
    return chosen_strategies(shape.m, shape.n, shape.k, shape.r, dtype, auto=name == "auto", training=training)


def run(args) -> dict:
    """Time the suite. A bad argument is a ValueError whose message starts with 'argument --flag:'
    (main turns it into argparse's one line and exit code 2)."""
    device = _cli.device(args.device)
    args.dtype = _cli.dtype_name(args.dtype, device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        warnings.warn("fp16 on CPU is slow and unrepresentative; bf16 or fp32 is the CPU choice")
    passes = {"fwd": ["fwd"], "fwd+bwd": ["fwd+bwd"], "both": ["fwd", "fwd+bwd"]}[args.passes]
    if args.size_div is None:   # full-size shapes take minutes per call on a 2-core CPU
        args.size_div = 1 if device.type == "cuda" else 8
    shapes = suite_shapes(args.suite, args.rank, args.size_div)
    layers = suite_shapes(args.suite, [1], args.size_div)        # every layer, for what a rank does not fit
    if not shapes:
        widest = max(min(s.k, s.n) for s in layers)
        raise ValueError(f"argument --rank: {args.rank} fits no layer of the {args.suite} suite at --size-div "
                         f"{args.size_div} (the rank must be <= min(K, N), at most {widest} here)")
    unfit = []      # the layers a rank does not fit: named (and in the JSON: a reader saw a whole suite)
    for one in layers:
        for r in args.rank:
            if r > min(one.k, one.n):
                print(f"clora-bench: skipping {one.layer} at rank {r}: rank > min(K, N) = {min(one.k, one.n)} at "
                      f"--size-div {args.size_div}", file=sys.stderr)
                unfit.append(f"{one.layer} at rank {r}")
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError("argument --cuda-graphs: needs a CUDA device")
    variants, skipped = _select_variants(args.backends, device)
    if args.backends and not [v for v in variants if v != "merged" or "merged" in args.backends]:
        raise ValueError(f"argument --backends: none of the requested backends can run here "
                         f"({'; '.join(f'{n}: {w}' for n, w in skipped)})")
    for name, why in skipped:
        print(f"clora-bench: skipping {name}: {why}", file=sys.stderr)
    meta = _meta(args, device)
    meta["size_div"] = args.size_div
    meta["threads"] = torch.get_num_threads()      # (CPU timing runs at this count)
    meta["timing"] = ("cuda-graph replay (fwd); CUDA events (fwd+bwd)" if args.cuda_graphs else
                      "CUDA events per call, host launch overhead included" if device.type == "cuda" else
                      "torch.utils.benchmark wall clock, median; best of 3 interleaved rounds")
    meta["ceilings"] = measure_ceilings(device, dtype)
    meta["skipped"] = {n: w for n, w in skipped}
    meta["skipped_shapes"] = unfit
    meta["failed"] = failed = []      # "variant at shape: error", one per failure (main exits 1 if any)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    # the compile row compiles each shape static: one graph per shape and pass (264 for --suite full)
    raise_compile_limits()
    compiled: dict = {}
    results = []
    from tqdm import tqdm
    jobs = [(s, p) for p in passes for s in shapes]
    for shape, pas in tqdm(jobs, desc="clora-bench", unit="shape", file=sys.stderr,
                           disable=True if args.no_progress else None):   # None: off unless stderr is a terminal
        training = pas == "fwd+bwd"
        case = make_case(shape, dtype, device, training, l2)
        graph_cases = ([case] + [make_case(shape, dtype, device, False, l2)
                                 for _ in range(graph_sets(shape, dtype, l2) - 1)]
                       if args.cuda_graphs and not training else None)
        fl, by = flops_bytes(shape, torch.finfo(dtype).bits // 8, training)
        ceil = meta["ceilings"]
        floor_s = max(fl / (ceil["gemm_tflops"] * 1e12), by / (ceil["copy_gbps"] * 1e9)) if ceil["gemm_tflops"] else None
        ctx = torch.enable_grad if training else torch.no_grad
        built = {}
        for name in variants:
            try:
                step, reset = build_variant(name, case, training, compiled.setdefault((pas, name), {}))
                with ctx():
                    step()
                    if graph_cases:
                        steps = [build_variant(name, c, False, compiled[(pas, name)])[0] for c in graph_cases]
                        built[name] = (step, reset, time_graph_us(steps, args.rep_ms))
                    else:
                        built[name] = (step, reset, float("inf"))
            except Exception as exc:   # one variant failing must not hide the others
                failed.append(f"{name} at {shape}: {type(exc).__name__}: {exc}")
                print(f"clora-bench: {name} failed at {shape}: {type(exc).__name__}: {exc}", file=sys.stderr)
        # timed in rounds, every variant once per round in alternating order, best round kept: on a
        # shared CPU a variant timed alone can meet a slow stretch (the same plan measured 10-30 %
        # apart in consecutive runs there); on a GPU one round of do_bench
        rounds = 1 if device.type == "cuda" else 3
        for rnd in range(0 if graph_cases else rounds):
            for name in (list(built) if rnd % 2 == 0 else list(reversed(built))):
                step, reset, best = built[name]
                try:
                    with ctx():
                        built[name] = (step, reset, min(best, time_us(step, device, reset, max(1, args.rep_ms // rounds))))
                except Exception as exc:
                    failed.append(f"{name} at {shape}: {type(exc).__name__}: {exc}")
                    print(f"clora-bench: {name} failed at {shape}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    built.pop(name)
        rows = {}
        for name, (step, reset, us) in built.items():
            with ctx():     # (measured on CUDA only: None elsewhere, not 0 bytes)
                mem = peak_mem(step, device, reset) if training and device.type == "cuda" else None
            plans = _chosen_strategies(name, shape, dtype, device, training)
            rows[name] = {"suite": shape.suite, "layer": shape.layer, "M": shape.m, "K": shape.k, "N": shape.n,
                          "r": shape.r, "dtype": args.dtype, "pass": pas, "backend": name, "median_us": us,
                          "floor": floor_ratio(shape, training),
                          "timing": "cuda-graph" if graph_cases else "events" if device.type == "cuda"
                          else "wall-clock",
                          "tflops": fl / us / 1e6, "gbps": by / us / 1e3,
                          "pct_peak": (100 * floor_s / (us * 1e-6)) if floor_s else None}
            if training:
                rows[name]["peak_mem_bytes"] = mem
            if plans:
                rows[name]["plans"] = plans
        base = rows.get("merged", {}).get("median_us")
        for row in rows.values():
            row["ratio_to_merged"] = row["median_us"] / base if base else None
        results.extend(rows.values())
        del case, graph_cases
        if args.json:   # written after every shape: an interrupted run keeps what it measured
            write_json_atomic(args.json, {"meta": meta, "results": results})
            args.written = len(results)
    return {"meta": meta, "results": results}


def summarize(data) -> list:
    """Geometric means per backend, the performance issue's targets read off these lines: time ratio
    to merged, that ratio over the row's floor (bench.core.floor_ratio), each engine backend's
    speed-up over eager torch, compile and PEFT, and the rows where it is slower than PEFT."""
    res = data["results"]
    lines = []
    backends = sorted({r["backend"] for r in res} - {"merged"})
    engine = [b for b in ENGINE + ("torch",) if b in backends]
    groups = [("fwd, M >= 512", lambda r: r["pass"] == "fwd" and r["M"] >= 512),
              ("fwd, M <= 16", lambda r: r["pass"] == "fwd" and r["M"] <= 16),
              ("fwd, all", lambda r: r["pass"] == "fwd"),
              ("fwd+bwd, all", lambda r: r["pass"] == "fwd+bwd")]
    groups = [(title, [r for r in res if pred(r)]) for title, pred in groups]
    groups = [(title, sel) for title, sel in groups if sel]
    key = lambda r: (r["pass"], r["layer"], r["M"], r["K"], r["N"], r["r"])  # noqa: E731
    rows = {}
    for r in res:
        rows.setdefault(key(r), {})[r["backend"]] = r
    for heading, value in (("geomean time ratio to merged (lower is better):", lambda r: r["ratio_to_merged"]),
                           ("geomean of (ratio to merged) / floor, floor = the FLOP ratio the math allows:",
                            lambda r: r["ratio_to_merged"] / r["floor"]
                            if r.get("floor") and r.get("ratio_to_merged") is not None else None)):
        lines.append(heading)
        lines.append(f"  {'group':16s}{'floor':>10s}" + "".join(f"{b:>10s}" for b in backends))
        for title, sel in groups:
            floors = geomean([r["floor"] for r in sel if r["backend"] == "merged" and r.get("floor")])
            vals = [geomean([value(r) for r in sel if r["backend"] == b]) for b in backends]
            lines.append(f"  {title:16s}{floors:10.3f}" + "".join(f"{v:10.3f}" for v in vals))
    lines.append("speed-up of each engine backend (geomean of t_other / t_backend; > 1: the backend is faster):")
    for b in engine:
        parts = []
        for title, sel in groups:
            if not title.endswith(("all", ">= 512")):
                continue
            got = []
            for other in ("torch", "compile", "peft", "hand"):
                pairs = [(v[other], v[b]) for v in (rows[key(r)] for r in sel if r["backend"] == b)
                         if other in v and other != b]
                if pairs:
                    got.append(f"{other} {geomean([o['median_us'] / t['median_us'] for o, t in pairs]):.3f}x")
            if got:
                parts.append(f"{title}: " + ", ".join(got))
        if parts:
            lines.append(f"  {b:8s} " + "; ".join(parts))
    for b in engine:
        for pas, ref in (("fwd", "peft"), ("fwd+bwd", "peft"), ("fwd", "hand"), ("fwd+bwd", "hand")):
            both = [v for k, v in rows.items() if k[0] == pas and b in v and ref in v]
            if both:
                slower = [v[b] for v in both if v[b]["median_us"] > v[ref]["median_us"]]
                lines.append(f"  {b:8s} slower than {ref} on {len(slower)} of {len(both)} {pas} rows"
                             + (": " + ", ".join(f"{r['layer']} M={r['M']} r={r['r']}" for r in slower[:6])
                                + (" ..." if len(slower) > 6 else "") if slower else ""))
    train = [v for k, v in rows.items() if k[0] == "fwd+bwd" and "torch" in v]
    mems = {b: [v[b]["peak_mem_bytes"] / v["torch"]["peak_mem_bytes"] for v in train
                if b in v and v["torch"].get("peak_mem_bytes") and v[b].get("peak_mem_bytes") is not None]
            for b in backends if b != "torch"}
    if any(mems.values()):
        lines.append("fwd+bwd worst peak-memory ratio to eager torch: "
                     + ", ".join(f"{b} {max(m):.3f}" for b, m in mems.items() if m))
    return lines


def table(data) -> str:
    """One row per shape and backend; '*' marks the fastest backend of a shape other than merged.
    The %peak and memory columns appear where they were measured (a GPU)."""
    res = data["results"]
    gpu = any(r.get("pct_peak") is not None or r.get("peak_mem_bytes") for r in res)
    div = data["meta"].get("size_div", 1)
    out = ["* = fastest backend of the shape other than merged" + (
               f"; every dimension of the named layers divided by {div} (--size-div)" if div > 1 else "")
           + "; floor = the least ratio to merged the math allows (FLOPs)",
           f"{'layer':22s} {'M':>6s} {'K':>6s} {'N':>6s} {'r':>4s} {'pass':8s} {'backend':8s} {'us':>10s} "
           f"{'TFLOP/s':>8s} {'GB/s':>8s}" + (f" {'%peak':>6s}" if gpu else "") + f" {'x merged':>9s} {'floor':>6s}"
           + (f" {'mem MiB':>8s}" if gpu else "")]
    groups = {}
    for r in res:
        groups.setdefault((r["layer"], r["M"], r["K"], r["N"], r["r"], r["pass"]), []).append(r)
    for rows in groups.values():
        cand = [r for r in rows if r["backend"] != "merged"]
        best = min(cand, key=lambda r: r["median_us"])["backend"] if cand else None
        for r in rows:
            mark = "*" if r["backend"] == best else " "
            pct = f"{r['pct_peak']:6.1f}" if r.get("pct_peak") is not None else "     -"
            mem = f"{r['peak_mem_bytes'] / 2**20:8.1f}" if r.get("peak_mem_bytes") else "       -"
            ratio = f"{r['ratio_to_merged']:9.3f}" if r.get("ratio_to_merged") else "        -"
            floor = f"{r['floor']:6.3f}" if r.get("floor") else "     -"
            label = r["layer"] + (f"/{div}" if div > 1 else "")
            out.append(f"{label[:22]:22s} {r['M']:6d} {r['K']:6d} {r['N']:6d} {r['r']:4d} {r['pass']:8s} "
                       f"{mark}{r['backend']:7s} {r['median_us']:10.1f} {r['tflops']:8.2f} {r['gbps']:8.1f}"
                       + (f" {pct}" if gpu else "") + f" {ratio} {floor}" + (f" {mem}" if gpu else ""))
    return "\n".join(out)


def plot(data, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = [r for r in data["results"] if r["backend"] != "merged" and r.get("ratio_to_merged")]
    keys = sorted({(r["pass"], r["layer"], r["M"], r["r"]) for r in res})
    backends = sorted({r["backend"] for r in res})
    fig, axes = plt.subplots(1, 1, figsize=(max(8, 0.28 * len(keys)), 5))
    width = 0.8 / max(1, len(backends))
    idx = {k: i for i, k in enumerate(keys)}
    for j, b in enumerate(backends):
        pts = [(idx[(r["pass"], r["layer"], r["M"], r["r"])], r["ratio_to_merged"]) for r in res if r["backend"] == b]
        axes.bar([p[0] + j * width for p in pts], [p[1] for p in pts], width, label=b)
    axes.axhline(1.0, color="k", lw=0.8)
    axes.set_xticks([i + 0.4 for i in range(len(keys))])
    axes.set_xticklabels([f"{p} {l} M={m} r={r}" for p, l, m, r in keys], rotation=90, fontsize=6)
    axes.set_ylabel("time / merged cuBLAS")
    m = data["meta"]
    axes.set_title(f"C-LoRA linear, {m['dtype']}, {m.get('gpu') or m['device']}, torch {m['torch']}")
    axes.legend()
    fig.tight_layout()
    fig.savefig(parent_made(path), dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clora-bench", description=__doc__,
                                 formatter_class=_cli.Help)
    ap.add_argument("--suite", choices=["quick", "vit", "llm", "full"], default="quick",
                    help="shapes: quick (four layers), vit (ViT-B/L), llm (LLaMA-class), full (vit and llm)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="auto: CUDA when torch sees a GPU, else CPU")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--rank", type=_cli.positive_int, nargs="+", default=None,
                    help=f"ranks (default {list(RANKS)}; quick: 16)")
    ap.add_argument("--pass", dest="passes", choices=["fwd", "fwd+bwd", "both"], default="fwd",
                    help="the forward alone, forward and backward, or both")
    ap.add_argument("--backends", nargs="+", default=None,
                    help=f"variants to time (default: every usable one of {list(BASELINES) + list(ENGINE)})")
    ap.add_argument("--json", default=None, help="write {meta, results} here")
    ap.add_argument("--plot", default=None, help="write a PNG of the ratios to merged here")
    ap.add_argument("--size-div", type=_cli.positive_int, default=None,
                    help="divide every dimension by this (default 1 on GPU, 8 on CPU)")
    ap.add_argument("--rep-ms", type=_cli.positive_int, default=60, help="timing budget per variant and shape (ms)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="time fwd by CUDA-graph replay (GPU time without host launch overhead)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (none is shown when stderr is not a terminal)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.argv = argv
    if args.rank is None:
        args.rank = [16] if args.suite == "quick" else list(RANKS)
    args.rank = list(dict.fromkeys(args.rank))      # (a rank given twice timed every shape twice)
    _cli.check_output(ap, "--json", args.json)
    _cli.check_plot(ap, "--plot", args.plot)
    _cli.check_distinct(ap, ("--json", args.json), ("--plot", args.plot))
    try:
        data = run(args)
    except ValueError as exc:
        if not str(exc).startswith("argument --"):
            raise
        ap.error(str(exc))
    except KeyboardInterrupt:
        where = "" if not args.json else f"; the shapes measured so far are in {args.json}" \
            if getattr(args, "written", 0) else f"; no shape was finished, {args.json} was not written by this run"
        print("\nclora-bench: interrupted" + where, file=sys.stderr)
        return 130
    m = data["meta"]
    print(f"\n{m['command']}\ndevice {m.get('gpu') or m['device']}  torch {m['torch']}  triton {m['triton']}"
          f"  peft {m['peft']}  dtype {m['dtype']}  {m['date']}\ntiming: {m['timing']}")
    if m["ceilings"]["gemm_tflops"]:
        print(f"measured ceilings: GEMM {m['ceilings']['gemm_tflops']:.0f} TFLOP/s, copy {m['ceilings']['copy_gbps']:.0f} GB/s")
    print(table(data))
    print("\n".join(summarize(data)))
    if args.plot:           # after the table: a plot that cannot be written loses nothing else
        try:
            plot(data, args.plot)
        except OSError as exc:
            print(f"clora-bench: the plot could not be written to {args.plot} ({exc})", file=sys.stderr)
            return 1
    if m["failed"]:
        print(f"clora-bench: {len(m['failed'])} run(s) failed (above; the JSON's meta.failed lists them)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
