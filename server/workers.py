"""``WORKERS=N``: N single-process servers sharing the public port with
SO_REUSEPORT, under a supervisor that forwards SIGTERM/SIGINT to them and
serves the metrics port for all of them.

Workers cannot share the metrics port the way they share the public one: the
kernel would hand each scrape to one worker at random. So each worker serves
its own metrics app on a Unix socket in a directory the supervisor made (mode
0700), and the supervisor, on ``METRICS_HOST:METRICS_PORT``, asks every
worker at each scrape and answers for the host:

- ``/metrics``: every worker's series with a ``worker`` label (its index,
  0..N-1, stable for the supervisor's life), plus ``hangout_worker_up``;
  a worker that does not answer within ``WORKER_TIMEOUT_S`` is 0 there and
  its series are missing from that scrape;
- ``/status``: every worker's process status, each with its ``worker``.

Per-worker series rather than sums: a gauge such as replica lag has no
meaningful sum, and ``sum by`` in a query adds up what does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import Iterator

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from server.config import Config
from server.metrics_http import WORKER_SOCKET_ENV, operators_only, prometheus_response

log = logging.getLogger("hangout")

WORKER_TIMEOUT_S = 2.0
_WORKERS = web.AppKey("workers", list)


class Worker:
    def __init__(self, index: int, socket_path: str) -> None:
        self.index = index
        self.socket_path = socket_path
        self.process: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        env = dict(os.environ, WORKERS="1", **{WORKER_SOCKET_ENV: self.socket_path})
        self.process = await asyncio.create_subprocess_exec(sys.executable, "-m", "server", "serve", env=env)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.socket_path),
            timeout=aiohttp.ClientTimeout(total=WORKER_TIMEOUT_S))

    async def get(self, path: str) -> bytes | None:
        """The worker's answer to ``GET path``, or None when it gives none."""
        if self.session is None:
            return None  # not started yet
        try:
            async with self.session.get("http://worker" + path) as response:
                return await response.read() if response.status == 200 else None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return None


class _Families:
    """What generate_latest needs of a registry: the merged families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_expositions(pages: list[bytes | None]) -> bytes:
    """The workers' Prometheus pages as one, each series labelled with its
    worker's index; ``hangout_worker_up`` says whose page is missing."""
    merged: dict[str, Metric] = {}
    up = GaugeMetricFamily("hangout_worker_up", "1 if the worker answered this scrape", labels=["worker"])
    for index, page in enumerate(pages):
        up.add_metric([str(index)], 0 if page is None else 1)
        if page is None:
            continue
        for family in text_string_to_metric_families(page.decode()):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                into.add_sample(sample.name, {**sample.labels, "worker": str(index)}, sample.value,
                                sample.timestamp, sample.exemplar)
    return generate_latest(_Families([up, *merged.values()]))  # type: ignore[arg-type]


async def host_metrics(request: web.Request) -> web.Response:
    workers: list[Worker] = request.app[_WORKERS]
    pages = await asyncio.gather(*(w.get("/metrics") for w in workers))
    return prometheus_response(merge_expositions(pages))


async def host_status(request: web.Request) -> web.Response:
    workers: list[Worker] = request.app[_WORKERS]
    pages = await asyncio.gather(*(w.get("/status") for w in workers))
    processes, unreachable = [], []
    for worker, page in zip(workers, pages):
        if page is None:
            unreachable.append(worker.index)
            continue
        for process in json.loads(page)["processes"]:
            processes.append({"worker": worker.index, **process})
    return web.json_response({"processes": processes, "unreachable": unreachable})


async def _serve_host_metrics(config: Config, workers: list[Worker]) -> web.AppRunner:
    app = web.Application(middlewares=[operators_only(config.ops_token)] if config.ops_token else [])
    app[_WORKERS] = workers
    app.router.add_get("/metrics", host_metrics)
    app.router.add_get("/status", host_status)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.metrics_host, config.metrics_port).start()
    return runner


async def _watch(worker: Worker, stopping: list[int]) -> int:
    assert worker.process is not None
    code = await worker.process.wait()
    if not stopping:
        log.warning("worker %d (pid %d) exited with %s", worker.index, worker.process.pid, code)
    return code


async def _supervise(config: Config) -> int:
    folder = tempfile.mkdtemp(prefix="hangout-workers-")  # 0700: only this user reaches the sockets
    workers = [Worker(i, os.path.join(folder, f"worker-{i}.sock")) for i in range(config.workers)]
    runner = None
    stopping: list[int] = []  # the signal received, once one is

    def forward(signum: int) -> None:
        stopping.append(signum)
        for w in workers:
            if w.process is not None and w.process.returncode is None:
                w.process.send_signal(signum)

    # Before any worker starts: a signal during the start-up reaches the
    # workers started by then, and each one started later at its start.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, forward, sig)
    try:
        if config.metrics_port:
            # Before the workers: a host that cannot be watched serves nobody.
            try:
                runner = await _serve_host_metrics(config, workers)
            except OSError as err:
                log.error("cannot serve metrics on %s:%s: %s", config.metrics_host, config.metrics_port, err)
                return 2
        for worker in workers:
            await worker.start()
            if stopping and worker.process is not None:
                worker.process.send_signal(stopping[0])
        codes = await asyncio.gather(*(_watch(w, stopping) for w in workers))
        return max(codes, default=0)
    finally:
        if runner is not None:
            await runner.cleanup()
        for worker in workers:
            if worker.process is not None and worker.process.returncode is None:  # a failed start
                worker.process.kill()
                await worker.process.wait()
            if worker.session is not None:
                await worker.session.close()
        shutil.rmtree(folder, ignore_errors=True)


def serve_workers(config: Config) -> int:
    return asyncio.run(_supervise(config))
