"""examples/: a Flask and a FastAPI app of a user's own, each under gunicorn with 4 workers,
doing their own pre- and post-processing around tfbroker.client (issue 13)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from broker.supervisor import terminate
from examples.processing import input_width, postprocess, preprocess
from tfbroker import Client
from tests.conftest import ROOT, BrokerProcess, children_of, free_port, stop_and_check, wait_for

APPS = {"flask": ["examples.flask_app:app"],
        "fastapi": ["-k", "uvicorn_worker.UvicornWorker", "examples.fastapi_app:app"]}


@pytest.fixture(scope="module")
def broker(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """The demo (python -m broker with no model flags), as the examples' docs start it."""
    running = BrokerProcess(tmp_path_factory.mktemp("examples"), [f"--demo_models_dir={demo_models}"], frontends=1)
    try:
        running.wait_available(["half_plus_two", "mlp", "text"], timeout_s=180)
        yield running
    finally:
        stop_and_check(running)


@pytest.mark.parametrize("kind", sorted(APPS))
def test_every_web_worker_gets_the_shared_models_answers(kind: str, broker: BrokerProcess, tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    app = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "4", "-b", f"127.0.0.1:{port}", *APPS[kind]],
                           cwd=ROOT, env={**os.environ, "TFBROKER_ADDRESS": broker.address},  # the demo's mlp
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(children_of(app.pid)) == 4 and _answers(port), 60, f"the {kind} app")
        rng = np.random.default_rng(5)
        bodies = [{"features": {f"f{i}": float(rng.normal()) for i in rng.choice(16, 3, replace=False)}}
                  for _ in range(240)]
        with Client(broker.address) as client:  # the same steps, in this process
            width = input_width(client.metadata("mlp"))
            assert width == 16, "the demo's mlp"
            expected = [postprocess(client.predict("mlp", preprocess(b, width)).outputs, 1)["top"] for b in bodies]

        def call(body: dict[str, Any]) -> dict[str, Any]:
            # A connection per request, so that every web worker takes its share.
            response = httpx.post(f"http://127.0.0.1:{port}/score", json=body, timeout=30)
            assert response.status_code == 200, response.text
            return dict(response.json())

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, bodies))
        for answer, want in zip(answers, expected):
            assert answer["model_version"] == 1
            assert [t["class"] for t in answer["top"]] == [t["class"] for t in want]
            np.testing.assert_allclose([t["score"] for t in answer["top"]], [t["score"] for t in want], atol=2e-6)
        web_workers = set(children_of(app.pid))
        assert {a["web_worker"] for a in answers} == web_workers, "every web worker answered"
        # The model exists once: one worker process holds it, no web worker loaded TensorFlow.
        assert len(broker.pids_with("tfbroker: worker:mlp:")) == 1
        for pid in web_workers:
            assert "tensorflow" not in Path(f"/proc/{pid}/maps").read_text()
        bad = httpx.post(f"http://127.0.0.1:{port}/score", json={"features": {"f99": 1}}, timeout=10)
        assert bad.status_code == 400 and "unknown feature" in bad.text
    finally:
        terminate(app, grace_s=10)
        log.close()


def _answers(port: int) -> bool:
    try:
        return httpx.post(f"http://127.0.0.1:{port}/score", json={"features": {}}, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
