"""Test set-up. TRITON_INTERPRET must be set before triton is first imported, and only when no
GPU is present (docs/design.md section 6), so it is decided here, before any test module loads."""
import os
import random

import pytest


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def seed():
    """A fresh seed per test (CLORA_TEST_SEED=N reproduces one); printed so a failure shows it. Every
    test gets it, asked for or not: a test drawing from torch's generator without it drew what the tests
    before it left, which no seed reproduces."""
    import torch
    s = int(os.environ.get("CLORA_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(s)
    print(f"seed={s} (rerun with CLORA_TEST_SEED={s})")
    return s


def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("CLORA_TEST_SHARD")   # "i/n": keep every n-th test from i (parallel GPU runs)
    if shard:
        i, n = (int(v) for v in shard.split("/"))
        items[:] = [it for k, it in enumerate(items) if k % n == i]
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker 'gpu'); none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
