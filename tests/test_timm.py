"""C-LoRA injected into timm ViTs (pretrained=False: nothing is downloaded)."""
import pytest
import torch

import clora_kernels as ck

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_224"])
def test_vit_inject_forward_backward(seed, name):
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
    ck.inject_clora(model, rank=4)
    layers = ck.nn.clora_layers(model)
    depth = len(model.blocks)
    assert len(layers) == 4 * depth   # qkv, attn.proj, mlp.fc1, mlp.fc2 per block; patch_embed.proj is a Conv2d
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5, rtol=1e-5)
    for _, m in layers:                 # as after a first step: lora_B non-zero so every grad flows
        with torch.no_grad():
            m.lora_B.normal_(std=0.02)
    out = model(x)
    (out.square().mean() + 0.1 * ck.orthogonality_loss(model)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {f"{n}.{p}" for n, _ in layers for p in ("lora_A", "lora_B", "routing_delta")}
    assert with_grad == expected
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if n in expected)
