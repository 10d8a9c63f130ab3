"""`serve --ray`: the serve app as a Ray Serve deployment with 2 replicas, on a local Ray
instance on loopback (2 CPUs). Answers are compared with `run`'s vectors (the Predictor
`run` uses, within the artifact's batch tolerance); a replica is killed with `ray.kill`
while requests are in flight, and every request answered 200 must still be right."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.shipping.serve_app import batch_tolerance

pytest.importorskip("ray.serve", reason="serve --ray needs ray[serve] (extra `ray`)")
pytest.importorskip("uvicorn", reason="serve needs bertexport[serve]")

TEXTS = ["A gripping, beautifully shot film.", "ok", "The museum opened in 1897 and holds two thousand paintings.",
         "Maria Schmidt flew from Berlin to Lisbon on Tuesday.", "dull and far too long", "What a delight!"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, texts, timeout=60.0) -> tuple[int, dict | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/embeddings", body=json.dumps({"input": texts}), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        return r.status, (json.loads(body) if r.status == 200 else None)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def art(fp32_artifact):
    return fp32_artifact("bert", "feature-extraction").artifact


@pytest.fixture(scope="module")
def expected(art):
    """`run`'s vectors: the Predictor `bertexport run` uses, one text at a time."""
    from bertexport.shipping.runtime import Artifact, Predictor

    with Artifact(art) as a:
        pred = Predictor(a)
        return {t: np.asarray(pred.predict([t])[0]["embedding"]) for t in TEXTS}


def _check(answer: dict, texts, expected, tol) -> None:
    assert [row["index"] for row in answer["data"]] == list(range(len(texts)))
    for t, row in zip(texts, answer["data"]):
        np.testing.assert_allclose(row["embedding"], expected[t], rtol=0, atol=max(tol, 1e-6))


def _replica_pids() -> set[int]:
    """Ray Serve replica processes of this machine (their process title names the deployment)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ServeReplica:bertexport:BertexportServer" in cmd:
                pids.add(int(d.name))
    return pids


# ------------------------------------------------------------------ refusals (no Ray started)


def test_refusals_exit_2_before_ray_starts(art, tmp_path):
    run = CliRunner().invoke
    r = run(cli, ["serve", str(art), "--replicas", "2"])
    assert r.exit_code == 2 and "are for --ray" in r.output
    r = run(cli, ["serve", str(art), "--ray", "--port", "0"])
    assert r.exit_code == 2 and "fixed --port" in r.output
    r = run(cli, ["serve", str(art), "--ray", "--min-replicas", "3", "--max-replicas", "2", "--port", "1"])
    assert r.exit_code == 2 and "over --max-replicas" in r.output
    r = run(cli, ["serve", str(tmp_path / "missing"), "--ray", "--port", "1"])
    assert r.exit_code == 2 and "not found" in r.output
    r = run(cli, ["serve", str(art), "--ray", "--port", "1", "--stride", "100000"])
    assert r.exit_code == 2 and "stride must be in" in r.output
    import ray

    assert not ray.is_initialized()


def test_replica_options_are_what_ray_serve_accepts():
    """Fixed replicas and autoscaling bounds, checked by Ray Serve's own models (no Ray started)."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig

    from bertexport.shipping.ray_serve import ReplicaApp, RayServeOptions

    fixed = RayServeOptions(replicas=2).deployment_options(256)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed and fixed["max_ongoing_requests"] == 256
    scaled = RayServeOptions(replicas=2, min_replicas=1, max_replicas=4).deployment_options(64)
    assert "num_replicas" not in scaled
    cfg = AutoscalingConfig(**scaled["autoscaling_config"])
    assert (cfg.min_replicas, cfg.initial_replicas, cfg.max_replicas) == (1, 2, 4)
    assert RayServeOptions(replicas=9, max_replicas=3).bounds() == (1, 3, 3)
    for opts in (fixed, scaled):
        d = serve.deployment(**opts)(serve.ingress()(ReplicaApp))
        assert d.name == "BertexportServer" and d.ray_actor_options == {"num_cpus": 1.0}


# ------------------------------------------------------------------ the CLI process, its own local Ray


def test_cli_serves_on_ray_and_stops_on_sigterm(art, expected, tmp_path):
    """`bertexport serve ART --ray --replicas 2`: a real process starting its own local Ray;
    answers equal `run`'s; SIGTERM -> exit 143 with its replicas gone."""
    port, log = _free_port(), tmp_path / "serve.log"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bertexport", "serve", str(art), "--ray", "--replicas", "2",
                                 "--port", str(port), "--threads", "1"], stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + 180
        while "serving " not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert f"on http://127.0.0.1:{port} — Ray Serve, 2 replicas" in log.read_text()
        assert len(_replica_pids()) == 2
        status, answer = _post(port, TEXTS)
        assert status == 200, log.read_text()
        _check(answer, TEXTS, expected, batch_tolerance(json.loads((art / "manifest.json").read_text())))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert code == 143, log.read_text()
    assert "the Ray Serve application was deleted" in log.read_text()
    assert "Traceback" not in log.read_text()
    deadline = time.monotonic() + 30
    while _replica_pids() and time.monotonic() < deadline:  # the local Ray it started went with it
        time.sleep(0.2)
    assert not _replica_pids()


# ------------------------------------------------------------------ the library on the test's local Ray


@pytest.fixture(scope="module")
def local_ray():
    import ray

    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # conftest: loopback only
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield ray
    ray.shutdown()


def test_two_replicas_answer_as_run_and_a_killed_replica_loses_no_200(local_ray, art, expected):
    from ray import serve

    from bertexport.shipping.ray_serve import RayServeOptions, start

    ray = local_ray
    tol = batch_tolerance(json.loads((art / "manifest.json").read_text()))
    port = _free_port()
    server = start(art, port=port, ray_options=RayServeOptions(replicas=2), threads=1, model_name="emb")
    try:
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::")]
        assert len(replicas) == 2
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models")
        assert [m["id"] for m in json.loads(conn.getresponse().read())["data"]] == ["emb"]
        conn.close()

        # concurrent requests, each of one to three texts: answers equal run's, whatever their batch
        jobs = [TEXTS[i % len(TEXTS):i % len(TEXTS) + 1 + i % 3] for i in range(36)]
        with ThreadPoolExecutor(8) as pool:
            for texts, (status, answer) in zip(jobs, pool.map(lambda t: _post(port, t), jobs)):
                assert status == 200
                _check(answer, texts, expected, tol)

        # load from 6 clients; one replica killed while they run
        stop, lock = threading.Event(), threading.Lock()
        results = []  # (sent, answered, status, texts, answer)

        def client(k):
            i = k
            while not stop.is_set():
                texts = [TEXTS[i % len(TEXTS)], TEXTS[(i * 5 + 1) % len(TEXTS)]]
                sent = time.monotonic()
                try:
                    status, answer = _post(port, texts, timeout=30)
                except OSError as e:  # a dropped connection: a failed request, never a wrong answer
                    status, answer = f"{type(e).__name__}", None
                with lock:
                    results.append((sent, time.monotonic(), status, texts, answer))
                i += 6

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(r[2] == 200 for r in results) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = replicas[0]["name"]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace=replicas[0]["namespace"]), no_restart=True)
        # Serve replaces it: two running replicas again, one of them new
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_REPLICA::")}
            running = serve.status().applications["bertexport"].deployments["BertexportServer"].replica_states.get("RUNNING", 0)
            if victim not in names and len(names) == 2 and running == 2:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no replacement replica within 90 s: {names}")
        replaced_at = time.monotonic()
        time.sleep(2.0)  # load on the new replica too
        stop.set()
        for t in threads:
            t.join(timeout=60)

        ok = [r for r in results if r[2] == 200]
        failed = [r[2] for r in results if r[2] != 200]
        for _, _, _, texts, answer in ok:  # every request answered 200 is right
            _check(answer, texts, expected, tol)
        assert [r for r in results if r[0] < killed_at < r[1]]  # requests were in flight when it was killed
        assert sum(r[2] == 200 for r in results if r[0] > replaced_at) > 0  # and the service goes on
        assert all(s in (500, 502, 503) or isinstance(s, str) for s in failed), failed
        print(f"\nkilled {victim}, replaced after {replaced_at - killed_at:.1f} s: {len(ok)} answered 200 (all right), "
              f"{len(failed)} failed: {sorted(map(str, set(failed)))}")
    finally:
        server.stop()
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_")]
