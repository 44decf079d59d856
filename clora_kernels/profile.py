"""clora-profile: end-to-end inference latency of a timm model with C-LoRA.

For each batch size and mode (eager, cuda-graphs, compile) it times the plain timm model, the
C-LoRA model merged (W + delta: a plain Linear at inference), and the C-LoRA model unmerged on
each usable backend. Reports p50/p90/p99 latency and images/s; --json writes the rows,
--trace writes a torch.profiler Chrome trace of one variant, --top N prints its per-kernel
time breakdown.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import statistics
import sys
import time

import torch

from . import available_backends, inject_clora, merge
from ._io import provenance, write_json_atomic
from .bench.core import usable_for_timing
from .nn import clora_layers

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("eager", "cuda-graphs", "compile")


def _percentile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def build_model(name: str, img_size, device, dtype):
    import timm
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        raise SystemExit(f"clora-profile: unknown timm model {name!r}" +
                         (f"; close names: {', '.join(close)}" if close else ""))
    kw = {"img_size": img_size} if img_size else {}
    model = timm.create_model(name, pretrained=False, **kw)
    return model.to(device=device, dtype=dtype).eval()


def make_variants(base, args, device):
    """name -> model. lora_B gets small random values so the adapter path does real work."""
    variants = {"timm": base}
    gen = torch.Generator(device="cpu").manual_seed(0)

    def adapted(backend):
        m = inject_clora(copy.deepcopy(base), target_modules=tuple(args.targets), rank=args.rank, backend=backend)
        with torch.no_grad():
            for _, layer in clora_layers(m):
                layer.lora_B.copy_(0.01 * torch.randn(layer.lora_B.shape, generator=gen))
        return m.eval()

    merged = adapted("torch")
    merge(merged)
    variants["clora-merged"] = merged
    usable = available_backends()
    for b in args.backends:
        ok, why = usable_for_timing(b, device, usable)
        if not ok:
            print(f"clora-profile: skipping backend {b!r}: {why}", file=sys.stderr)
            continue
        variants[f"clora-{b}"] = adapted(b)
    if not any(k.startswith("clora-") and k != "clora-merged" for k in variants):
        if args.backends_given:
            raise SystemExit("clora-profile: none of the requested backends can run here")
    return variants


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_model(fn, x, device, warmup: int, iters: int) -> list:
    """Per-iteration latency in ms: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn(x)
    _sync(device)
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(x)
            e.record()
            e.synchronize()
            out.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn(x)
            out.append(1e3 * (time.perf_counter() - t0))
    return out


def runner(model, mode: str, x, device):
    """A callable running one inference in the given mode."""
    if mode == "eager":
        return model
    if mode == "compile":
        return torch.compile(model)
    if device.type != "cuda":
        raise ValueError("cuda-graphs mode needs a CUDA device")
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(static_x)          # warm-up: kernels compiled and tuned before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)

    def replay(inp):
        static_x.copy_(inp)
        graph.replay()
        return static_y
    return replay


def profile_breakdown(fn, x, device, top: int, trace_path=None) -> str:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn(x)
    _sync(device)
    with profile(activities=acts) as prof:
        for _ in range(3):
            fn(x)
        _sync(device)
    if trace_path:
        prof.export_chrome_trace(trace_path)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def build_parser():
    ap = argparse.ArgumentParser(prog="clora-profile", description=__doc__)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", nargs="+", default=["qkv", "proj", "fc1", "fc2"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--mode", nargs="+", choices=MODES, default=["eager"])
    ap.add_argument("--backends", nargs="+", default=None, help="engine backends for the unmerged variants")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--img-size", type=int, default=None, help="override the model's input size")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--trace", default=None, help="write a Chrome trace of one variant here")
    ap.add_argument("--trace-variant", default=None, help="variant for --trace/--top (default: first unmerged)")
    ap.add_argument("--top", type=int, default=0, help="print the N most expensive kernels of that variant")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if any(b <= 0 for b in args.batch):
        raise SystemExit(f"clora-profile: --batch sizes must be positive, got {args.batch}")
    if args.rank <= 0:
        raise SystemExit(f"clora-profile: --rank must be positive, got {args.rank}")
    if args.iters <= 0 or args.warmup < 0:
        raise SystemExit("clora-profile: --iters must be positive and --warmup non-negative")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("clora-profile: --device cuda but no CUDA GPU is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    args.backends_given = args.backends is not None
    if args.backends is None:
        args.backends = ["triton", "cuda", "torch"] if device.type == "cuda" else ["torch"]
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    modes = [m for m in args.mode if not (m == "cuda-graphs" and device.type != "cuda")]
    for m in set(args.mode) - set(modes):
        print(f"clora-profile: skipping mode {m!r}: needs a CUDA device", file=sys.stderr)
    if not modes:
        raise SystemExit("clora-profile: no requested mode can run here")
    base = build_model(args.model, args.img_size, device, dtype)
    variants = make_variants(base, args, device)
    size = base.default_cfg.get("input_size", (3, 224, 224)) if not args.img_size else (3, args.img_size, args.img_size)
    rows = []
    with torch.inference_mode():
        for batch in args.batch:
            x = torch.randn(batch, *size[-3:], device=device, dtype=dtype)
            for mode in modes:
                for name, model in variants.items():
                    try:
                        fn = runner(model, mode, x, device)
                        lat = time_model(fn, x, device, args.warmup, args.iters)
                    except Exception as exc:
                        print(f"clora-profile: {name} {mode} batch {batch} failed: {type(exc).__name__}: {exc}",
                              file=sys.stderr)
                        continue
                    p50 = statistics.median(lat)
                    rows.append({"variant": name, "batch": batch, "mode": mode, "p50_ms": p50,
                                 "p90_ms": _percentile(lat, 90), "p99_ms": _percentile(lat, 99),
                                 "images_per_s": batch / (p50 / 1e3)})
    meta = {"model": args.model, "rank": args.rank, "targets": args.targets, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "dtype": str(dtype)[6:],
            **provenance("clora-profile")}
    if args.json:
        write_json_atomic(args.json, {"meta": meta, "results": rows})
    print(f"\nclora-profile {meta['command']}\n{args.model} rank {args.rank} on {meta['gpu'] or device} {meta['dtype']}"
          f", torch {meta['torch']}, triton {meta['triton']}")
    print(f"{'variant':16s} {'batch':>5s} {'mode':12s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s} {'img/s':>10s}")
    for r in rows:
        print(f"{r['variant']:16s} {r['batch']:5d} {r['mode']:12s} {r['p50_ms']:9.3f} {r['p90_ms']:9.3f} "
              f"{r['p99_ms']:9.3f} {r['images_per_s']:10.1f}")
    if args.trace or args.top:
        name = args.trace_variant or next((k for k in variants if k.startswith("clora-") and k != "clora-merged"),
                                          "clora-merged")
        if name not in variants:
            raise SystemExit(f"clora-profile: --trace-variant {name!r} is not one of {list(variants)}")
        x = torch.randn(args.batch[0], *size[-3:], device=device, dtype=dtype)
        with torch.inference_mode():
            table = profile_breakdown(variants[name], x, device, max(args.top, 1), args.trace)
        if args.top:
            print(f"\ntop {args.top} ops of {name}, batch {args.batch[0]}, eager:\n{table}")
        if args.trace:
            print(f"Chrome trace of {name} written to {args.trace}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
