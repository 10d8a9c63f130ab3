"""Registered optimization passes (see ``bertexport.building.passes.base``)."""

from bertexport.building.passes.base import CATALOG, Capability, ModelFile, Pass, PassContext, config_dict, get_pass

__all__ = ["CATALOG", "Capability", "ModelFile", "Pass", "PassContext", "config_dict", "get_pass"]
