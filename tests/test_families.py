"""The family records are the one place of model structure: every record's config keys,
attention projection names and width-pruning modules are checked against a real (tiny,
random-init) transformers model of that family, built here from its config alone."""

from __future__ import annotations

import re

import pytest

from bertexport.core.errors import UserError
from bertexport.core.families import FAMILIES, get_family, layer_count

SIZES = {"layers": 2, "hidden": 32, "heads": 2, "ffn": 37}
EXTRA = {  # sizes a family ties to the hidden size (kept small and consistent)
    "mobilebert": {"embedding_size": 32, "intra_bottleneck_size": 32, "true_hidden_size": 32},
    "albert": {"embedding_size": 16},
}


def _config(model_type: str):
    from transformers import AutoConfig

    fam = get_family(model_type)
    keys = {fam.layers_key[0]: SIZES["layers"], fam.hidden_key[0]: SIZES["hidden"], fam.heads_key[0]: SIZES["heads"],
            fam.ffn_key[0]: SIZES["ffn"]}
    return AutoConfig.for_model(model_type, **keys, **EXTRA.get(model_type, {}))


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_records_structure_is_the_models(model_type):
    import torch
    from transformers import AutoModel

    from bertexport.students import losses, shapes

    fam = FAMILIES[model_type]
    config = _config(model_type)
    assert set(fam.shape_keys) <= set(config.to_dict())  # the keys as config.json spells them
    assert layer_count(config) == SIZES["layers"]
    assert shapes.teacher_shape(config) == shapes.StudentShape(*SIZES.values())
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    if fam.layers_module is not None:  # where the layers are: one module each
        layers, _ = shapes._layers(model)
        assert isinstance(layers, torch.nn.ModuleList) and len(layers) == SIZES["layers"]
    projections, _ = losses.qkv_modules(model, SIZES["layers"] - 1)
    assert len(projections) == 3 and all(isinstance(m, torch.nn.Linear) for m in projections)
    if fam.width is not None:  # every module width pruning slices is a Linear of each layer
        layers, _ = shapes._layers(model)
        for path in (*fam.width.qkv, fam.width.attn_out, fam.width.ffn_in, fam.width.ffn_out):
            assert isinstance(layers[0].get_submodule(path), torch.nn.Linear), path
        assert layers[0].get_submodule(fam.width.ffn_in).out_features == SIZES["ffn"]


def test_features_read_their_limits_from_the_records():
    from bertexport.building.passes import first_token_skip as fts
    from bertexport.students import shapes

    assert set(fts.FAMILIES) == {n for n, f in FAMILIES.items() if fts.NAME not in f.limits}
    assert set(shapes.WIDTH_FAMILIES) == {n for n, f in FAMILIES.items() if f.width is not None}
    for name in fts.FAMILIES:  # the rewrite finds the last layer where the record says
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_config(_config(name))
        assert fts.layers_of(model) is shapes._layers(model)[0] and len(fts.layers_of(model)) == SIZES["layers"]
    for name, fam in FAMILIES.items():
        if fts.NAME in fam.limits:
            with pytest.raises(UserError, match=re.escape(f"does not support {name} ({fam.limits[fts.NAME]})")):
                fts.check_supported(name, fts.TASK)
        else:
            fts.check_supported(name, fts.TASK)


def test_an_artifact_reports_its_shape_by_its_familys_keys():
    from bertexport.building.report import model_shape

    for name in FAMILIES:
        assert model_shape(_config(name).to_dict()) == "L2-H32-A2-F37", name
