"""`clora-bench`: GPU/CPU throughput of the C-LoRA linear against merged cuBLAS, eager,
torch.compile and PEFT (docs/design.md section 7). Entry point: `main` in __main__.py."""
