"""Prometheus metrics of the front end. Each app gets its own registry, so several servers in
one process (tests) don't collide; `/metrics` renders it in the text exposition format."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .usage import Tally

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LOAD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("emo_requests", "Model requests by model, endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("emo_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("emo_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("emo_time_to_first_token_seconds", "Time to the first streamed token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("emo_e2e_request_latency_seconds", "Request latency, end to end",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.engines_loaded = Gauge("emo_engines_loaded", "vLLM engines resident and healthy", registry=r)
        self.engine_load = Histogram("emo_engine_load_seconds", "Seconds from spawning an engine to healthy",
                                     ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.engine_crashes = Counter("emo_engine_crashes", "Engines that exited unexpectedly",
                                      ["model"], registry=r)
        self.resident_experts = Gauge("emo_engine_resident_experts",
                                      "Experts (summed over layers) resident in each shared engine",
                                      ["engine"], registry=r)
        self.expert_loads = Counter("emo_expert_loads", "Routed experts loaded into a shared engine's slots "
                                    "(one per expert and layer)", ["engine"], registry=r)
        self.expert_load_bytes = Counter("emo_expert_load_bytes", "Bytes of the base read for expert loads",
                                         ["engine"], registry=r)
        self.expert_load_seconds = Histogram("emo_expert_load_seconds", "Seconds of one expert load, from "
                                             "the plan to the copy into the slots", ["engine"],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.expert_evictions = Counter("emo_expert_evictions", "Routed experts evicted from slots for others",
                                        ["engine"], registry=r)
        self.routing_drains = Counter("emo_routing_drains", "Routing-counter collections per engine: drained, "
                                      "idle (nothing served since the last drain: skipped) or failed",
                                      ["engine", "outcome"], registry=r)
        self.loop_lag = Histogram("emo_event_loop_lag_seconds", "How late the front end's event loop ran a "
                                  "timer: the wait any request met at that moment", buckets=LAG_BUCKETS, registry=r)
        self._before_render: list[Callable[[], None]] = []
        self.profiling = Histogram("emo_subset_profiling_seconds", "Seconds to profile and write a subset",
                                   ["method"], buckets=LOAD_BUCKETS, registry=r)

    def routing_source(self, source: Callable[[], Iterable[tuple[str, Tally]]]) -> None:
        """Expose each model's mass outside its subset (from the routing book) as a histogram."""
        self.registry.register(_MassOutside(source))

    def observe_usage(self, model: str, usage: dict | None) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            self.prompt_tokens.labels(model).inc(prompt)
        if isinstance(completion, int):
            self.generation_tokens.labels(model).inc(completion)

    def on_render(self, hook: Callable[[], None]) -> None:
        """Refresh gauges that are read from state (not counted as they change) before a scrape."""
        self._before_render.append(hook)

    def render(self) -> bytes:
        for hook in self._before_render:
            hook()
        return generate_latest(self.registry)


class _MassOutside:
    """`emo_routing_mass_outside`: per token, the share of the full router's top-k weight that
    its model's subset masks out (mean over MoE layers), as counted in the engines. Labels: the
    model only (never an expert)."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, Tally]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily("emo_routing_mass_outside",
                                       "Share of the full router's top-k weight per token on experts outside "
                                       "the model's subset",
                                       labels=["model"])
        for model, tally in self.source():
            if not tally.outside_tokens:
                continue
            cumulative, buckets = 0, []
            for bound, count in zip(tally.bounds, tally.hist.tolist()):
                cumulative += count
                buckets.append((repr(float(bound)), cumulative))
            buckets.append(("+Inf", tally.outside_tokens))
            family.add_metric([model], buckets, sum_value=tally.outside_sum)
        yield family
