"""Prometheus metrics on the REST port (``--monitoring_config_file``), one view from any frontend.

Each frontend counts its requests in prometheus-client's multiprocess files
(PROMETHEUS_MULTIPROC_DIR, which the broker gives the frontends it starts), so whichever
frontend is scraped sums them all; the broker's counters, each version's batching figures
and the CPU and memory of every process role come from the broker (STATS) at scrape time.
TF Serving's series keep TF Serving's names (``:tensorflow:serving:request_count``,
``:tensorflow:serving:request_latency``, ``:tensorflow:serving:batching_session:queuing_latency``,
``:tensorflow:cc:saved_model:load_attempt_count``, ``…:load_latency``); ours start with
``tfbroker_``. docs/metrics.md lists them all.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from typing import Any, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from tfbroker.wire import protocol
from tfbroker.runtime.settings import METRICS_DIR_ENV, FrontendConfig
from tfbroker.wire.errors import GRPC_CODES
from tfbroker.wire.figures import QUEUE_LATENCY_BOUNDS_US, STAGE_BOUNDS_US

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# Request latency buckets in microseconds, as TF Serving's request_latency.
LATENCY_BOUNDS_US = (250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
                     2_500_000, 5_000_000, 10_000_000, 30_000_000)
SERVING_APIS = ("predict", "classify", "regress")  # what TF Serving's request_count counts
# The frontend's own stages of a call (pipeline.py): the request read and parsed, the answer
# formatted; their histogram's bounds in seconds (20 µs … about 1.3 s).
FRONTEND_STAGES = ("parse", "format")
FRONTEND_STAGE_BOUNDS_S = tuple(20e-6 * 2 ** i for i in range(17))
_STAGE_COUNTS = "tfbroker_frontend_stage_observations"  # shared counters the histogram is made from
_LOG_RECORDS = "tfbroker_request_log_records"  # shown as TF Serving's :tensorflow:serving:request_log_count
FLUSH_S = 0.1  # longest a busy frontend keeps its counts before writing them to the shared series
BATCH_SIZE_BOUNDS = tuple(2 ** i for i in range(13))  # 1 … 4096 rows
TFS_BATCH_BOUNDS = tuple(2 ** i for i in range(14))  # 1 … 8192: TF Serving's batching_util.h buckets
EXAMPLE_BOUNDS = tuple(2.0 ** i for i in range(15))  # 1 … 16384: TF Serving's request_example_counts buckets
TFS_BATCHING = ":tensorflow:serving:batching_session:"  # TF Serving's /tensorflow/serving/batching_session/


class Metrics:
    """The frontend's own series; ``render`` adds the broker's and TF Serving's names."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory = os.environ.get(METRICS_DIR_ENV, "")
        self.registry = CollectorRegistry() if self.directory else None
        kwargs: dict[str, Any] = {"registry": self.registry} if self.registry is not None else {}
        self.requests = Counter("tfbroker_requests", "REST requests by model, API and HTTP status.",
                                ["model", "api", "status"], **kwargs)
        self.latency = Histogram(":tensorflow:serving:request_latency",
                                 "Distribution of wall time (in microseconds) for REST requests.",
                                 ["model_name", "API", "entrypoint"], buckets=LATENCY_BOUNDS_US, **kwargs)
        # TF Serving's tf.Examples per classify and regress request (its util.cc).
        self.example_counts = Histogram(":tensorflow:serving:request_example_counts",
                                        "The number of tensorflow.Examples per request.", ["model"],
                                        buckets=EXAMPLE_BOUNDS, **kwargs)
        self.example_total = Counter(":tensorflow:serving:request_example_count",  # written with _total
                                     "The total number of tensorflow.Examples.", ["model"], **kwargs)
        # Requests counted here first and written to prometheus-client's (shared, mmap'd)
        # series at most every FLUSH_S while the frontend is busy: a write there costs about
        # 8 µs a request, a tenth of the frontend's own work per request. (A latency is
        # observed at once: prometheus-client has no public way to add many, and one costs 2 µs.)
        self._counts: dict[tuple[str, str, str], int] = {}
        self._histograms: dict[tuple[str, str, str], Any] = {}
        self._next_flush = 0.0
        # The parse and format stages: counted here by bucket and written to shared counters
        # FLUSH_S after the first one counted, busy or idle (a write per request would cost an
        # idle frontend 10-25 µs: bench.ab at c=1), and shown as one histogram (_Derived).
        # prometheus-client's own histograms take one observation at a time, 2 µs each.
        self.stage_counts = Counter(_STAGE_COUNTS, "The frontend's stages by bucket (the page shows "
                                    "tfbroker_frontend_stage_seconds).", ["model", "stage", "le"], **kwargs)
        self.stage_sums = Counter(_STAGE_COUNTS + "_seconds", "Their summed seconds.", ["model", "stage"], **kwargs)
        # The request logs' records by model and status (frontend/request_log.py, from its writer thread).
        self.request_log_records = Counter(_LOG_RECORDS, "Request log records (the page shows "
                                           ":tensorflow:serving:request_log_count).", ["model", "status"], **kwargs)
        # by model: parse and format counts per bucket, and their summed seconds
        self._stages: dict[str, tuple[list[int], list[int], list[float]]] = {}
        self._stages_due = False  # a write of them is scheduled

    def observe(self, model: str, api: str, status: int, started: float, entrypoint: str = "REST", *,
                busy: bool = False) -> None:
        """One answered request; ``busy``: others are waiting, so it may be written later
        (within FLUSH_S), else it is written now and the next scrape shows it."""
        now = time.monotonic()
        key = (model, api, str(status))
        self._counts[key] = self._counts.get(key, 0) + 1
        histogram = self._histograms.get((model, api, entrypoint))
        if histogram is None:  # (prometheus-client's labels() is a microsecond of each request's time)
            histogram = self._histograms[(model, api, entrypoint)] = self.latency.labels(model, api, entrypoint)
        histogram.observe((now - started) * 1e6)
        if not busy or now >= self._next_flush:
            self._flush_counts(now)

    def examples(self, model: str, count: int) -> None:
        """One classify or regress request's tf.Examples (2 µs: these APIs carry whole Examples)."""
        self.example_counts.labels(model).observe(count)
        self.example_total.labels(model).inc(count)

    def stages(self, model: str, parse_s: float, format_s: float) -> None:
        """One answered call's parse and format times (written at the next flush)."""
        counts = self._stages.get(model)
        if counts is None:
            size = len(FRONTEND_STAGE_BOUNDS_S) + 1
            counts = self._stages[model] = ([0] * size, [0] * size, [0.0, 0.0])
        parse, answer, sums = counts
        parse[bisect.bisect_left(FRONTEND_STAGE_BOUNDS_S, parse_s)] += 1
        answer[bisect.bisect_left(FRONTEND_STAGE_BOUNDS_S, format_s)] += 1
        sums[0] += parse_s
        sums[1] += format_s
        if not self._stages_due:  # written FLUSH_S from now, busy or not: never one write per request
            self._stages_due = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_S, self._flush_stages)
            except RuntimeError:  # no event loop: at once
                self._flush_stages()

    def flush(self, now: float | None = None) -> None:
        """Write what this frontend counted since the last flush to the shared series."""
        self._flush_counts(now)
        self._flush_stages()

    def _flush_counts(self, now: float | None = None) -> None:
        counts, self._counts = self._counts, {}
        for labels, count in counts.items():
            self.requests.labels(*labels).inc(count)
        self._next_flush = (time.monotonic() if now is None else now) + FLUSH_S

    def _flush_stages(self) -> None:
        self._stages_due = False
        stages, self._stages = self._stages, {}
        for model, (parse, answer, sums) in stages.items():
            for stage, by_bucket, total in (("parse", parse, sums[0]), ("format", answer, sums[1])):
                for bound, n in zip((*FRONTEND_STAGE_BOUNDS_S, float("inf")), by_bucket):
                    if n:
                        self.stage_counts.labels(model, stage, _le(bound)).inc(n)
                self.stage_sums.labels(model, stage).inc(total)

    def render(self, stats: protocol.StatsReply | None) -> bytes:
        self.flush()
        registry = CollectorRegistry()
        own = self._own()
        registry.register(_Without(own, (_STAGE_COUNTS, _LOG_RECORDS)))
        registry.register(_Derived(own, stats))
        return generate_latest(registry)

    def summary(self) -> dict[str, Any]:
        """Every frontend's predict, classify and regress requests so far, for the status page:
        counts by model and HTTP status, and the latency histogram by model (cumulative, TF
        Serving's bounds in µs)."""
        self.flush()
        requests: dict[str, dict[str, float]] = {}
        buckets: dict[str, dict[str, float]] = {}
        for metric in self._own().collect():
            for sample in metric.samples:
                if sample.labels.get("api", sample.labels.get("API")) not in SERVING_APIS:
                    continue
                if sample.name == "tfbroker_requests_total":
                    by_status = requests.setdefault(sample.labels["model"], {})
                    by_status[sample.labels["status"]] = by_status.get(sample.labels["status"], 0) + sample.value
                elif sample.name == ":tensorflow:serving:request_latency_bucket":
                    by_bound = buckets.setdefault(sample.labels["model_name"], {})
                    by_bound[sample.labels["le"]] = by_bound.get(sample.labels["le"], 0) + sample.value
        bounds = [*(float(b) for b in LATENCY_BOUNDS_US), float("inf")]
        return {"requests": requests, "latency_bounds_us": list(LATENCY_BOUNDS_US),
                "latency_buckets": {model: [by_bound.get(_le(b), 0) for b in bounds] for model, by_bound in buckets.items()}}

    def _own(self) -> Any:
        """The collector of the frontends' own series: every frontend's, or this one's alone."""
        if self.directory:
            return MultiProcessCollector(None, path=self.directory)
        return _Reuse(self.requests, self.latency, self.stage_counts, self.stage_sums, self.request_log_records,
                      self.example_counts, self.example_total)


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus-client writes it."""
    return floatToGoString(bound)


def for_config(config: FrontendConfig) -> Metrics | None:
    """The frontend's metrics, when the Prometheus page or the status page shows them."""
    return Metrics(config.metrics_path) if config.metrics_path or config.enable_status_page else None


class _Reuse:
    """The frontend's own metrics, when it runs alone (no multiprocess directory)."""

    def __init__(self, *metrics: Any) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield from metric.collect()


class _Without:
    """A collector's families but those whose names start with one of ``prefixes``."""

    def __init__(self, collector: Any, prefixes: tuple[str, ...]) -> None:
        self.collector, self.prefixes = collector, prefixes

    def collect(self) -> Iterator[Metric]:
        for metric in self.collector.collect():
            if not metric.name.startswith(self.prefixes):
                yield metric


class _Derived:
    """TF Serving's request_count from our request counter, the frontends' stage histogram
    from their counters, and the broker's series."""

    def __init__(self, own: Any, stats: protocol.StatsReply | None) -> None:
        self.own = own  # the collector of the frontends' own series
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        counts: dict[tuple[str, str], float] = {}
        stage_buckets: dict[tuple[str, str], dict[str, float]] = {}
        stage_sums: dict[tuple[str, str], float] = {}
        log_records: dict[tuple[str, str], float] = {}
        for metric in self.own.collect():
            for sample in metric.samples:
                if sample.name == _STAGE_COUNTS + "_total":
                    key = (sample.labels["model"], sample.labels["stage"])
                    by_le = stage_buckets.setdefault(key, {})
                    by_le[sample.labels["le"]] = by_le.get(sample.labels["le"], 0.0) + sample.value
                elif sample.name == _STAGE_COUNTS + "_seconds_total":
                    key = (sample.labels["model"], sample.labels["stage"])
                    stage_sums[key] = stage_sums.get(key, 0.0) + sample.value
                elif sample.name == _LOG_RECORDS + "_total":
                    key = (sample.labels["model"], sample.labels["status"])
                    log_records[key] = log_records.get(key, 0.0) + sample.value
                elif sample.name == "tfbroker_requests_total" and sample.labels["api"] in SERVING_APIS:
                    key = (sample.labels["model"], GRPC_CODES.get(int(sample.labels["status"]), "UNKNOWN"))
                    counts[key] = counts.get(key, 0.0) + sample.value
        # TF Serving's name exactly (prometheus-client would append _total to a counter).
        request_count = Metric(":tensorflow:serving:request_count", "The total number of requests.", "unknown")
        for (model, status), value in sorted(counts.items()):
            request_count.add_sample(":tensorflow:serving:request_count", {"model_name": model, "status": status},
                                     value)
        yield request_count
        logged = Metric(":tensorflow:serving:request_log_count", "The total number of requests logged from the "
                        "model server sliced down by model_name and status code.", "unknown")
        for (model, status), value in sorted(log_records.items()):
            logged.add_sample(":tensorflow:serving:request_log_count", {"model_name": model, "status_code": status},
                              value)
        yield logged
        stages = HistogramMetricFamily("tfbroker_frontend_stage_seconds", "The frontends' own part of each answered "
                                       "call: parse (the request read and parsed), format (the answer written).",
                                       labels=["model", "stage"])
        for (model, stage), by_le in sorted(stage_buckets.items()):
            counts_by_bound = [(bound, int(by_le.get(_le(bound), 0))) for bound in FRONTEND_STAGE_BOUNDS_S]
            stages.add_metric([model, stage], _buckets(counts_by_bound, int(sum(by_le.values()))),
                              sum_value=stage_sums.get((model, stage), 0.0))
        yield stages
        if self.stats is not None:
            yield from _broker_families(self.stats)


def _broker_families(stats: protocol.StatsReply) -> Iterator[Metric]:
    broker = CounterMetricFamily("tfbroker_broker_events", "Broker events: requests admitted, batches formed, "
                                 "rejected, expired, cancelled, malformed messages…", labels=["event"])
    for name, value in sorted(stats.counters.items()):
        broker.add_metric([name], value)
    yield broker
    version_labels = ["model", "version"]
    queued = GaugeMetricFamily("tfbroker_queued_requests", "Requests waiting in the batch queues.",
                               labels=version_labels)
    in_flight = GaugeMetricFamily("tfbroker_in_flight_requests", "Requests in batches handed to the worker.",
                                  labels=version_labels)
    available = GaugeMetricFamily("tfbroker_version_available", "1 while the version takes requests.",
                                  labels=version_labels)
    batches = CounterMetricFamily("tfbroker_batches", "Batches formed.", labels=version_labels)
    rejected = CounterMetricFamily("tfbroker_rejected_requests", "Requests refused: the queue was full (503).",
                                   labels=version_labels)
    restarts = CounterMetricFamily("tfbroker_worker_restarts", "Restarts of the version's worker.",
                                   labels=version_labels)
    batch_size = HistogramMetricFamily("tfbroker_batch_size", "Rows in the batches formed.", labels=version_labels)
    queuing = HistogramMetricFamily(":tensorflow:serving:batching_session:queuing_latency",
                                    "Distribution of wall time (in microseconds) requests wait in the batch queue.",
                                    labels=["thread_pool_name", "model", "version"])
    input_sizes = HistogramMetricFamily(TFS_BATCHING + "input_batch_size", "Tracks the batch size distribution on "
                                        "the inputs (rows per request).", labels=version_labels)
    processed = HistogramMetricFamily(TFS_BATCHING + "processed_batch_size", "Tracks the batch size distribution on "
                                      "processing (rows per batch, padded to an allowed size).", labels=version_labels)
    padding = HistogramMetricFamily(TFS_BATCHING + "padding_size", "Tracks the padding size distribution on batches.",
                                    labels=["execution_batch_size", *version_labels])
    wrapped = Metric(TFS_BATCHING + "wrapped_run_count", "Total count of run calls on the wrapped session "
                     "(batches run).", "unknown")
    runtime = HistogramMetricFamily(":tensorflow:serving:runtime_latency", "Distribution of wall time (in "
                                    "microseconds) for Tensorflow runtime: the model's own calls, per batch.",
                                    labels=["model_name", "version", "API", "runtime"])
    stages = HistogramMetricFamily("tfbroker_stage_latency_seconds", "Each batch's time after the queue: input "
                                   "(assembled in the worker), model (its own calls), output (cut and encoded), "
                                   "transport (broker to worker and back, and the wait behind the batch before it).",
                                   labels=[*version_labels, "stage"])
    fill = HistogramMetricFamily("tfbroker_batch_fill_seconds", "Each request's wait in the batch queue until its "
                                 "batch stopped taking requests (full, timed out, or taken by an idle worker); the rest "
                                 "of queuing_latency is the wait for a worker.", labels=version_labels)
    exits = CounterMetricFamily("tfbroker_batch_exits", "Batches by why they left the queue: full, timeout "
                                "(batch_timeout_micros), idle (a free worker took it first), unbatched, retry.",
                                labels=[*version_labels, "reason"])
    loads = Metric(":tensorflow:cc:saved_model:load_attempt_count", "The number of times a SavedModel was "
                   "attempted to load.", "unknown")
    load_latency = Metric(":tensorflow:cc:saved_model:load_latency", "Latency in microseconds for SavedModels "
                          "that were successfully loaded.", "unknown")
    for v in stats.versions:
        labels = [v.model, str(v.version)]
        queued.add_metric(labels, v.queued)
        in_flight.add_metric(labels, v.in_flight)
        available.add_metric(labels, 1 if v.state == "AVAILABLE" else 0)
        batches.add_metric(labels, v.batches)
        rejected.add_metric(labels, v.rejected)
        restarts.add_metric(labels, v.restarts)
        batch_size.add_metric(labels, _buckets(_binned(v.batch_sizes, BATCH_SIZE_BOUNDS), v.batches), sum_value=v.rows)
        requests = sum(v.input_sizes.values())
        input_sizes.add_metric(labels, _buckets(_binned(v.input_sizes, TFS_BATCH_BOUNDS), requests),
                               sum_value=sum(size * n for size, n in v.input_sizes.items()))
        by_processed = {size: sum(padding.values()) for size, padding in v.padded_sizes.items()}
        processed.add_metric(labels, _buckets(_binned(by_processed, TFS_BATCH_BOUNDS), sum(by_processed.values())),
                             sum_value=sum(size * n for size, n in by_processed.items()))
        for size, paddings in sorted(v.padded_sizes.items()):
            padding.add_metric([str(size), *labels], _buckets(_binned(paddings, TFS_BATCH_BOUNDS),
                                                              sum(paddings.values())),
                               sum_value=sum(pad * n for pad, n in paddings.items()))
        wrapped.add_sample(TFS_BATCHING + "wrapped_run_count", {"model": v.model, "version": str(v.version)},
                           v.batches)
        for stage, counts in sorted(v.stage_buckets.items()):
            sum_us = v.stage_sums_us.get(stage, 0.0)
            stages.add_metric([*labels, stage], _buckets([(b / 1e6, n) for b, n in zip(STAGE_BOUNDS_US, counts)],
                                                         sum(counts)), sum_value=sum_us / 1e6)
            if stage == "model":  # TF Serving's, in its microseconds
                runtime.add_metric([v.model, str(v.version), "batch", "TF1"],
                                   _buckets(list(zip(STAGE_BOUNDS_US, counts)), sum(counts)), sum_value=sum_us)
        if v.fill_buckets:
            fill.add_metric(labels, _buckets([(b / 1e6, n) for b, n in zip(QUEUE_LATENCY_BOUNDS_US, v.fill_buckets)],
                                             sum(v.fill_buckets)), sum_value=v.fill_sum_us / 1e6)
        for reason, count in sorted(v.exits.items()):
            exits.add_metric([*labels, reason], count)
        queue_counts = list(zip(QUEUE_LATENCY_BOUNDS_US, v.queue_latency_buckets))
        queuing.add_metric(["batching", *labels], _buckets(queue_counts, sum(v.queue_latency_buckets)),
                           sum_value=v.queue_latency_sum_us)
        path = f"{v.model}/{v.version}"
        for outcome, count in sorted(v.load_attempts.items()):
            loads.add_sample(":tensorflow:cc:saved_model:load_attempt_count",
                             {"model_path": path, "status": "success" if outcome == "OK" else outcome}, count)
        if v.load_latency_s:
            load_latency.add_sample(":tensorflow:cc:saved_model:load_latency", {"model_path": path},
                                    round(v.load_latency_s * 1e6))
    yield from (queued, in_flight, available, batches, rejected, restarts, batch_size, queuing, input_sizes, processed,
                padding, wrapped, exits, runtime, stages, fill, loads, load_latency)
    cpu = CounterMetricFamily("tfbroker_process_cpu_seconds", "CPU seconds of the live processes of each role.",
                              labels=["role"])
    rss = GaugeMetricFamily("tfbroker_process_resident_memory_bytes", "Resident memory of each role's processes.",
                            labels=["role"])
    processes = GaugeMetricFamily("tfbroker_processes", "Live processes of each role.", labels=["role"])
    for p in stats.processes:
        cpu.add_metric([p.role], p.cpu_seconds)
        rss.add_metric([p.role], p.rss_bytes)
        processes.add_metric([p.role], p.processes)
    yield from (cpu, rss, processes)


def _binned(counts: dict[int, int], bounds: Sequence[int]) -> list[tuple[float, int]]:
    """(upper bound, count) pairs of values counted by value: each value in the first bound it
    does not exceed (a value beyond the last is only in +Inf)."""
    return [(bound, sum(n for value, n in counts.items() if low < value <= bound))
            for low, bound in zip((-1, *bounds), bounds)]


def _buckets(counts: Sequence[tuple[float, int]], total: int) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from (upper bound, count) pairs; +Inf holds ``total``."""
    buckets, running = [], 0
    for bound, value in counts:
        running += value
        buckets.append((str(float(bound)), float(running)))
    buckets.append(("+Inf", float(total)))
    return buckets
