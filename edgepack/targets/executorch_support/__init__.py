"""ExecuTorch target internals: the PyTorch program (quantized, exported, lowered) and its runs in ExecuTorch."""
