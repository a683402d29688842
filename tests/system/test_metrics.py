"""Prometheus metrics: TF Serving's --monitoring_config_file, exact counts from any frontend."""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tfbroker.wire.figures import STAGES
from tests.conftest import ROOT, debian_binary, free_port, wait_for

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
    # The frontends write their stage counts within FLUSH_S (0.1 s) of counting them.
    wait_for(lambda: value(samples(broker.http.get(PATH).text), "tfbroker_frontend_stage_seconds_count", model="linear",
                           stage="format") == 7, 10, "the frontends' stage counts")
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
        # The frontends' own stages of the 7 answered predictions (the 3 refused ones never ran).
        for stage in ("parse", "format"):
            assert delta(found, "tfbroker_frontend_stage_seconds_count", model="linear", stage=stage) == 7
            assert delta(found, "tfbroker_frontend_stage_seconds_sum", model="linear", stage=stage) > 0
        # TF Serving's batching series: one input per request (7, one row each), one run and one
        # processed size per batch (no allowed_batch_sizes: no padding), and every batch's exit:
        # requests sent one at a time leave at once to the idle worker.
        tfs = ":tensorflow:serving:batching_session:"
        assert value(found, tfs + "input_batch_size_count", model="linear", version="2") == 7
        assert value(found, tfs + "input_batch_size_bucket", model="linear", version="2", le="1.0") == 7
        assert value(found, tfs + "wrapped_run_count", model="linear", version="2") == batches
        assert value(found, tfs + "processed_batch_size_count", model="linear", version="2") == batches
        assert value(found, tfs + "padding_size_sum", execution_batch_size="1", model="linear", version="2") == 0
        assert value(found, "tfbroker_batch_exits_total", model="linear", version="2", reason="idle") == batches
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


def test_a_real_prometheus_scrapes_the_frontends_and_counts_what_was_sent(start_broker: Any, test_models: Path,
                                                                           tmp_path: Path) -> None:
    """Prometheus from Debian, with ops/prometheus/prometheus.yml (its target this broker's
    REST port, scraped every second), returns the request count the test sent; promtool
    accepts the page."""
    prometheus = debian_binary("prometheus", "prometheus")
    promtool = debian_binary("promtool", "prometheus")
    config = tmp_path / "monitoring.config"
    config.write_text('prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }\n')
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}",
                           f"--monitoring_config_file={config}"], frontends=2)
    broker.wait_available(["linear"])
    scrape = (ROOT / "ops" / "prometheus" / "prometheus.yml").read_text()
    assert '"localhost:8501"' in scrape and "scrape_interval: 15s" in scrape
    (tmp_path / "prometheus.yml").write_text(scrape.replace('"localhost:8501"', f'"127.0.0.1:{broker.port}"')
                                             .replace("scrape_interval: 15s", "scrape_interval: 1s"))
    port = free_port()
    server = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(11):
            assert broker.predict("linear", {"instances": [2.0]}).status_code == 200
        query = 'sum(tfbroker_requests_total{job="tfbroker",model="linear",api="predict",status="200"})'

        def counted() -> float | None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return None
            result = answer.get("data", {}).get("result", [])
            return float(result[0]["value"][1]) if result and float(result[0]["value"][1]) == 11 else None

        assert wait_for(counted, 60, "Prometheus to scrape the 11 requests") == 11
    finally:
        server.terminate()
        server.wait(timeout=30)
    page = broker.http.get(PATH).text
    check = subprocess.run([promtool, "check", "metrics"], input=page.encode(), capture_output=True, timeout=60)
    # It parses (exit 1 would say not); its lint (exit 3) may only object to the colons of TF
    # Serving's own names, which dashboards made for TF Serving query as they are.
    complaints = [line for line in (check.stdout + check.stderr).decode().splitlines() if line.strip()]
    assert check.returncode in (0, 3), complaints
    assert all(re.fullmatch(r":tensorflow:[\w:]+ metric names should not contain ':'", line) for line in complaints), \
        complaints
    assert len(complaints) == 10, complaints  # the ten of TF Serving's names that this traffic shows


def test_stage_latencies_hold_the_model_time_and_the_queue_wait(start_broker: Any, test_models: Path,
                                                                  tmp_path: Path) -> None:
    """The slow model runs about 0.3 s a call: its batches' model stage holds that time, the
    input, output and transport stages the rest; a request queued behind another waits about
    as long."""
    config = tmp_path / "monitoring.config"
    config.write_text("prometheus_config { enable: true }\n")
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 1 }\nbatch_timeout_micros { value: 0 }\n")
    broker = start_broker(["--model_name=slow", f"--model_base_path={test_models / 'slow'}",
                           f"--monitoring_config_file={config}", "--enable_batching",
                           f"--batching_parameters_file={batching}", "--batches_in_flight=1"], frontends=1)
    broker.wait_available(["slow"])
    client_s = 0.0
    for _ in range(3):
        started = time.monotonic()
        assert broker.predict("slow", {"instances": [1.0]}).status_code == 200
        client_s += time.monotonic() - started
    found = samples(broker.http.get(PATH).text)
    labels = {"model": "slow", "version": "1"}
    stage = "tfbroker_stage_latency_seconds"
    assert [value(found, f"{stage}_count", **labels, stage=s) for s in STAGES] == [3] * 4
    model_us = value(found, f"{stage}_sum", **labels, stage="model") * 1e6
    total_us = sum(value(found, f"{stage}_sum", **labels, stage=s) for s in STAGES) * 1e6
    assert 0.5 * client_s * 1e6 < model_us <= total_us < client_s * 1e6, (model_us, total_us, client_s)
    assert value(found, ":tensorflow:serving:runtime_latency_sum", model_name="slow", version="1", API="batch",
                 runtime="TF1") == pytest.approx(model_us)
    # Two at once, one batch in flight: the second waits in the queue while the first runs.
    queue = ":tensorflow:serving:batching_session:queuing_latency_sum"
    waited_before = value(found, queue, thread_pool_name="batching", **labels)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{broker.base_url}/v1/models/slow:predict",
                                                     json={"instances": [1.0]}, timeout=30).status_code, range(2)))
    assert answers == [200, 200]
    found = samples(broker.http.get(PATH).text)
    waited_us = value(found, queue, thread_pool_name="batching", **labels) - waited_before
    one_call_us = model_us / 3
    assert waited_us > 0.5 * one_call_us, (waited_us, one_call_us)
    # Batches of one row close as their request arrives: the wait was for the worker, not to fill.
    assert value(found, "tfbroker_batch_fill_seconds_sum", **labels) * 1e6 < 0.1 * waited_us


def test_batch_exits_count_what_was_forced(start_broker: Any, test_models: Path, tmp_path: Path) -> None:
    """The slow model (about 0.3 s a call), one batch in flight, batches of up to 2 rows that
    may wait no time (batch_timeout_micros 0): a request alone leaves on its timeout, one
    queued behind it too once a two-row request cannot join it, and that request fills a
    batch of its own (full). (idle: the first test, one request at a time.)"""
    config = tmp_path / "monitoring.config"
    config.write_text("prometheus_config { enable: true }\n")
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 2 }\nbatch_timeout_micros { value: 0 }\n")
    broker = start_broker(["--model_name=slow", f"--model_base_path={test_models / 'slow'}",
                           f"--monitoring_config_file={config}", f"--batching_parameters_file={batching}",
                           "--batches_in_flight=1"], frontends=1)
    broker.wait_available(["slow"])

    def gauge(name: str) -> float:
        return value(samples(broker.http.get(PATH).text), name, model="slow", version="1")

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        def post(rows: int) -> int:
            return httpx.post(f"{broker.base_url}/v1/models/slow:predict", json={"instances": [1.0] * rows},
                              timeout=30).status_code

        first = pool.submit(post, 1)
        wait_for(lambda: gauge("tfbroker_in_flight_requests") == 1, 10, "the first request to run")
        second = pool.submit(post, 1)  # queued behind it, alone in an open batch
        wait_for(lambda: gauge("tfbroker_queued_requests") == 1, 10, "the second request to queue")
        third = pool.submit(post, 2)  # does not fit beside it: closes it, and is full itself
        wait_for(lambda: gauge("tfbroker_queued_requests") == 2, 10, "the third request to queue")
        assert [f.result() for f in (first, second, third)] == [200, 200, 200]
    found = samples(broker.http.get(PATH).text)
    exits = {reason: value(found, "tfbroker_batch_exits_total", model="slow", version="1", reason=reason)
             for reason in ("idle", "timeout", "full")}
    assert exits == {"idle": 0, "timeout": 2, "full": 1}, exits


def test_tf_examples_per_classify_and_regress_request_are_counted_as_tf_serving_counts_them(
        start_broker: Any, test_models: Path, tmp_path: Path) -> None:
    config = tmp_path / "monitoring.config"
    config.write_text("prometheus_config { enable: true }\n")
    broker = start_broker(["--model_name=half_plus_two", f"--model_base_path={test_models / 'half_plus_two'}",
                           f"--monitoring_config_file={config}"], frontends=1)
    broker.wait_available(["half_plus_two"])
    classify = {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}, {"x": 3.0}]}
    regress = {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}
    assert broker.http.post("/v1/models/half_plus_two:classify", json=classify).status_code == 200
    assert broker.http.post("/v1/models/half_plus_two:regress", json=regress).status_code == 200
    assert broker.predict("half_plus_two", {"instances": [1.0]}).status_code == 200  # no Examples: not counted
    found = samples(broker.http.get(PATH).text)
    name = ":tensorflow:serving:request_example_counts"
    assert value(found, name + "_count", model="half_plus_two") == 2
    assert value(found, name + "_sum", model="half_plus_two") == 5
    assert value(found, name + "_bucket", model="half_plus_two", le="2.0") == 1
    assert value(found, ":tensorflow:serving:request_example_count_total", model="half_plus_two") == 5
