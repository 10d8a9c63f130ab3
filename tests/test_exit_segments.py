"""Early exit's segments (bertexport/students/exit_segments.py): the model cut after each exit
layer, in every family; their export and compilation are tested through the builds in
test_early_exit.py."""

import pytest


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "electra", "deberta-v2", "mpnet", "mobilebert"])
def test_segments_chain_to_the_model_in_every_family(tiny, family):
    """Torch only: the segments, run one after another, give the model's own hidden states and logits."""
    import torch
    import transformers as T

    from bertexport.core.families import get_family
    from bertexport.students.exit_heads import _initial_head
    from bertexport.students.exit_segments import model_input_names, segment_modules

    path = tiny(family, "text-classification")
    cfg = T.AutoConfig.from_pretrained(path)
    setattr(cfg, get_family(family).layers_key[0], 4)
    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    names = model_input_names(model, tok)
    enc = tok(["hello there my friend, how are you", "a b"], padding=True, return_tensors="pt", return_token_type_ids=True)
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.dim
    heads = [_initial_head(model, hidden, 3) for _ in range(2)]
    first, middle, last = segment_modules(model, get_family(family), [1, 3], heads, names)
    with torch.no_grad():
        ref = model(**{k: enc[k] for k in names}, output_hidden_states=True)
        h, _ = first(*[enc[k] for k in names])
        torch.testing.assert_close(h, ref.hidden_states[1], atol=1e-6, rtol=0)
        h, _ = middle(h, enc["attention_mask"])
        torch.testing.assert_close(h, ref.hidden_states[3], atol=1e-6, rtol=0)
        torch.testing.assert_close(last(h, enc["attention_mask"]), ref.logits, atol=1e-6, rtol=0)
