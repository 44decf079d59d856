"""clora_kernels: fused kernels and a drop-in nn.Linear for C-LoRA (arXiv 2502.17920)."""
from .backends import BackendUnavailableError, available_backends
from .functional import clora_linear
from .nn import (CLoRALinear, end_task, inject_clora, load_adapter, merge, observe_task, orthogonality_loss,
                 save_adapter, unmerge)
from .protection import Freeze, Paper, Project, Protection

__all__ = ["CLoRALinear", "clora_linear", "inject_clora", "end_task", "observe_task", "orthogonality_loss", "merge",
           "unmerge", "save_adapter", "load_adapter", "available_backends", "BackendUnavailableError", "Protection",
           "Paper", "Freeze", "Project"]
__version__ = "0.1.0"
