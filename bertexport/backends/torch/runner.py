"""Runs the transformers model in eval mode under ``torch.inference_mode``."""

from __future__ import annotations


from bertexport.backends.base import Runner


class TorchRunner(Runner):
    name = "pytorch"

    def __init__(self, model, input_names: list[str], output_names: list[str], threads: int | None = None):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.threads = threads

    def activate_impl(self):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.input_meta = {n: ("int64", 2) for n in self.input_names}  # transformers encoders take int64 ids
        self.model.eval()

    def set_threads(self, threads: int):
        """Intra-op threads from now on (torch's setting is process-wide and can change
        between calls: convert validates on every core, then times at the user's count)."""
        import torch

        self.threads = threads
        torch.set_num_threads(threads)

    def infer_impl(self, feeds):
        import torch

        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return {n: out[n].float().numpy() if out[n].dtype != torch.float32 else out[n].numpy() for n in self.output_names}

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())
