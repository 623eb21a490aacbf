"""Prometheus metrics, rendered by prometheus_client: Triton's metric names, latency histograms per model, and
the process collector (CPU, memory, open files of the server process).

Counters keep Triton's names with the `_total` suffix that prometheus_client (and OpenMetrics) gives every
counter: nv_inference_request_success_total, nv_inference_exec_count_total, ... Served as GET /metrics on
the REST port and, with --metrics-port, on a port of its own; both behind the same TLS and bearer-token
auth as the rest of the server (see serve/server.py).
"""
from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from serve.batcher import BUCKETS_S, Histogram

COUNTERS = [  # (name, help, Stats attribute, divisor: ns -> us)
    ("nv_inference_request_success", "Number of successful inference requests", "success_count", 1),
    ("nv_inference_count", "Number of inferences performed (a batch of n counts n)", "inference_count", 1),
    ("nv_inference_exec_count", "Number of model executions (a batch counts once)", "execution_count", 1),
    ("nv_inference_queue_duration_us", "Cumulative time requests spent queued, microseconds", "queue_ns", 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute time, microseconds", "compute_ns", 1000),
]
HISTOGRAMS = [  # (name, help, Stats attribute)
    ("gen_request_duration_seconds", "Request latency inside the server, queued to answered", "request_hist"),
    ("gen_queue_duration_seconds", "Time a request waited before its first run", "queue_hist"),
    ("gen_compute_duration_seconds", "Time of one run of the graph (a batch counts once)", "compute_hist"),
]
LABELS = ["model", "version"]


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, count in zip((*(str(b) for b in BUCKETS_S), "+Inf"), h.counts):
        total += count
        out.append((bound, total))
    return out


class RuntimeCollector:
    """Reads Runtime.statistics() at each scrape: the counters are the ones ModelStatistics reports."""

    def __init__(self, runtime):
        self.runtime = runtime

    def collect(self):
        stats = self.runtime.statistics(None, None)
        for name, help_text, attr, divisor in COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=LABELS)
            for s in stats:
                family.add_metric([s.name, str(s.version)], getattr(s, attr) // divisor)
            yield family
        failures = CounterMetricFamily("nv_inference_request_failure", "Number of failed inference requests",
                                       labels=[*LABELS, "reason"])
        batches = CounterMetricFamily("gen_batch_size", "Executions by batch size", labels=[*LABELS, "batch_size"])
        for s in stats:
            for reason, count in sorted(s.failures.items()):
                failures.add_metric([s.name, str(s.version), reason], count)
            for size, (count, _) in s.batches.items():
                batches.add_metric([s.name, str(s.version), str(size)], count)
        yield failures
        yield batches
        for name, help_text, attr in HISTOGRAMS:
            family = HistogramMetricFamily(name, help_text, labels=LABELS)
            for s in stats:
                h = getattr(s, attr)
                family.add_metric([s.name, str(s.version)], _buckets(h), h.sum_ns / 1e9)
            yield family


class MetricsEndpoint:
    """A registry of the runtime's metrics and the process collector; `handle` is the aiohttp GET handler."""

    def __init__(self, runtime):
        self.registry = CollectorRegistry()
        self.registry.register(RuntimeCollector(runtime))
        ProcessCollector(registry=self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        # rendering reads /proc and takes the batchers' locks: off the event loop that serves requests
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
