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


# ---- cases a review of the timm integration found (each fails without its fix) -----------------------
def test_all_linear_skips_a_distilled_models_two_heads():
    """timm's distilled models (DeiT, LeViT, EfficientFormer, PiT) answer get_classifier() with a tuple
    (head, head_dist): the tuple was dropped, so head_dist was adapted."""
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              num_classes=5)
    ck.inject_clora(model, "all-linear", rank=2)
    adapted = {n for n, _ in ck.nn.clora_layers(model)}
    assert adapted and not adapted & {"head", "head_dist"}


def test_all_linear_leaves_out_layers_narrower_than_the_rank_and_says_so():
    """SwinV2's relative-position MLP starts with a 2 -> 512 layer: 'all-linear' at rank 4 refused the whole
    model. It leaves those layers out with a warning; a name that asks for one still gets the error."""
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64, depths=(1, 1, 1, 1),
                              num_classes=5)
    with pytest.warns(UserWarning, match=r"'all-linear' leaves out \d+ layer\(s\) narrower than rank=4 .*cpb_mlp\.0"):
        ck.inject_clora(model, "all-linear", rank=4)
    adapted = {n for n, _ in ck.nn.clora_layers(model)}
    assert "layers.0.blocks.0.attn.qkv" in adapted and not any(n.endswith("cpb_mlp.0") for n in adapted)
    with pytest.raises(ValueError, match=r"layer 'layers.0.blocks.0.attn.cpb_mlp.0': rank must be"):
        ck.inject_clora(timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64,
                                          depths=(1, 1, 1, 1)), ["cpb_mlp.0"], rank=4)
    # the default targets match Swin-V2-CR's 2 -> 384 `meta_mlp.fc1` by its name: they refused the model (a
    # helper's sweep of timm); they leave it out as "all-linear" does, and a caller's own list still refuses
    def cr():
        return timm.create_model("swinv2_cr_tiny_ns_224", pretrained=False, img_size=64, depths=(1, 1, 1, 1),
                                 num_classes=5)
    with pytest.warns(UserWarning, match=r"the default targets leave out \d+ layer\(s\) narrower .*meta_mlp\.fc1"):
        model = ck.inject_clora(cr(), rank=4)
    adapted = {n for n, _ in ck.nn.clora_layers(model)}
    assert any(n.endswith("attn.qkv") for n in adapted) and not any("meta_mlp.fc1" in n for n in adapted)
    with pytest.raises(ValueError, match=r"meta_mlp.fc1': rank must be"):
        ck.inject_clora(cr(), ["qkv", "proj", "fc1", "fc2"], rank=4)


def test_beit_qkv_adapter_runs(seed):
    """BEiT / EVA / SwinV2 attention with q/v biases computed F.linear(x, self.qkv.weight, bias) without
    calling its qkv module: the adapter there never ran and its lora_B got no gradient."""
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    ck.inject_clora(model, ["qkv"], rank=2)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5, rtol=1e-5)
    model(x).square().sum().backward()
    layer = model.blocks[0].attn.qkv
    assert float(layer.lora_B.grad.abs().sum()) > 0
    from clora_kernels.baselines import inject_per_task_lora
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             embed_dim=32, num_heads=2, num_classes=5).eval()
    inject_per_task_lora(beit, ["qkv"], rank=2)        # a baseline's layer has no weight: it must be called
    with torch.no_grad():
        assert beit(x).shape == (2, 5)


def test_cli_targets_take_all_linear_and_a_regex():
    from clora_kernels import _cli
    assert _cli.target_modules(["all-linear"]) == "all-linear"
    assert _cli.target_modules([r"blocks\.0\..*"]) == r"blocks\.0\..*"
    assert _cli.target_modules(["qkv", "proj"]) == ["qkv", "proj"] and _cli.target_modules(["qkv"]) == ["qkv"]
    assert _cli.target_modules(None) is None


def test_default_targets_leave_the_head_alone_and_say_what_they_miss():
    """A helper's timm sweep: the default targets adapted MetaFormer's classifier (its head is an MLP named
    fc1 / fc2; the classifier's weight then never trained), adapted 2 of EVA-02's 7 linear layers per block
    without a word (its q_proj / k_proj / v_proj / fc1_g / fc1_x share no default name), and 'all-linear' on a
    model whose only linear layers are its head said nothing of the head."""
    import warnings
    from clora_kernels.nn import clora_layers
    caformer = timm.create_model("caformer_s18", num_classes=10, pretrained=False)
    ck.inject_clora(caformer, rank=4)
    assert not [n for n, _ in clora_layers(caformer) if n.startswith("head")] and clora_layers(caformer)
    eva = timm.create_model("eva02_base_patch14_224", img_size=28, depth=1, embed_dim=64, num_heads=2,
                            pretrained=False)
    with pytest.warns(UserWarning, match=r"default targets \['qkv', 'fc1'\] match no layer.*5 of its linear layers "
                                         r"are left without an adapter: \['blocks.0.attn.q_proj'"):
        ck.inject_clora(eva, rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.inject_clora(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, pretrained=False), rank=4)
    # every default name matches somewhere, and attention layers named otherwise stayed plain without a word
    # (CaiT's class attention q / k / v, SigLIP's attention pool; a second timm sweep)
    cait = timm.create_model("cait_xxs24_224", img_size=32, depth=1, depth_token_only=1, pretrained=False)
    with pytest.warns(UserWarning, match=r"default targets \(timm's ViT names .*\) leave 5 linear layer\(s\) of "
                                         r"attention blocks without an adapter: \['blocks.0.attn.proj_l', "
                                         r"'blocks.0.attn.proj_w', 'blocks_token_only.0.attn.q'"):
        ck.inject_clora(cait, rank=4)
    # and the layers in those lists are those that advice can adapt: SwinV2's 2 -> 512 cpb_mlp.0 is narrower
    # than rank 16, so naming it was refused and 'all-linear' left it out (a third timm sweep)
    swin = timm.create_model("swinv2_tiny_window8_256", img_size=64, depths=(1, 1, 1, 1), window_size=2,
                             pretrained=False)
    with pytest.warns(UserWarning, match=r"leave 1 linear layer\(s\) of attention blocks without an adapter: "
                                         r"\['layers.3.blocks.0.attn.cpb_mlp.2'\]"):
        ck.inject_clora(swin)
    with pytest.raises(ValueError, match=r"the output head is left out: \['head.classifier.0', 'head.classifier.4'\]"):
        ck.inject_clora(timm.create_model("efficientvit_b0", num_classes=10, pretrained=False), "all-linear")


def test_all_linear_skips_every_classifier_timm_lists():
    """VOLO's get_classifier() names `head` alone, and 'all-linear' adapted its `aux_head` (a num_classes-wide
    output, frozen under a rank-4 adapter: half the classifier could not train); timm's pretrained_cfg lists
    both (a helper's sweep of timm)."""
    model = timm.create_model("volo_d1_224", pretrained=False, num_classes=5, img_size=64)
    assert model.pretrained_cfg["classifier"] == ("head", "aux_head")
    ck.inject_clora(model, "all-linear", rank=2)
    assert type(model.aux_head) is torch.nn.Linear and type(model.head) is torch.nn.Linear
    assert ck.nn.clora_layers(model)
