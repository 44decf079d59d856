"""Backend registry (DESIGN: docs/design.md, "Backends"). Which backend and plan runs a call is
decided in one place, `backends/auto.py`.

A backend object provides
    name                                  "torch", "triton", "cuda"
    auto_devices                          device types auto may give it (torch: every device, it is
                                          auto's last resort)
    availability() -> (bool, str)         can it run at all on this machine, and why (not)
    not_supported_reasons(x, weight, rank, auto) -> list[str]   why it cannot run this call
    forward(x, w, b, lora_a, lora_b, r_old, r_delta, proj, scaling, need_t, auto, r_eff) -> (y, t)
                                          (t may be None when not need_t)
    dx(g, w, lora_a, lora_b, r_old, r_delta, proj, scaling, auto, r_eff) -> (dx, v)
where x / g are 2-D and ``auto`` says the backend was picked by "auto" (it may then choose among
its plans, e.g. a per-call merged weight, or library fallbacks such as cuBLAS). r_eff (default
None) is R_eff where the caller has it: the eager autograd path computes it once per step for the
torch backend, whose ops read it; the kernel backends build it from r_old, r_delta and proj.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
_registry: dict = {}


class KernelBackend:
    """What the kernel backends (triton, cuda) share: availability probed once per process
    (the registry asks on every call) and the dtype / rank limits of their kernels.
    Subclasses define name, _probe() -> (bool, str) and device_reasons(x, weight, auto) -> list."""
    name = ""
    auto_devices = ("cuda",)
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


def device_type(t: torch.Tensor) -> str:
    """t.device.type, without building a device object for CPU and CUDA tensors: on the CPU machine
    t.device.type costs 0.42 µs, t.is_cpu 0.07 (four reads per call were a tenth of a small layer's
    Python cost)."""
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


# one C call answers "no autocast anywhere", the common case, without building x's device type
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocasting(x: torch.Tensor) -> bool:
    """Whether torch.autocast casts x's operands (it does on CUDA and CPU)."""
    if not _any_autocast():
        return False
    dev = device_type(x)
    return dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)


def exact_math(t: torch.Tensor):
    """A context in which t's device computes without torch.autocast: the lifecycle's math (merge,
    end_task's fold, the project policy's projection) writes state kept across steps, which a
    caller's autocast would round to 16 bits (a merge then unmerge moved an fp32 base weight by
    1.5e-2; a hard-mode end_task changed the output); the op's backward computes in the dtypes its
    forward saved (`ops._backward`)."""
    return torch.autocast(device_type(t), enabled=False) if _autocasting(t) else contextlib.nullcontext()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run a call; the message says why."""


def register(backend) -> None:
    _registry[backend.name] = backend


def _load_all() -> None:
    from . import torch_ref, triton, cuda  # noqa: F401  (each registers itself on its first import)


def get(name: str):
    """The registered backend object called `name` ("torch", "triton", "cuda")."""
    backend = _registry.get(name)
    if backend is None:
        _load_all()
        backend = _registry[name]
    return backend


def available_backends() -> dict:
    """name -> (usable, why) for every backend on this machine."""
    from .auto import broken
    out = {}
    for name in ("torch", "triton", "cuda"):
        ok, why = get(name).availability()
        if ok and name in broken:
            ok, why = False, f"failed under auto: {broken[name]}"
        out[name] = (ok, why)
    return out


# CPython's os.environ keeps its raw mapping in `_data` (keys through `encodekey`): a dict lookup there
# costs 0.1 µs where os.environ.get runs three Python frames, 0.9 µs, 4 % of a small layer's call on
# the CPU machine. Elsewhere (no `_data`), os.environ.get.
_ENV_KEY = os.environ.encodekey("CLORA_BACKEND") if hasattr(os.environ, "encodekey") else None


def requested_backend(name: str) -> str:
    """`name`, or for "auto" the environment's CLORA_BACKEND (read on every call) when set."""
    if name == "auto":
        data = getattr(os.environ, "_data", None)
        if data is None or _ENV_KEY is None:
            env = os.environ.get("CLORA_BACKEND")
        else:
            env = data.get(_ENV_KEY)
            env = None if env is None else os.environ.decodevalue(env)
        name = env or "auto"
        if name not in BACKEND_NAMES:
            raise ValueError(f"environment variable CLORA_BACKEND must be one of {list(BACKEND_NAMES)}, got {name!r}")
    return name
