"""The PyTorch original as a runner: the reference every artifact is compared with."""
