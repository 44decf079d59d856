"""torch.compile(fullgraph=True) of a C-LoRA ViT: the registered ops trace with no graph break."""
import pytest
import torch

import clora_kernels as ck
from helpers import rel_err

timm = pytest.importorskip("timm")


def test_compile_vit_fullgraph(seed):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5)
    ck.inject_clora(model, rank=4, backend="torch")
    for _, m in ck.nn.clora_layers(model):
        with torch.no_grad():
            m.lora_B.normal_(std=0.02)
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert rel_err(out, eager) < 1e-5
    out.sum().backward()
    grads = [m.routing_delta.grad for _, m in ck.nn.clora_layers(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_compile_inductor_single_layer(seed):
    layer = ck.CLoRALinear(24, 40, rank=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 24)
    y = torch.compile(layer, fullgraph=True)(x)
    assert rel_err(y, layer(x)) < 1e-5
