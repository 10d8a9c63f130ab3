"""Registered optimization passes (see ``bertexport.passes.base``)."""

from bertexport.passes.base import CATALOG, Capability, ModelFile, Pass, PassContext, config_dict, get_pass

__all__ = ["CATALOG", "Capability", "ModelFile", "Pass", "PassContext", "config_dict", "get_pass"]
