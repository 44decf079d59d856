"""The `triton` backend: fused C-LoRA kernels (docs/design.md section 4). Kernels in kernels.py,
launchers and strategies in launch.py, strategy/tile selection in tune.py."""
from __future__ import annotations

import torch

from .. import KernelBackend, register

_MAX_ELEMS = 2 ** 31 - 1


class TritonBackend(KernelBackend):
    name = "triton"

    def _probe(self):
        try:
            import triton
            from . import kernels  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            return False, f"triton is not importable ({type(exc).__name__}: {exc})"
        from .launch import interpreting
        if interpreting():
            return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU interpreter, for tests)"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is available (TRITON_INTERPRET=1 runs the kernels on CPU for tests)"
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"

    def device_reasons(self, x, weight, auto):
        from .launch import interpreting
        reasons = []
        if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting() and not auto):
            reasons.append(f"tensors are on {x.device}, the triton backend needs a CUDA device"
                           + (" (the CPU interpreter runs only when asked for by name)" if interpreting() else ""))
        if x.device.type == "cpu" and interpreting() and x.dtype == torch.bfloat16:
            # (its output was ~1e10 where the values are ~1: a silent garbage result, not an error)
            reasons.append("bfloat16 under TRITON_INTERPRET=1: the interpreter's bf16 tl.dot is wrong (measured with "
                           "triton 3.8 and 3.9); run float32 or float16 there, or bfloat16 on a GPU")
        rows = x.numel() // max(1, x.shape[-1])
        if max(x.numel(), weight.numel(), rows * max(weight.shape)) > _MAX_ELEMS:
            reasons.append("an operand holds 2**31 elements or more (the kernels use int32 offsets)")
        return reasons

    def forward(self, x, weight, bias, lora_a, lora_b, r_old, r_delta, proj, scaling, need_t=True, auto=False,
                r_eff=None):     # r_eff unused: the kernels build R_eff from r_old, r_delta and proj
        from .launch import run
        from .tune import plan_for
        if bias is not None and bias.stride(0) != 1:   # the kernels read bias[n] at offset n
            bias = bias.contiguous()
        args = (x, weight, lora_a.t(), lora_b.t(), r_old, r_delta, proj, bias, scaling, False)
        return run(plan_for("fwd", auto, *args, need_t=need_t), *args, need_t=need_t)

    def dx(self, g, weight, lora_a, lora_b, r_old, r_delta, proj, scaling, auto=False, r_eff=None):
        from .launch import run
        from .tune import plan_for
        args = (g, weight.t(), lora_b, lora_a, r_old, r_delta, proj, None, scaling, True)
        return run(plan_for("dx", auto, *args), *args)


register(TritonBackend())
