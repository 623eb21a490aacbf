"""The other workers of gen serve --workers, as one worker sees them: where each serves its own counters, and
asking them.

Every worker serves, on a loopback port of its own (plain HTTP, no token: it never leaves the machine),
GET /statistics (its Runtime.local_statistics as JSON) and GET /process-metrics (its Prometheus process
collector), and writes that port to a file named after its process id in the folder the supervisor shares
(serve/workers.py). Whichever worker a ModelStatistics call or a /metrics scrape reaches adds the others' up. A
worker that does not answer within TIMEOUT_S (stopping, or stuck) is left out: its counters leave with it.
"""
from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve.batcher import Stats

TIMEOUT_S = 5.0


class Peers:
    def __init__(self, folder: Path):
        self.folder = folder
        self._own: Path | None = None

    def publish(self, port: int) -> None:
        """Say where this worker's own counters are (written atomically)."""
        self._own = self.folder / f"{os.getpid()}.port"
        tmp = self._own.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(self._own)

    def gather(self, path: str) -> list[bytes]:
        """GET `path` from every other worker that answers."""
        out = []
        for file in sorted(self.folder.glob("*.port")):
            if file == self._own:
                continue
            try:
                port = int(file.read_text())
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT_S) as reply:
                    out.append(reply.read())
            except (OSError, ValueError):  # stopping or gone
                continue
        return out

    def statistics(self) -> list[list[Stats]]:
        """Each other worker's own counters."""
        return [[Stats.from_json(d) for d in json.loads(body)] for body in self.gather("/statistics")]


def own_app(runtime, process_registry) -> web.Application:
    """What this worker shows the others: its own counters and process metrics."""
    async def statistics(request: web.Request) -> web.Response:
        rows = await request.loop.run_in_executor(None, runtime.local_statistics)
        return web.json_response([r.to_json() for r in rows])

    async def process_metrics(request: web.Request) -> web.Response:
        body = await request.loop.run_in_executor(None, generate_latest, process_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes([web.get("/statistics", statistics), web.get("/process-metrics", process_metrics)])
    return app
