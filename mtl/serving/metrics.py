"""The server's Prometheus metrics (``GET /metrics``), through ``prometheus_client``.

Requests by task and outcome (a finish reason, ``ok``, ``error`` or
``deadline``), generated tokens, and per-task histograms of time to first
token, time per output token and end-to-end latency, observed as each answer
is formatted; queue depth and busy slots read from the scheduler at each scrape.
Each server has its own registry, so several in one process
(tests) do not mix their counts.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few milliseconds (a prefill on a small model) to a minute.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class ServerMetrics:
    """Counters and histograms of one server; :meth:`observe` each answer, :meth:`render` to scrape."""

    def __init__(self, scheduler, tasks: Collection[str]):
        self.tasks = tasks
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mtl_requests", "Requests answered, by task and outcome.", ["task", "outcome"], registry=r
        )
        self.tokens = Counter("mtl_generated_tokens", "Tokens generated, by task.", ["task"], registry=r)
        self.ttft = Histogram(
            "mtl_time_to_first_token_seconds", "Arrival to first token.", ["task"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "mtl_time_per_output_token_seconds",
            "Time per generated token after the first.",
            ["task"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "mtl_request_latency_seconds", "Arrival to answer.", ["task"], buckets=LATENCY_BUCKETS, registry=r
        )
        Gauge("mtl_queue_depth", "Requests waiting.", registry=r).set_function(lambda: len(scheduler.queue))
        Gauge("mtl_busy_slots", "Decode slots holding a request.", registry=r).set_function(
            lambda: sum(slot is not None for slot in scheduler.slots)
        )

    def observe(self, task, response: dict) -> None:
        """Counts one answer: ``response`` is the answer object, an error one included."""
        task = task if isinstance(task, str) and task in self.tasks else ""  # label values come from served tasks only
        if "error" in response:
            # A request cancelled at its deadline is its own outcome: a latency objective missed, not a fault.
            self.requests.labels(task, "deadline" if "deadline_ms" in response["error"] else "error").inc()
            return
        self.requests.labels(task, response.get("finish_reason", "ok")).inc()
        self.latency.labels(task).observe(response["latency_ms"] / 1e3)
        if "ttft_ms" in response:
            self.ttft.labels(task).observe(response["ttft_ms"] / 1e3)
            self.tokens.labels(task).inc(response["tokens"])
            if response["tokens"] > 1:
                per_token = (response["latency_ms"] - response["ttft_ms"]) / 1e3 / (response["tokens"] - 1)
                self.tpot.labels(task).observe(per_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def add_routes(app, api) -> None:
    """``GET /metrics``: Prometheus text (open without a key, as ``/health`` is)."""
    from aiohttp import web

    async def prometheus(_request):
        return web.Response(body=api.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    app.router.add_get("/metrics", prometheus)
