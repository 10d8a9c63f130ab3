import pytest

from bertexport.building.checkpoint import resolve_checkpoint
from bertexport.core.errors import UserError
from bertexport.core.families import task_from_architectures


@pytest.mark.parametrize("arch,task", [
    ("BertModel", "feature-extraction"),
    ("RobertaForSequenceClassification", "text-classification"),
    ("DebertaV2ForTokenClassification", "token-classification"),
    ("DistilBertForQuestionAnswering", "question-answering"),
    ("AlbertForMaskedLM", "fill-mask"),
    ("ElectraForPreTraining", "fill-mask"),
])
def test_task_from_architectures(arch, task):
    assert task_from_architectures([arch]) == task


def test_resolve_detects_family_task_and_hash(tiny):
    a = resolve_checkpoint(str(tiny("roberta", "text-classification")))
    assert a.family == "roberta" and a.task == "text-classification" and a.safetensors
    assert a.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    b = resolve_checkpoint(str(tiny("roberta", "text-classification")), "feature-extraction")
    assert b.task == "feature-extraction" and b.sha256 == a.sha256 and b.id2label is None


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not a local folder"):
        resolve_checkpoint("some-org/some-model")
