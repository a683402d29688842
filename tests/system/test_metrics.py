"""Prometheus metrics: TF Serving's --monitoring_config_file, exact counts from any frontend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT

PATH = "/monitoring/prometheus/metrics"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_scrape_after_known_traffic_shows_the_exact_counts_from_any_frontend(start_broker: Any, test_models: Path,
                                                                               tmp_path: Path) -> None:
    config = tmp_path / "monitoring.config"
    config.write_text("prometheus_config { enable: true }\n")
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}",
                           f"--monitoring_config_file={config}"], frontends=2)
    broker.wait_available(["linear"])
    before = samples(broker.http.get(PATH).text)
    for _ in range(7):
        assert broker.predict("linear", {"instances": [2.0]}).status_code == 200
    for _ in range(3):
        assert broker.predict("linear", {"instances": ["a"]}).status_code == 400
    for _ in range(2):
        assert broker.http.get("/v1/models/linear").status_code == 200
    scrapes = []
    for _ in range(6):  # new connections: the kernel spreads them over both frontends
        response = httpx.get(f"{broker.base_url}{PATH}", timeout=10, headers={"connection": "close"})
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        scrapes.append(samples(response.text))

    def delta(found: dict[Any, float], name: str, **labels: str) -> float:
        return value(found, name, **labels) - value(before, name, **labels)

    for found in scrapes:
        assert delta(found, "tfbroker_requests_total", model="linear", api="predict", status="200") == 7
        assert delta(found, "tfbroker_requests_total", model="linear", api="predict", status="400") == 3
        assert delta(found, "tfbroker_requests_total", model="linear", api="status", status="200") == 2
        assert delta(found, ":tensorflow:serving:request_count", model_name="linear", status="OK") == 7
        assert delta(found, ":tensorflow:serving:request_count", model_name="linear", status="INVALID_ARGUMENT") == 3
        assert delta(found, ":tensorflow:serving:request_latency_count", model_name="linear", API="predict",
                     entrypoint="REST") == 10
        # the broker's side: the 7 good requests were admitted and batched (the 3 bad ones refused)
        assert delta(found, "tfbroker_broker_events_total", event="requests") == 7
        batches = value(found, "tfbroker_batches_total", model="linear", version="2")
        assert batches >= 1
        assert value(found, "tfbroker_batch_size_count", model="linear", version="2") == batches
        assert value(found, ":tensorflow:serving:batching_session:queuing_latency_count",
                     thread_pool_name="batching", model="linear", version="2") == value(
                         found, "tfbroker_batch_size_sum", model="linear", version="2")  # one wait per request row
        assert value(found, ":tensorflow:cc:saved_model:load_attempt_count", model_path="linear/2",
                     status="success") == 1
        assert value(found, ":tensorflow:cc:saved_model:load_latency", model_path="linear/2") > 0
        assert value(found, "tfbroker_version_available", model="linear", version="2") == 1
        for role, count in (("broker", 1), ("worker", 1), ("frontend", 3)):  # gunicorn's master and 2 frontends
            assert value(found, "tfbroker_processes", role=role) == count
            assert value(found, "tfbroker_process_resident_memory_bytes", role=role) > 0


def test_a_monitoring_config_that_does_not_parse_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "monitoring.config"
    config.write_text("prometheus_config { enable: maybe }\n")
    result = subprocess.run([sys.executable, "-m", "broker", f"--runtime_dir={tmp_path}", "--model_name=m",
                             "--model_base_path=/nowhere", f"--monitoring_config_file={config}"],
                            cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == 2, result.stderr.decode()[-500:]
    assert "monitoring.config" in result.stderr.decode()
