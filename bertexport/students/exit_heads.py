"""Early exit's heads (``students.early_exit``): the teacher's first-token hidden state at each
exit layer and its logits, cached in one forward pass; one head per exit (dense + tanh +
classifier, the pooler's shape, started from the teacher's own pooler/classifier when their
shapes fit) trained on them with the body frozen: KL to the teacher's softened
probabilities, plus cross-entropy when the data has labels."""

from __future__ import annotations

import numpy as np

from bertexport.students.exit_segments import torch_modules


def teacher_states(model, encode, texts: list[str], exit_layers: list[int], max_length: int, batch: int = 32):
    """Each exit layer's first-token hidden state and the teacher's logits, for every text
    (one forward pass of the teacher, batched by length)."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    cls_rows: list[list] = [[None] * len(texts) for _ in exit_layers]
    logits = [None] * len(texts)
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            feeds = encode([texts[i] for i in idx], length=max_length)
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, output_hidden_states=True)
            for j, layer in enumerate(exit_layers):
                first = out.hidden_states[layer][:, 0].float().numpy()
                for r, i in enumerate(idx):
                    cls_rows[j][i] = first[r]
            for r, i in enumerate(idx):
                logits[i] = out.logits[r].float().numpy()
    states = [np.stack(rows) for rows in cls_rows]
    return states, np.stack(logits)


def _initial_head(model, hidden: int, labels: int):
    """An exit head started from the teacher's own pooler dense + classifier when their shapes fit."""
    import torch

    ExitHead, *_ = torch_modules()
    head = ExitHead(hidden, labels)
    base = getattr(model, model.base_model_prefix)
    dense = next((m for m in (getattr(getattr(base, "pooler", None), "dense", None),
                              getattr(getattr(model, "classifier", None), "dense", None), getattr(model, "pre_classifier", None))
                  if isinstance(m, torch.nn.Linear) and tuple(m.weight.shape) == (hidden, hidden)), None)
    out = next((m for m in (getattr(model, "classifier", None), getattr(getattr(model, "classifier", None), "out_proj", None))
                if isinstance(m, torch.nn.Linear) and tuple(m.weight.shape) == (labels, hidden)), None)
    with torch.no_grad():
        if dense is not None:
            head.dense.load_state_dict(dense.state_dict())
        if out is not None:
            head.classifier.load_state_dict(out.state_dict())
    return head


def train_heads(model, states: list[np.ndarray], teacher_logits: np.ndarray, labels: np.ndarray | None,
                cfg) -> tuple[list, list[dict]]:
    """One head per exit on its cached states: KL to the teacher's softened probabilities
    (+ cross-entropy on labels), with ``cfg`` (``early_exit.EarlyExitConfig``)'s epochs, rate,
    temperature and seed. Returns the heads and, per exit, the training figures."""
    import torch
    import torch.nn.functional as F

    hidden, n_labels = states[0].shape[1], teacher_logits.shape[1]
    target = torch.from_numpy(teacher_logits)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    t = cfg.temperature
    heads, figures = [], []
    for j, x_np in enumerate(states):
        torch.manual_seed(cfg.seed + j)
        head = _initial_head(model, hidden, n_labels).train()
        x = torch.from_numpy(x_np)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.01)
        gen = torch.Generator().manual_seed(cfg.seed + j)
        loss_value = float("nan")
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
                s = head(x[idx])
                loss = F.kl_div(F.log_softmax(s / t, -1), F.softmax(target[idx] / t, -1), reduction="batchmean") * t * t
                if y is not None:
                    loss = loss + cfg.alpha_ce * F.cross_entropy(s, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_value = float(loss.detach())
        head.eval()
        with torch.no_grad():
            agree = float((head(x).argmax(-1) == target.argmax(-1)).float().mean())
        heads.append(head)
        figures.append({"train_rows": len(x), "last_loss": loss_value, "train_agreement": agree})
    return heads, figures
