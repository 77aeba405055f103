"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import threading

import jax.monitoring
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

# Seconds this process spent making executables (tracing, lowering, compiling or loading from the
# persistent compilation cache), from JAX's own monitoring events: a new shape met while serving
# shows up here rather than as a mystery pause.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile = {"seconds": 0.0}
_compile_lock = threading.Lock()


def _on_duration(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        with _compile_lock:
            _compile["seconds"] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.waiting = Gauge("qvl_requests_waiting", "requests submitted that have no token yet", registry=r)
        self.running = Gauge("qvl_requests_running", "requests producing tokens", registry=r)
        usable = engine.num_blocks - 1  # one block is the engine's reserved trash block
        Gauge("qvl_kv_blocks_total", "KV cache blocks in the pool", registry=r).set(usable)
        Gauge("qvl_kv_blocks_in_use", "KV cache blocks held by requests", registry=r).set_function(
            lambda: usable - engine.num_free_blocks)
        self.prompt_tokens = Counter("qvl_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("qvl_prompt_cached_tokens", "prompt tokens served from the prefix cache",
                                     registry=r)
        Gauge("qvl_prefix_cache_hit_rate", "cached / all prompt tokens so far", registry=r).set_function(
            lambda: self._rate())
        self.generation_tokens = Counter("qvl_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("qvl_time_to_first_token_seconds", "request received -> first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("qvl_inter_token_latency_seconds", "time between tokens of a stream", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.latency = Histogram("qvl_request_latency_seconds", "request received -> finished", registry=r,
                                 buckets=_LATENCY_BUCKETS)
        self.finished = Counter("qvl_requests_finished", "finished requests by finish reason", ["reason"], registry=r)
        r.register(_EngineStats(engine))
        self.refused = Counter("qvl_requests_refused", "requests answered with an error, by HTTP status", ["status"],
                               registry=r)

    def _rate(self) -> float:
        total = self.prompt_tokens._value.get()
        return self.cached_tokens._value.get() / total if total else 0.0

    def text(self) -> bytes:
        return generate_latest(self.registry)


# The engine scheduler's own counters (Engine.stats): where its time goes, for benchmarks and tuning.
_ENGINE_STATS = {
    "steps": "scheduler steps (a prefill phase then a decode phase)",
    "prefill_s": "seconds in prefill phases (vision tower included)",
    "decode_s": "seconds in decode phases",
    "prefill_tokens": "prompt tokens computed (prefix-cache hits excluded)",
    "prefill_padded_tokens": "prefill_tokens with each chunk's padding to its compiled length",
    "decode_tokens": "tokens produced by decode steps",
    "decode_chunks": "jitted decode calls (up to decode_steps tokens each)",
    "preemptions": "requests preempted for KV blocks (recomputed later)",
    "vision_encoded": "images and videos run through the vision tower (vision-cache misses)",
    # Speculative decoding (--speculative-config), as vLLM's spec_decode_num_draft_tokens /
    # spec_decode_num_accepted_tokens.
    "spec_decode_num_draft_tokens": "speculative proposals verified",
    "spec_decode_num_accepted_tokens": "speculative proposals accepted",
}


class _EngineStats:
    """Exposes Engine.stats as qvl_engine_<name>_total counters, and the process's compile seconds as
    qvl_jax_compile_seconds_total, read at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = dict(self.engine.stats)  # a copy: the scheduler thread keeps counting
        for key, doc in _ENGINE_STATS.items():
            name = "qvl_engine_" + (key[:-2] + "_seconds" if key.endswith("_s") else key)
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], float(stats.get(key, 0)))
            yield fam
        fam = CounterMetricFamily("qvl_jax_compile_seconds", "seconds this process spent tracing, lowering and "
                                  "compiling (or loading from the compilation cache) jitted functions")
        fam.add_metric([], _compile["seconds"])
        yield fam
