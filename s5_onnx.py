# README "ONNX export": with ck.onnx_export(): torch.onnx.export(model.eval(), (x,), "model.onnx")
import timm, torch, numpy as np, onnxruntime as ort, sys
import clora_kernels as ck
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8, depth=2)
ck.inject_clora(model, target_modules=["qkv", "proj", "fc1", "fc2"], rank=4)
for m in model.modules():
    if isinstance(m, ck.CLoRALinear): torch.nn.init.normal_(m.lora_B, std=0.1)
x = torch.randn(2, 3, 32, 32)
with torch.no_grad(): ref = model.eval()(x).numpy()
for dyn in [sys.argv[1] == "dynamo"]:
    p = f"/tmp/docs_check/out/model_{sys.argv[1]}.onnx"
    with ck.onnx_export():
        torch.onnx.export(model.eval(), (x,), p, dynamo=dyn)
    out = ort.InferenceSession(p).run(None, {ort.InferenceSession(p).get_inputs()[0].name: x.numpy()})[0]
    print(sys.argv[1], "max diff vs eager:", np.abs(out - ref).max())
