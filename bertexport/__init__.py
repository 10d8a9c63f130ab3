"""bertexport: compile BERT-family checkpoints into fast, verified deployment artifacts.

Every command is a library function first; the CLI (``bertexport.cli``) only parses
arguments and prints. Heavy dependencies (torch, transformers, backends) are imported
lazily inside the functions that need them, so ``import bertexport`` stays cheap and
the device runtime can run without torch.
"""

__version__ = "0.1.0"
