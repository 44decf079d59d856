"""Graph export of C-LoRA models (ONNX): the forward op as plain tensor ops.

`torch.onnx.export(model, (x,), path)` (the torch.export-based exporter, torch's default) traces
`clora::linear_fwd` as one opaque op, which ONNX has no function for. The decomposition below,
registered in torch's decomposition table when `clora_kernels` is imported, writes the op as the
reference formula (`backends.torch_ref.reference_formula`: MatMul / Add in ONNX), which the
exporter applies before translating. It describes the forward value only: torch applies
decompositions below autograd, so the gradient semantics (the stop-gradient on the old route)
stay with the op's registered autograd, and the formula runs with one route R_eff = R_old + P·R_delta
(the same value, one MatMul chain fewer in the exported graph).

The TorchScript-based exporter (`dynamo=False`) traces the backend's torch ops directly; it only
needed the layer's state_dict to leave out the task state (`CLoRALinear._save_to_state_dict`).

An exported graph holds the adapter as it was at export (unmerged: the C-LoRA branch; merged:
one MatMul per layer, `clora_kernels.merge(model)` first).
"""
from __future__ import annotations

import torch
from torch._decomp import register_decomposition

from .backends import ops as _ops  # noqa: F401  (registers torch.ops.clora.*)
from .backends.torch_ref import reference_formula


@register_decomposition(torch.ops.clora.linear_fwd.default)
def _linear_fwd_decomposition(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling,
                              grad_through_old_route, need_t, backend):
    y = reference_formula(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, True)
    t = x @ lora_a.t() if need_t else x.new_empty(x.shape[0], 0)
    return y, t
