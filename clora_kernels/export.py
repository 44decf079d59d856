"""Graph export of C-LoRA models (ONNX): the forward op as plain tensor ops.

`torch.onnx.export(model, (x,), path)` (the torch.export-based exporter, torch's default) traces
`clora::linear_fwd` as one opaque op, which ONNX has no function for. The decomposition below
writes the op as the eager backend's unmerged plan (`reference.lora_gemm`: MatMul / Gemm in ONNX); the
exporter applies what torch's global decomposition table holds, so `onnx_export()` puts it there
for the export and takes it out after:

    with clora_kernels.onnx_export():
        torch.onnx.export(model.eval(), (x,), "model.onnx")

It is not left in the table: with a decomposition there, inductor (torch.compile's default
backend) refuses to fall back to the op when the environment variable CI is set ("make_fallback
... a decomposition exists") and would otherwise be asked to inline the formula in place of the
kernels. It describes the forward value only: torch applies
decompositions below autograd, so the gradient semantics (the stop-gradient on the old route)
stay with the op's registered autograd, and the plan runs with one route R_eff = R_old + P·R_delta
(the same value, one MatMul chain fewer in the exported graph).

The TorchScript-based exporter (`dynamo=False`) traces the backend's torch ops directly; it only
needed the layer's state_dict to leave out the task state (`CLoRALinear._save_to_state_dict`).

An exported graph holds the adapter as it was at export (unmerged: the C-LoRA branch; merged:
one MatMul per layer, `clora_kernels.merge(model)` first).

`torch.export` keeps the op in its program, which then needs `import clora_kernels` wherever it is
loaded, and which AOTInductor's C++ runtime cannot run. `export_decompositions()` is
torch.export's own default table with the same decomposition added, for
`ExportedProgram.run_decompositions`: the program is then core ATen ops only.
"""
from __future__ import annotations

import contextlib

import torch
from torch._decomp import register_decomposition

from .backends import ops as _ops  # noqa: F401  (registers torch.ops.clora.*)
from .reference import lora_gemm, routing_eff


_DECOMPOSITIONS: dict = {}


@register_decomposition(torch.ops.clora.linear_fwd.default, registry=_DECOMPOSITIONS)
def _linear_fwd_decomposition(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling,
                              grad_through_old_route, need_t, backend):
    # the eager backend's unmerged plan: the scaling enters the last product as its alpha (as the formula's
    # `scaling * lora`, a float16 program overflowed to inf where a small scaling kept the layer finite)
    y, t = lora_gemm(x, weight, lora_a.t(), lora_b.t(), routing_eff(routing_old, routing_delta, projection), bias,
                     scaling)
    return y, (t if need_t else x.new_empty(x.shape[0], 0))


def export_decompositions():
    """torch.export's default decomposition table (`torch.export.default_decompositions()`, core ATen)
    with `clora::linear_fwd` written as plain tensor ops, for `ExportedProgram.run_decompositions`:

        ep = torch.export.export(model.eval(), (x,)).run_decompositions(ck.export_decompositions())

    leaves no C-LoRA op in the program, so it loads without `import clora_kernels` and AOTInductor
    (`torch._inductor.aoti_compile_and_package`) compiles it (ExecuTorch, which lowers core ATen, was
    not tried). A fresh table each call (add your own entries to it). The forward value only, with one
    route R_eff = R_old + P·R_delta: gradients through the decomposed program reach lora_A and lora_B
    through the old route too, so it is for serving, not for training (design.md section 2). Under
    protection="project", export after a forward or a save, not straight after an optimizer step (README,
    "Export"): the program takes the factors as they are, before the policy's projection."""
    default = getattr(torch.export, "default_decompositions", None)     # torch >= 2.6; before, a dict
    table = default() if default is not None else torch._decomp.core_aten_decompositions()
    for op, fn in _DECOMPOSITIONS.items():
        table[op] = fn
    return table


@contextlib.contextmanager
def onnx_export():
    """Within the block, torch's decomposition table writes clora::linear_fwd as plain tensor ops
    (for torch.onnx.export's default exporter); the table is as it was after."""
    table = torch._decomp.decomposition_table
    op = torch.ops.clora.linear_fwd.default
    before = table.get(op)
    table[op] = _DECOMPOSITIONS[op]
    try:
        yield
    finally:
        if before is None:
            table.pop(op, None)
        else:
            table[op] = before
