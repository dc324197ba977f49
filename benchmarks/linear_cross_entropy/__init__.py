"""The loss benchmark's harness: `inputs` (shapes and input regimes), `harness` (the methods compared and how they
are measured) and `torch_anchors` (the PyTorch implementations run on the same tensors)."""
