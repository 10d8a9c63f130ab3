"""ort-transformers-optimize: fuses the encoder's subgraphs using the family record's config
keys (heads, hidden size), without changing outputs beyond float noise."""

from __future__ import annotations

import pytest

from bertexport.building.convert import convert


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_fusions_keep_parity(tiny, tmp_path, family):
    m = convert(str(tiny(family)), "ort-fused", tmp_path / family, latency_runs=0).manifest
    fused = m["target"]["passes"][0]["notes"]["fused_operators"]
    assert fused and ("LayerNormalization" in fused or "SkipLayerNormalization" in fused or "Attention" in fused)
    assert m["status"] == "passed" and all(c["cosine_min"] > 0.9999 for c in m["parity"]["checks"].values())
