"""clora_kernels: fused kernels and a drop-in nn.Linear for C-LoRA (arXiv 2502.17920)."""
from .export import export_decompositions, onnx_export
from .backends import BackendUnavailableError, available_backends
from .functional import clora_linear
from .interop import load_peft_adapter, save_peft_adapter
from .nn import (CLoRALinear, disable_adapter, end_task, inject_clora, load_adapter, merge, merge_and_unload,
                 observe_task, orthogonality_loss, print_trainable_parameters, save_adapter, trainable_parameters,
                 unmerge)
from .protection import Freeze, Paper, Project, Protection

__all__ = ["CLoRALinear", "clora_linear", "inject_clora", "end_task", "observe_task", "orthogonality_loss", "merge",
           "unmerge", "save_adapter", "load_adapter", "available_backends", "BackendUnavailableError", "Protection",
           "Paper", "Freeze", "Project", "load_peft_adapter", "save_peft_adapter", "disable_adapter", "merge_and_unload",
           "trainable_parameters", "print_trainable_parameters", "onnx_export", "export_decompositions"]
__version__ = "0.1.0"
