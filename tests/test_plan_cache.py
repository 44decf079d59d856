"""The Triton tuner's plan file (CLORA_CACHE_DIR/triton-plans.json): every entry read is checked,
bad ones are dropped with one warning and never written back, concurrent writers keep each
other's entries, a killed save's temp file is cleaned up, and an unreadable or unwritable cache
is one warning, not an error. Pure file handling: runs on any machine."""
import json
import multiprocessing as mp
import os
import warnings

import pytest
import torch

pytest.importorskip("triton")
from clora_kernels.backends.triton import tune  # noqa: E402
from clora_kernels.backends.triton.launch import GemmConfig, Plan, ShrinkConfig  # noqa: E402

GOOD = {"fused": Plan("fused", GemmConfig(64, 128, 32, 4, 3)),
        "split": Plan("split", GemmConfig(128, 256, 64, 8, 3), ShrinkConfig(128, 64, 1, 8, 3)),
        "eager": Plan("eager"), "cublas": Plan("cublas", None, ShrinkConfig(16, 32, 2))}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tune, "_disk", {})
    monkeypatch.setattr(tune, "_plans", {})
    monkeypatch.setattr(tune, "_warned", set())
    monkeypatch.setattr(tune, "_loaded", tune._loaded)
    return tmp_path / "triton-plans.json"


def test_a_cached_float16_merge_plan_is_not_served():
    """A plan file from before float16 lost the per-call merged weight (it can overflow there) may
    hold a `merge` plan for float16 x: it is timed again, not served; other dtypes and plans are."""
    x16, x32 = torch.empty(512, 64, dtype=torch.float16), torch.empty(512, 64)
    assert not tune.still_allowed(Plan("merge"), x16)
    assert tune.still_allowed(Plan("merge"), x32) and tune.still_allowed(GOOD["fused"], x16)


def test_round_trip_of_every_strategy(cache):
    tune._disk.update(GOOD)
    tune._save()
    assert tune._read_file(str(cache)) == GOOD
    assert not [f for f in os.listdir(cache.parent) if f.endswith(".tmp")]


@pytest.mark.parametrize("entry,why", [
    ({"strategy": "warp9", "gemm": None, "shrink": None}, "unknown strategy"),
    ({"strategy": "fused", "gemm": None, "shrink": None}, "needs gemm"),
    ({"strategy": "eager", "gemm": {"block_m": 16, "block_n": 16, "block_k": 16, "num_warps": 4, "num_stages": 1},
      "shrink": None}, "takes no gemm"),
    ({"strategy": "fused", "gemm": {"block_m": 48, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 3},
      "shrink": None}, "bad gemm"),                                    # not a power of two
    ({"strategy": "fused", "gemm": {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 0},
      "shrink": None}, "bad gemm"),
    ({"strategy": "fused", "gemm": {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 3, "num_stages": 2},
      "shrink": None}, "bad gemm"),
    ({"strategy": "fused", "gemm": {"block_m": 64.0, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 2},
      "shrink": None}, "bad gemm"),                                    # a float where an int belongs
    ({"strategy": "fused", "gemm": {"block_m": 64, "tile": 1}, "shrink": None}, "unexpected keyword"),
    ({"strategy": "cublas", "gemm": None, "shrink": {"block_m": 16, "block_k": 30, "split_k": 2}}, "bad shrink"),
    ("fused", "unknown strategy"),
])
def test_bad_entries_are_dropped_with_one_warning_and_not_written_back(cache, entry, why):
    with pytest.raises((ValueError, TypeError), match=why):
        tune._decode(entry)
    cache.write_text(json.dumps({"good": tune._encode(GOOD["fused"]), "bad": entry, "bad2": entry}))
    with pytest.warns(UserWarning, match=r"dropped 2 bad entries .* \(first: bad"):
        tune._load()
    assert tune._disk == {"good": GOOD["fused"]}
    tune._disk["new"] = GOOD["eager"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # the bad entries were warned about once already
        tune._save()
    assert set(json.loads(cache.read_text())) == {"good", "new"}


def test_unreadable_file_is_one_warning(cache):
    cache.write_text("{not json")
    with pytest.warns(UserWarning, match="cannot be read"):
        tune._load()
    assert tune._disk == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tune._read_file(str(cache))           # once per process


def test_unwritable_cache_is_one_warning(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CLORA_CACHE_DIR", str(tmp_path / "file" / "sub"))    # a folder under a file
    monkeypatch.setattr(tune, "_disk", dict(GOOD))
    monkeypatch.setattr(tune, "_warned", set())
    with pytest.warns(UserWarning, match="cannot be written"):
        tune._save()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tune._save()


def test_a_killed_saves_temp_file_is_cleaned_and_the_umask_kept(cache):
    leftover = cache.parent / "triton-plans.json.99999.tmp"
    leftover.write_text("{half")
    old = os.umask(0o027)
    try:
        tune._disk.update(GOOD)
        tune._save()
    finally:
        os.umask(old)
    assert not leftover.exists() and tune._read_file(str(cache)) == GOOD
    assert cache.stat().st_mode & 0o777 == 0o640


def _writer(folder, start, n):
    os.environ["CLORA_CACHE_DIR"] = folder
    for i in range(start, start + n):
        tune._disk = {f"k{i}": Plan("eager")}
        tune._save()


def test_concurrent_writers_keep_every_entry(cache):
    """Two processes saving 150 entries each, one at a time as the tuner does: none is lost
    (without the lock and the merge, 132 of 600 were)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(cache.parent), s, 150)) for s in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(tune._read_file(str(cache))) == 300


def test_clear_cache_forgets_the_file_too(cache):
    tune._disk.update(GOOD)
    tune._save()
    tune.clear_cache()
    assert not cache.exists() and tune._disk == {}
    tune._disk["new"] = GOOD["eager"]
    tune._save()
    assert set(json.loads(cache.read_text())) == {"new"}
