import numpy as np
import pytest

from bertexport.core.tasks import mean_pool
from bertexport.judging.compare import Comparison, judge, judge_checks, min_cosine, task_metrics
from bertexport.judging.gates import Gates


def test_mean_pool_ignores_padding():
    h = np.array([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    mask = np.array([[1, 1, 0]])
    assert mean_pool(h, mask).tolist() == [[2.0, 0.0]]


def test_padding_positions_do_not_count():
    rng = np.random.default_rng(0)
    ref = {"last_hidden_state": rng.normal(size=(2, 4, 8))}
    out = {"last_hidden_state": ref["last_hidden_state"].copy()}
    out["last_hidden_state"][:, 3] += 50.0  # garbage only where mask is 0
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]])
    c = Comparison("feature-extraction")
    c.add(ref, out, mask)
    s = c.summary()
    assert s["max_abs_diff"] == 0.0 and s["cosine_min"] == pytest.approx(1.0)


def test_classification_agreement_and_failure_messages():
    ref = {"logits": np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])}
    out = {"logits": np.array([[2.0, 1.0], [0.0, 3.0], [0.5, 1.0]])}  # last decision flipped
    c = Comparison("text-classification")
    c.add(ref, out, np.ones((3, 4), dtype=np.int64))
    s = c.summary()
    assert s["agreement"] == pytest.approx(2 / 3)
    fails = judge_checks({"x": s}, Gates(min_cosine=0.99, min_agreement=0.9))
    assert any("x: agreement" in f for f in fails) and any("x: cosine_min" in f for f in fails)
    assert judge_checks({"x": s}, Gates(min_cosine=0.5, min_agreement=0.5)) == []


def test_question_answering_decisions_only_over_real_tokens():
    mask = np.array([[1, 1, 0]])
    ref = {"start_logits": np.array([[0.0, 1.0, 9.0]]), "end_logits": np.array([[1.0, 0.0, 9.0]])}
    out = {"start_logits": np.array([[0.0, 1.0, -9.0]]), "end_logits": np.array([[1.0, 0.0, -9.0]])}
    c = Comparison("question-answering")
    c.add(ref, out, mask)
    assert c.summary()["agreement"] == 1.0
    assert min_cosine(ref, out, "question-answering", mask) == pytest.approx(1.0)


def test_nan_output_fails():
    ref = {"logits": np.array([[1.0, 2.0]])}
    out = {"logits": np.array([[np.nan, 2.0]])}
    c = Comparison("text-classification")
    c.add(ref, out, np.ones((1, 2), dtype=np.int64))
    assert judge(c.summary(), Gates(min_cosine=1e-9))


def test_task_metrics_with_labels_and_the_one_gate_vocabulary():
    ref = {"logits": np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])}
    out = {"logits": np.array([[2.0, 1.0], [0.0, 3.0], [0.5, 1.0], [0.2, 0.1]])}
    c = Comparison("text-classification")
    c.add(ref, out, np.ones((4, 3), dtype=np.int64))
    m = task_metrics(c, np.array([0, 1, 0, 1]))  # reference right 3/4, candidate 2/4
    assert m["metric_reference"] == 75.0 and m["metric_candidate"] == 50.0 and m["metric_drop"] == 25.0
    assert judge(m, Gates(max_accuracy_drop=1.0)) == ["accuracy drop 25.00 points > 1.0"]
    assert judge(m, Gates(max_accuracy_drop=30.0, min_agreement=0.75)) == []


def test_a_lost_rare_class_passes_the_accuracy_gate_and_fails_the_macro_f1_gate():
    from bertexport.judging.gates import judge as judge_gates

    # 200 rows: 190 of a common class, 10 of a rare one; the reference gets every row right, the
    # candidate calls 4 of the rare rows common: 2 points of accuracy, ~14 of macro-F1
    labels = np.array([0] * 190 + [1] * 10)
    ref = np.where(labels[:, None] == np.arange(2), 2.0, 0.0)
    cand = ref.copy()
    cand[190:194] = [2.0, 0.0]
    c = Comparison("text-classification")
    c.add({"logits": ref}, {"logits": cand}, np.ones((200, 3), dtype=np.int64))
    m = task_metrics(c, labels)
    f1_rare = 2 * 6 / (2 * 6 + 4)  # tp 6, fn 4; the common class: tp 190, fp 4
    want = 100 * (1.0 - (f1_rare + 2 * 190 / (2 * 190 + 4)) / 2)
    assert m["metric_drop"] == pytest.approx(2.0) and m["macro_f1_drop"] == pytest.approx(want)
    iv = m["stats"]["macro_f1_drop"]
    assert iv["estimate"] == pytest.approx(want) and iv["low"] > 0 and iv["high"] > want and iv["discordant"] == 4
    d = judge_gates(m, Gates(max_accuracy_drop=3.0, max_macro_f1_drop=5.0))
    by_gate = {v.gate: v for v in d.verdicts}
    assert by_gate["max_accuracy_drop"].status != "failed" and by_gate["max_macro_f1_drop"].status == "failed"
    assert by_gate["max_macro_f1_drop"].message.startswith(f"macro-F1 drop {want:.2f} points [")
    assert d.status == "failed"
    # with a confidence level, an interval straddling the threshold is undecided
    d = judge_gates(m, Gates(max_macro_f1_drop=want, confidence=0.95))
    assert d.status == "undecided"


def test_embeddings_agreement_is_top_k_retrieval_agreement():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(12, 3, 16))
    mask = np.ones((12, 3), dtype=np.int64)
    same = Comparison("feature-extraction")
    same.add({"last_hidden_state": h}, {"last_hidden_state": h + 1e-6}, mask)
    assert task_metrics(same, None)["retrieval_agreement"] == pytest.approx(1.0)
    shuffled = Comparison("feature-extraction")
    shuffled.add({"last_hidden_state": h}, {"last_hidden_state": rng.normal(size=h.shape)}, mask)
    m = task_metrics(shuffled, None)
    assert m["agreement"] < 0.8 and judge(m, Gates(min_agreement=0.95))


def test_macro_f1_alongside_accuracy():
    from bertexport.judging.compare import macro_f1

    assert macro_f1(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])) == 1.0
    assert macro_f1(np.array([0, 0, 0, 0]), np.array([0, 0, 1, 1])) == pytest.approx((2 / 3 + 0) / 2)


@pytest.mark.parametrize("task", ["feature-extraction", "text-classification", "token-classification",
                                  "question-answering", "fill-mask"])
def test_every_task_has_a_gateable_metric(task):
    """What optimize/validate gate on, for every task record: agreement (decisions; top-5
    retrieval for embeddings) and cosine — and a perturbation that flips decisions fails it."""
    from bertexport.core.tasks import TASKS

    rng = np.random.default_rng(1)
    shapes = {"last_hidden_state": (8, 6, 16), "logits": (8, 6, 5) if TASKS[task].per_token else (8, 3),
              "start_logits": (8, 6), "end_logits": (8, 6)}
    ref = {name: rng.normal(size=shapes[name]) for name in TASKS[task].outputs}
    mask = np.ones((8, 6), dtype=np.int64)
    same = Comparison(task)
    same.add(ref, {k: v + 1e-7 for k, v in ref.items()}, mask)
    m = task_metrics(same, None)
    assert m["agreement"] == pytest.approx(1.0) and m["cosine_min"] > 0.9999
    assert judge(m, Gates(min_agreement=0.99, min_cosine=0.999)) == []
    other = Comparison(task)
    other.add(ref, {k: rng.normal(size=v.shape) for k, v in ref.items()}, mask)
    assert judge(task_metrics(other, None), Gates(min_agreement=0.99)), task


def _near_duplicate_corpus(seed=0, clusters=80, size=3, dim=64, spread=0.02):
    """Short-message-like embeddings: topics, clusters inside them, and near-duplicates
    (similarity ~0.999) inside each cluster, so the exact top-5 is decided by ties."""
    rng = np.random.default_rng(seed)
    topic = rng.normal(size=(8, dim))
    centres = topic[rng.integers(0, 8, clusters)] + rng.normal(size=(clusters, dim)) * 0.6
    return np.concatenate([c + rng.normal(size=(size, dim)) * spread * np.linalg.norm(c) / np.sqrt(dim) for c in centres])


def _perturbed(v, eps, seed=1):
    rng = np.random.default_rng(seed)
    return v + rng.normal(size=v.shape) * eps * np.linalg.norm(v, axis=1, keepdims=True) / np.sqrt(v.shape[1])


def test_retrieval_gate_measures_retrieval_not_ties():
    from bertexport.judging.compare import Comparison, decide, retrieval_agreement

    ref = _near_duplicate_corpus()
    close, damaged = _perturbed(ref, 0.045), _perturbed(ref, 0.2)
    cos = lambda a, b: (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # noqa: E731
    assert cos(ref, close).min() > 0.998 and cos(ref, damaged).min() < 0.98
    # plain top-5 overlap fails the artifact that keeps every embedding at cosine > 0.998 ...
    assert retrieval_agreement(list(ref), list(close), tolerance=0.0) < 0.95
    # ... the tie-robust measure does not, and still fails the damaged one
    gates = Gates(min_agreement=0.98)
    for cand, ok in ((close, True), (damaged, False)):
        comp = Comparison("feature-extraction")
        comp.vec_reference, comp.vec_candidate = list(ref), list(cand)
        comp.cosines, comp.samples = list(cos(ref, cand)), len(ref)
        m = task_metrics(comp, None)
        assert (m["retrieval_agreement"] >= 0.98) is ok
        assert (decide(m, gates).status == "passed") is ok
        assert m["stats"]["retrieval_agreement"]["rows"] == len(ref)


def test_labelled_embeddings_gate_on_retrieval_precision():
    from bertexport.judging.compare import Comparison

    ref = _near_duplicate_corpus()
    labels = np.repeat(np.arange(80) % 8, 3)
    comp = Comparison("feature-extraction")
    comp.vec_reference, comp.vec_candidate, comp.samples = list(ref), list(_perturbed(ref, 0.5)), len(ref)
    m = task_metrics(comp, labels)
    assert m["metric_name"] == "retrieval precision@5" and m["metric_drop"] > 0
    assert m["stats"]["metric_drop"]["low"] <= m["metric_drop"] <= m["stats"]["metric_drop"]["high"]


def test_confidence_gate_pass_fail_undecided_on_constructed_outcomes():
    from bertexport.judging.compare import Comparison, decide

    def metrics(ref_right, cand_right):
        comp = Comparison("text-classification")
        labels = np.zeros(len(ref_right), int)
        pr, pc = np.where(ref_right, 0, 1), np.where(cand_right, 0, 1)
        comp.pred_reference, comp.pred_candidate = [pr], [pc]
        comp.pred_rows, comp.decided, comp.agree = [np.arange(len(pr))], len(pr), int((pr == pc).sum())
        comp.samples = len(pr)
        return task_metrics(comp, labels)

    n = 1000
    same = metrics(np.ones(n, bool), np.ones(n, bool))  # drop 0 [-0.38, 0.38]
    worse = metrics(np.ones(n, bool), np.r_[np.zeros(60, bool), np.ones(n - 60, bool)])  # drop 6 [4.6, 7.7]
    close = metrics(np.ones(n, bool), np.r_[np.zeros(8, bool), np.ones(n - 8, bool)])  # drop 0.8 [0.4, 1.6]
    g = Gates(max_accuracy_drop=1.0, confidence=0.95)
    assert decide(same, g).status == "passed"
    assert decide(worse, g).status == "failed"
    d = decide(close, g)
    assert d.status == "undecided" and "rows would decide it" in d.undecided[0]
    # without --confidence the point estimate decides, and the report says it was within noise
    d = decide(close, Gates(max_accuracy_drop=1.0))
    assert d.status == "passed" and d.within_noise and "within noise" in d.within_noise[0]
