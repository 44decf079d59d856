"""The `cuda` backend: wrappers over torch.ops.clora.* from the csrc/ extension (DESIGN.md
section 5). The extension is not written yet, so this backend reports itself unusable."""
from __future__ import annotations

from . import register


class CudaBackend:
    name = "cuda"

    def availability(self):
        return False, "the CUDA C++ extension (csrc/) is not implemented yet"

    def not_supported_reasons(self, x, weight, rank, auto=False):
        return []

    def forward(self, *args, auto=False):
        raise NotImplementedError(self.availability()[1])

    dx = forward


register(CudaBackend())
