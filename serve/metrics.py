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
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Metric, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

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
    """A registry of the runtime's metrics and the process collector; `handle` is the aiohttp GET handler.

    One of gen serve --workers' processes (`peers` set) answers a scrape with every worker's numbers: the runtime's
    statistics already add up the workers' counters (Runtime.statistics), and the process metrics (CPU seconds,
    memory, open files) are summed here, with gen_workers saying how many workers answered.
    """

    def __init__(self, runtime, peers=None):
        self.registry = CollectorRegistry()
        self.registry.register(RuntimeCollector(runtime))
        self.process = CollectorRegistry()
        ProcessCollector(registry=self.process)
        self.peers = peers

    def render(self) -> bytes:
        if self.peers is None:
            return generate_latest(self.process) + generate_latest(self.registry)
        process = [generate_latest(self.process).decode()]
        process += [body.decode() for body in self.peers.gather("/process-metrics")]
        return added_up(process) + generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        # rendering reads /proc, takes the batchers' locks and may ask the other workers: off the event loop
        body = await asyncio.get_running_loop().run_in_executor(None, self.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def added_up(texts: list[str]) -> bytes:
    """Prometheus text expositions of several processes as one: each sample summed over the processes (start and
    creation times: the earliest; the file-descriptor limit: the largest), plus gen_workers (how many answered)."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, tuple], float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = sample.value
                    merged.samples.append(sample)
                elif sample.name.endswith(("_start_time_seconds", "_created")):
                    values[key] = min(values[key], sample.value)
                elif sample.name == "process_max_fds":
                    values[key] = max(values[key], sample.value)
                else:
                    values[key] += sample.value
    count = Metric("gen_workers", "Worker processes whose metrics are added up here", "gauge")
    count.add_sample("gen_workers", {}, len(texts))
    out = [count]
    for family in families.values():
        family.samples = [s._replace(value=values[(s.name, tuple(sorted(s.labels.items())))])
                          for s in family.samples]
        out.append(family)
    registry = CollectorRegistry()
    registry.register(_Fixed(out))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return iter(self.families)
