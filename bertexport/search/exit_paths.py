"""Timing an early-exit artifact's exit paths (``search.early_exit_candidate``): rows that
leave after the first exit, the second, ..., or take no exit each cost a different path
through the segments. Each path is timed as its own call in one interleaved run, and each
round's figure is the paths' times weighted by the share of rows taking each path
(``mix_rounds``): that round's mean row cost, on the same scale as a single model's time.
The search's quick timing (``time_paths``), its side-by-side timing with the best build and
``optimize``'s final interleaved timing (``path_calls`` / ``fold_paths``) all time an
early-exit build this way."""

from __future__ import annotations

from bertexport.judging.latency import QUICK_RUNS, QUICK_WARMUP


def run_path(runner, feeds: dict, path: int) -> None:
    """What the runtime does for rows that leave at exit ``path`` (``len(exit_layers)``: no exit):
    the segments up to it, each exit's confidence read on the way (``EarlyExitRunner.infer``)."""
    from bertexport.shipping.runtime import _softmax_max

    mask = feeds["attention_mask"]
    out = runner.segments[0].infer(feeds)
    for k in range(path):
        _softmax_max(out["exit_logits"])
        out = runner.segments[k + 1].infer({"hidden_states_in": out["hidden_states"], "attention_mask": mask})
    if path < len(runner.exit_layers):
        _softmax_max(out["exit_logits"])


def path_feeds(runner, feeds: dict) -> dict:
    return {k: feeds[k] for k in runner.input_names}


def path_name(name: str, path: int) -> str:
    return f"{name}@exit-path-{path}"


def path_calls(calls: dict, arts: dict, mix: dict[str, list[float]], feeds: dict) -> dict:
    """``calls`` with each early-exit artifact's call replaced by one call per exit path."""
    out = dict(calls)
    for name, shares in mix.items():
        if name not in out:
            continue
        del out[name]
        runner = arts[name].runner
        f = path_feeds(runner, feeds)
        for p in range(len(shares)):
            out[path_name(name, p)] = lambda r=runner, f=f, p=p: run_path(r, f, p)
    return out


def mix_rounds(paths: list, shares: list[float]):
    """One ``Latency`` from the exit paths' (timed in the same rounds): each round, the paths'
    times weighted by their share of rows — that round's mean row cost."""
    from bertexport.judging.latency import Latency

    rounds = min(len(p.values) for p in paths)
    return Latency.from_values([sum(s * p.values[r] for s, p in zip(shares, paths)) for r in range(rounds)])


def fold_paths(timed: dict, mix: dict[str, list[float]]) -> dict:
    """``time_interleaved``'s result with each early-exit artifact's paths folded back into one entry."""
    out = dict(timed)
    for name, shares in mix.items():
        keys = [path_name(name, p) for p in range(len(shares))]
        if all(k in out for k in keys):
            out[name] = mix_rounds([out.pop(k) for k in keys], shares)
    return out


def time_paths(runner, feeds: dict, runs: int = QUICK_RUNS, warmup: int = QUICK_WARMUP) -> list:
    """Each exit path on ``feeds``, interleaved: a ``Latency`` per path (the last: no exit)."""
    from bertexport.judging.latency import time_interleaved

    f = path_feeds(runner, feeds)
    calls = {p: (lambda p=p: run_path(runner, f, p)) for p in range(len(runner.exit_layers) + 1)}
    timed = time_interleaved(calls, runs=runs, warmup=warmup)
    return [timed[p] for p in range(len(calls))]
