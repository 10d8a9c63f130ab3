"""Post-training pruning's mask tuning (``students.pruning``, step 4 of Kwon et al. 2022):
layer by layer, each kept head's and FFN neuron's contribution rescaled by a least-squares
fit of the teacher's pre-LayerNorm sublayer output from the pruned model's own inputs
(real tokens, a ridge towards 1, scales bounded), folded into the output projections so the
result stays a plain checkpoint; and the per-sublayer errors that fit is judged by."""

from __future__ import annotations

from bertexport.students.shapes import _layers, _width, head_size, teacher_shape


# ------------------------------------------------------------------ layer-wise least-squares tuning

class _Stop(Exception):
    pass


def _sublayers(layer):
    """The two LayerNorms of a post-LN layer, in order: after attention, after the FFN
    (BERT's attention.output.LayerNorm / output.LayerNorm, DistilBERT's sa_layer_norm /
    output_layer_norm): their input is residual + sublayer output."""
    import torch

    norms = [m for m in layer.modules() if isinstance(m, torch.nn.LayerNorm)]
    if len(norms) != 2:
        raise RuntimeError(f"expected 2 LayerNorms in a {type(layer).__name__}, found {len(norms)}")
    return norms


class _Taps:
    """Forward pre-hooks that keep the first input of named modules for one forward pass;
    the pass stops (not run further) once ``stop`` has been reached."""

    def __init__(self, model, modules: dict, stop):
        self.model, self.modules, self.stop = model, modules, stop
        self.store: dict = {}
        self.handles: list = []

    def __enter__(self) -> "_Taps":
        def tap(name, stop):
            def hook(module, args):
                self.store[name] = args[0].detach()
                if stop:
                    raise _Stop
            return hook

        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(tap(name, module is self.stop)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    def run(self, inputs: dict) -> dict:
        import torch

        self.store = {}
        with torch.no_grad():
            try:
                self.model(**inputs)
            except _Stop:
                pass
        return self.store


def _real(x, mask):
    """(batch, seq, d) -> (real tokens, d) in float64."""
    import torch

    return x[mask.bool()].to(dtype=torch.float64)


def tune_masks(student, teacher, batches, hidden: list[int], ridges=(1e-6, 1e-4, 1e-2, 1.0), bound: float = 10.0,
               first_token_last: bool = True) -> list[dict]:
    """Rescale, in place, every kept head's and FFN neuron's contribution in ``student``
    (sliced from ``teacher``, keeping hidden dimensions ``hidden``) so that each
    sublayer's pre-LayerNorm output reconstructs the teacher's, layer by layer in order
    (least squares on ``batches``' real tokens; later layers see the tuned earlier ones).
    As in the paper's code the last FFN fits the first token only when
    ``first_token_last`` (what a classifier's pooler reads) and scales stay within
    [-bound, bound]; where the paper's code then stops tuning, here the ridge towards the
    untuned scales (``ridges`` x the mean diagonal of the normal matrix) grows until the
    solution is within bounds (none: that sublayer is left untuned, the next ones still
    fit). Returns per sublayer the squared reconstruction error before and after."""
    import torch

    width = _width(student)
    s_layers, _ = _layers(student)
    t_layers, _ = _layers(teacher)
    hs = head_size(teacher_shape(teacher.config))
    keep_hidden = torch.tensor(hidden)
    report = []
    for i, (s_layer, t_layer) in enumerate(zip(s_layers, t_layers, strict=True)):
        s_norms, t_norms = _sublayers(s_layer), _sublayers(t_layer)
        for part, out_name in (("attention", width.attn_out), ("ffn", width.ffn_out)):
            k = 0 if part == "attention" else 1
            first_only = first_token_last and part == "ffn" and i == len(s_layers) - 1
            proj = s_layer.get_submodule(out_name)
            w = proj.weight.detach().to(torch.float64)  # (hidden', inner)
            units = w.shape[1] // hs if part == "attention" else w.shape[1]
            gram = torch.zeros(units, units, dtype=torch.float64)
            rhs = torch.zeros(units, dtype=torch.float64)
            yy = 0.0
            wtw = w.T @ w if part == "ffn" else None
            with _Taps(teacher, {"target": t_norms[k]}, t_norms[k]) as t_taps, \
                    _Taps(student, {"x": proj, "sum": s_norms[k]}, s_norms[k]) as s_taps:
                for b in batches:
                    mask = b["inputs"]["attention_mask"]
                    if first_only:
                        mask = torch.zeros_like(mask)
                        mask[:, 0] = 1
                    t_out, s_out = t_taps.run(b["inputs"]), s_taps.run(b["inputs"])
                    target = _real(t_out["target"], mask).index_select(1, keep_hidden)
                    x, total = _real(s_out["x"], mask), _real(s_out["sum"], mask)
                    if part == "attention":
                        contrib = torch.einsum("tah,dah->tad", x.unflatten(1, (units, hs)), w.unflatten(1, (units, hs)))
                        y = target - total + contrib.sum(1)
                        gram += torch.einsum("tad,tbd->ab", contrib, contrib)
                        rhs += torch.einsum("tad,td->a", contrib, y)
                    else:
                        y = target - total + x @ w.T
                        gram += (x.T @ x) * wtw
                        rhs += (x * (y @ w)).sum(0)
                    yy += float((y * y).sum())
            ones = torch.ones(units, dtype=torch.float64)

            def error(m):
                return float(m @ gram @ m - 2 * rhs @ m + yy)

            before = error(ones)
            scale, after, used = ones, before, None
            exact = before <= 1e-10 * max(yy, 1e-30)  # nothing removed upstream: nothing to fit
            for r in (() if exact else ridges):  # the smallest ridge (towards the untuned scales) whose fit is within bounds
                lam = r * float(torch.diagonal(gram).mean()) + 1e-30
                a = gram + lam * torch.eye(units, dtype=torch.float64)
                m = torch.linalg.lstsq(a, (rhs + lam)[:, None]).solution[:, 0]
                if bool(torch.isfinite(m).all()) and float(m.abs().max()) <= bound:
                    if error(m) < before:
                        scale, after, used = m, error(m), r
                    break
            tuned = used is not None
            cols = scale.repeat_interleave(hs) if part == "attention" else scale
            with torch.no_grad():
                proj.weight.mul_(cols.to(proj.weight.dtype)[None, :])
            report.append({"layer": i, "sublayer": part, "tuned": tuned, "ridge": used, "error_before": before,
                           "error_after": after, "scale_min": float(scale.min()), "scale_max": float(scale.max())})
    return report


def sublayer_errors(student, teacher, batches, hidden: list[int]) -> dict[str, float]:
    """Squared error of every sublayer's pre-LayerNorm output (what ``tune_masks`` fits:
    residual + sublayer) of ``student`` against ``teacher``'s, kept hidden dimensions, real
    tokens, summed over ``batches``; keyed ``"<layer>.attention"`` / ``"<layer>.ffn"``."""
    import torch

    keep = torch.tensor(hidden)
    taps = {}
    for tag, model in (("s", student), ("t", teacher)):
        layers, _ = _layers(model)
        for i, layer in enumerate(layers):
            for part, norm in zip(("attention", "ffn"), _sublayers(layer)):
                taps[(tag, f"{i}.{part}")] = norm
    errors: dict[str, float] = {}
    with _Taps(student, {k: m for k, m in taps.items() if k[0] == "s"}, None) as s_taps, \
            _Taps(teacher, {k: m for k, m in taps.items() if k[0] == "t"}, None) as t_taps:
        for b in batches:
            mask = b["inputs"]["attention_mask"]
            s_out, t_out = s_taps.run(b["inputs"]), t_taps.run(b["inputs"])
            for (tag, key), s_val in s_out.items():
                d = _real(s_val, mask) - _real(t_out[("t", key)], mask).index_select(1, keep)
                errors[key] = errors.get(key, 0.0) + float((d * d).sum())
    return errors
