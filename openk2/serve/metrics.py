"""Prometheus metrics for the server (`GET /metrics`, text exposition format).

  openk2_http_requests_total{route, status}   answered HTTP requests, by route template and status
  openk2_prompt_tokens_total                  prompt tokens of the requests the engine finished
  openk2_completion_tokens_total              tokens they generated
  openk2_completions_total{finish_reason}     finished completions (n per request)
  openk2_time_to_first_token_seconds          histogram: submission -> first sampled token
  openk2_request_latency_seconds              histogram: submission -> the request's last completion
  openk2_waiting_requests, openk2_running_sequences, openk2_cache_slots   read from the engine at scrape
  openk2_prefix_cache_queried_tokens_total, openk2_prefix_cache_hit_tokens_total   prompt tokens looked
      up in the prefix cache, and those whose cache rows it supplied (read at scrape; absent when off)
  openk2_prefix_cache_hit_rate                hit tokens / queried tokens since start
  openk2_prefix_cache_used_tokens, openk2_prefix_cache_capacity_tokens   its occupancy

Each app has its own registry (several apps can live in one process, as in the tests). Token counts
and timings come from the engine's finish observer, so they count every request the engine ran,
whatever its endpoint and however it ended; the route label is the route's template (an unknown path
counts as "unmatched"), which keeps the label set bounded whatever paths clients send.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openk2.serve.engine import Engine, RequestOutput

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class _EngineGauges:
    """A collector that reads the engine's queue and batch sizes when /metrics is scraped."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for name, key, doc in (
            ("openk2_waiting_requests", "waiting", "requests queued for a cache slot"),
            ("openk2_running_sequences", "running", "sequences being decoded (one per cache slot)"),
            ("openk2_cache_slots", "slots", "cache slots: the most sequences decoded at once"),
        ):
            yield GaugeMetricFamily(name, doc, value=stats[key])
        if not stats.get("prefix_cache_tokens"):
            return
        for name, key, doc in (
            ("openk2_prefix_cache_queried_tokens", "prefix_cache_queried_tokens", "prompt tokens looked up"),
            ("openk2_prefix_cache_hit_tokens", "prefix_cache_hit_tokens", "prompt tokens restored from it"),
        ):
            yield CounterMetricFamily(name, doc, value=stats[key])
        for name, key, doc in (
            ("openk2_prefix_cache_hit_rate", "prefix_cache_hit_rate", "hit tokens / queried tokens"),
            ("openk2_prefix_cache_used_tokens", "prefix_cache_used_tokens", "tokens it holds"),
            ("openk2_prefix_cache_capacity_tokens", "prefix_cache_tokens", "tokens it can hold"),
        ):
            yield GaugeMetricFamily(name, doc, value=stats[key])


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "openk2_http_requests", "HTTP requests answered", ["route", "status"], registry=reg
        )
        self.prompt_tokens = Counter(
            "openk2_prompt_tokens", "prompt tokens of finished requests", registry=reg
        )
        self.completion_tokens = Counter("openk2_completion_tokens", "tokens generated", registry=reg)
        self.completions = Counter(
            "openk2_completions", "finished completions", ["finish_reason"], registry=reg
        )
        self.ttft = Histogram(
            "openk2_time_to_first_token_seconds",
            "seconds from submission to the first sampled token",
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.latency = Histogram(
            "openk2_request_latency_seconds",
            "seconds from submission to the end of the request's last completion",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        reg.register(_EngineGauges(engine))
        engine.add_observer(self.observe)

    def observe(self, output: RequestOutput, seconds: float) -> None:
        """The engine's finish observer (runs on the engine thread; the metrics are thread-safe)."""
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.completion_tokens.inc(sum(len(c.token_ids) for c in output.completions))
        for c in output.completions:
            self.completions.labels(c.finish_reason or "unknown").inc()
        if output.time_to_first_token is not None:
            self.ttft.observe(output.time_to_first_token)
        self.latency.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestCountMiddleware:
    """A plain ASGI middleware that counts each answered request by route template and status into
    `metrics.requests`. A request whose handler raised before answering counts as 500, one cancelled
    before answering (the client left) as 499."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: list | None = None):
        self.app = app
        self.metrics = metrics
        self.routes = routes if routes is not None else []  # the app's routes, for answers given
        # before routing (413, 401): a request to a fixed route's path is labelled with it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def tracked_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            status = status or 499
            raise
        except BaseException:
            status = status or 500
            raise
        finally:
            self.metrics.requests.labels(self._route(scope), str(status or 500)).inc()

    def _route(self, scope: Scope) -> str:
        route = getattr(scope.get("route"), "path", None)
        if route is None:
            fixed = {r.path for r in self.routes if "{" not in getattr(r, "path", "{")}
            route = scope["path"] if scope["path"] in fixed else "unmatched"
        return route
