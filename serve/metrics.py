"""Prometheus metrics over HTTP (text format 0.0.4), with Triton's metric names where one exists.

Served from a daemon thread with the standard library, so scraping never touches the event loop.
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

METRICS = [  # (name, type, help)
    ("nv_inference_request_success", "counter", "Number of successful inference requests"),
    ("nv_inference_request_failure", "counter", "Number of failed inference requests, by reason"),
    ("nv_inference_count", "counter", "Number of inferences performed (a batch of n counts n)"),
    ("nv_inference_exec_count", "counter", "Number of model executions (a batch counts once)"),
    ("nv_inference_queue_duration_us", "counter", "Cumulative time requests spent queued, microseconds"),
    ("nv_inference_compute_infer_duration_us", "counter", "Cumulative compute time, microseconds"),
    ("gen_batch_size_total", "counter", "Executions by batch size"),
]


def render(runtime) -> str:
    lines = []
    stats = runtime.statistics(None, None)
    for name, kind, help_text in METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for s in stats:
            labels = f'model="{s.name}",version="{s.version}"'
            if name == "nv_inference_request_success":
                lines.append(f"{name}{{{labels}}} {s.success_count}")
            elif name == "nv_inference_request_failure":
                for reason, count in sorted(s.failures.items()):
                    lines.append(f'{name}{{{labels},reason="{reason}"}} {count}')
            elif name == "nv_inference_count":
                lines.append(f"{name}{{{labels}}} {s.inference_count}")
            elif name == "nv_inference_exec_count":
                lines.append(f"{name}{{{labels}}} {s.execution_count}")
            elif name == "nv_inference_queue_duration_us":
                lines.append(f"{name}{{{labels}}} {s.queue_ns // 1000}")
            elif name == "nv_inference_compute_infer_duration_us":
                lines.append(f"{name}{{{labels}}} {s.compute_ns // 1000}")
            else:
                for size, (count, _) in sorted(s.batches.items()):
                    lines.append(f'{name}{{{labels},batch_size="{size}"}} {count}')
    return "\n".join(lines) + "\n"


def start_metrics_server(runtime, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- http.server's naming
            if self.path.rstrip("/") != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = render(runtime).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep scrapes out of the server log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
