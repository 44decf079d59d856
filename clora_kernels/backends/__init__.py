"""Backend registry: one dispatch for every C-LoRA op (DESIGN.md section 3).

A backend object provides
    name                                  "torch", "triton", "cuda"
    availability() -> (bool, str)         can it run at all on this machine, and why (not)
    not_supported_reasons(x, weight, rank, auto) -> list[str]   why it cannot run this call
    forward(x, w, b, lora_a, lora_b, r_old, r_delta, proj, scaling, need_t, auto) -> (y, t)
                                          (t may be None when not need_t)
    dx(g, w, lora_a, lora_b, r_old, r_delta, proj, scaling, auto) -> (dx, v)
where x / g are 2-D and ``auto`` says the backend was picked by "auto" (it may then consider
library fallbacks such as cuBLAS). Resolution: an explicit name must be usable or raises one
error that says why; "auto" reads env CLORA_BACKEND, else tries backends in preference order,
and a backend that fails to compile or launch under "auto" is warned about once and skipped
from then on.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
_AUTO_ORDER = ("triton", "cuda", "torch")
_registry: dict = {}
_broken: dict = {}  # name -> reason, backends that failed under "auto"


class KernelBackend:
    """What the kernel backends (triton, cuda) share: availability probed once per process
    (the registry asks on every call) and the dtype / rank limits of their kernels.
    Subclasses define name, _probe() -> (bool, str) and device_reasons(x, weight, auto) -> list."""
    name = ""
    DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    MAX_RANK = 128
    _availability = None
    _probe_lock = threading.Lock()

    def availability(self):
        with self._probe_lock:
            if self._availability is None:
                self._availability = self._probe()
            return self._availability

    def not_supported_reasons(self, x, weight, rank, auto=False):
        reasons = list(self.device_reasons(x, weight, auto))
        if x.dtype not in self.DTYPES:
            reasons.append(f"dtype {x.dtype} is not supported (float16, bfloat16, float32)")
        if rank > self.MAX_RANK:
            reasons.append(f"rank {rank} > {self.MAX_RANK}")
        return reasons


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run a call; the message says why."""


def register(backend) -> None:
    _registry[backend.name] = backend


def _load_all() -> None:
    if len(_registry) == 3:
        return
    from . import torch_ref, triton, cuda  # noqa: F401  (each registers itself)


def available_backends() -> dict:
    """name -> (usable, why) for every backend on this machine."""
    _load_all()
    out = {}
    for name in ("torch", "triton", "cuda"):
        ok, why = _registry[name].availability()
        if ok and name in _broken:
            ok, why = False, f"failed under auto: {_broken[name]}"
        out[name] = (ok, why)
    return out


def requested_backend(name: str) -> str:
    if name == "auto":
        name = os.environ.get("CLORA_BACKEND", "auto") or "auto"
        if name not in BACKEND_NAMES:
            raise ValueError(f"environment variable CLORA_BACKEND must be one of {list(BACKEND_NAMES)}, got {name!r}")
    return name


def _reasons(backend, x: torch.Tensor, weight: torch.Tensor, rank: int, auto: bool) -> list:
    ok, why = backend.availability()
    return [why] if not ok else list(backend.not_supported_reasons(x, weight, rank, auto))


def call(name: str, method: str, x: torch.Tensor, weight: torch.Tensor, rank: int, *args):
    """Run ``backend.<method>(*args, auto=...)`` on the backend that ``name`` resolves to."""
    _load_all()
    name = requested_backend(name)
    if name != "auto":
        backend = _registry[name]
        reasons = _reasons(backend, x, weight, rank, False)
        if reasons:
            raise BackendUnavailableError(f"backend {name!r} cannot run this call: " + "; ".join(reasons))
        return getattr(backend, method)(*args, auto=False)
    for cand in _AUTO_ORDER:
        backend = _registry[cand]
        if cand in _broken or _reasons(backend, x, weight, rank, True):
            continue
        if cand == "torch":
            return getattr(backend, method)(*args, auto=True)
        try:
            return getattr(backend, method)(*args, auto=True)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a compile or launch failure: warn once, never use it again
            cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            _broken[cand] = cause
            warnings.warn(f"clora_kernels: backend {cand!r} failed ({cause}); falling back for the rest of "
                          f"this process", RuntimeWarning, stacklevel=2)
    raise AssertionError("unreachable: the torch backend runs everywhere")
