"""GET /metrics in the Prometheus text format (version 0.0.4), written by hand: counters the server keeps for the
requests it answered, histograms of each finished request's RequestMetrics (TTFT, TPOT, end to end), and gauges from
the engine's stats() snapshot at scrape time (running and waiting requests, KV pool, caches, preemptions). Updated
only from the server's event loop."""
from __future__ import annotations

import time
from bisect import bisect_left

PREFIX = "internvl_"
# HTTP request outcomes: success (finished: stop or length), abort (the client left, or stopped reading: cut off by
# the server or its requests aborted by AsyncLLM, 408), error (failed while running: 500), invalid (400/404),
# too_large (413), unauthorized (401), rejected (429), unavailable (503: engine dead, or cut at shutdown)
OUTCOMES = ("success", "abort", "error", "invalid", "too_large", "unauthorized", "rejected", "unavailable")
STATUS_OUTCOME = {400: "invalid", 404: "invalid", 401: "unauthorized", 408: "abort", 413: "too_large",
                  429: "rejected", 503: "unavailable", 500: "error"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


def _num(v) -> str:
    if isinstance(v, float):
        return repr(v) if v == v else "NaN"
    return str(v)


class Histogram:
    def __init__(self, name: str, help: str, buckets):
        self.name, self.help, self.buckets = PREFIX + name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: over every bound (+Inf only)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, c in zip(self.buckets, self.counts):
            total += c
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {_num(self.sum)}",
                  f"{self.name}_count {self.count}"]
        return lines


def _metric(kind: str, name: str, help: str, samples) -> list[str]:
    """samples: [(labels dict or None, value)]."""
    name = PREFIX + name
    lines = [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        lines.append(f"{name}{label} {_num(value)}")
    return lines


class ServerMetrics:
    def __init__(self):
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.finished = {"stop": 0, "length": 0}      # finish reason of each finished sample
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0                        # prompt tokens of finished engine requests
        self.prefix_hits = 0                           # of which came from the prefix cache
        self.ttft = Histogram("time_to_first_token_seconds", "Time to first token (engine arrival to first token).",
                              LATENCY_BUCKETS)
        self.tpot = Histogram("time_per_output_token_seconds", "Mean decode time per output token of a request.",
                              TPOT_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Engine arrival to the last token.", LATENCY_BUCKETS)

    def outcome(self, outcome: str) -> None:
        self.requests[outcome] += 1

    def finished_request(self, out) -> None:
        """One engine request that finished normally (every sample stop or length)."""
        m = out.metrics
        self.ttft.observe(m.ttft_s)
        self.tpot.observe(m.tpot_s)
        self.e2e.observe(m.e2e_s)
        self.prompt_tokens += m.prompt_tokens
        self.generation_tokens += m.generated_tokens
        self.prefix_queries += m.prompt_tokens
        self.prefix_hits += m.cached_prompt_tokens
        for c in out.outputs or [out]:
            if c.finish_reason in self.finished:
                self.finished[c.finish_reason] += 1

    def render(self, llm, model_name: str) -> str:
        try:
            llm.check_health()
            healthy = 1
        except Exception:
            healthy = 0
        stats = llm.engine.stats()
        free, total = stats.kv_blocks_free, stats.kv_blocks_total
        v_hits, v_misses = stats.vision_cache_hits, stats.vision_cache_misses
        lines = []
        lines += _metric("gauge", "model_info", "The served model.", [({"model_name": model_name}, 1)])
        lines += _metric("gauge", "engine_healthy", "1 while the engine is alive, 0 once it is dead.",
                         [(None, healthy)])
        lines += _metric("counter", "requests_total", "HTTP generation requests by outcome.",
                         [({"outcome": k}, v) for k, v in self.requests.items()])
        lines += _metric("counter", "request_success_total", "Finished samples by finish reason.",
                         [({"finished_reason": k}, v) for k, v in self.finished.items()])
        lines += _metric("counter", "prompt_tokens_total", "Prompt tokens of finished requests.",
                         [(None, self.prompt_tokens)])
        lines += _metric("counter", "generation_tokens_total", "Generated tokens of finished requests.",
                         [(None, self.generation_tokens)])
        lines += _metric("gauge", "num_requests_running", "Requests the scheduler is running.",
                         [(None, stats.running)])
        lines += _metric("gauge", "num_requests_waiting", "Requests waiting to be scheduled.",
                         [(None, stats.waiting)])
        lines += _metric("gauge", "kv_cache_blocks_total", "Blocks in the paged KV pool.", [(None, total)])
        lines += _metric("gauge", "kv_cache_blocks_free", "Free KV blocks (unused or cached, evictable).",
                         [(None, free)])
        lines += _metric("gauge", "kv_cache_usage_perc", "Share of the KV pool in use (0-1).",
                         [(None, (total - free) / total if total else 0.0)])
        lines += _metric("counter", "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                         [(None, self.prefix_queries)])
        lines += _metric("counter", "prefix_cache_hits_total", "Prompt tokens whose KV came from the prefix cache.",
                         [(None, self.prefix_hits)])
        lines += _metric("gauge", "prefix_cache_hit_rate", "prefix_cache_hits_total / prefix_cache_queries_total.",
                         [(None, self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0)])
        lines += _metric("counter", "vision_cache_hits_total", "Images whose features came from the vision cache.",
                         [(None, v_hits)])
        lines += _metric("counter", "vision_cache_misses_total", "Vision cache lookups that missed.",
                         [(None, v_misses)])
        lines += _metric("gauge", "vision_cache_hit_rate", "Vision cache hits / lookups (0 without lookups or cache).",
                         [(None, v_hits / (v_hits + v_misses) if v_hits + v_misses else 0.0)])
        lines += _metric("counter", "num_preemptions_total", "Sequences preempted for lack of KV blocks.",
                         [(None, stats.num_preemptions)])
        # render() runs on the event loop's thread: its CPU time is the whole HTTP layer's (and submissions')
        lines += _metric("counter", "server_loop_cpu_seconds_total",
                         "CPU time of the server's event loop thread (HTTP, translation, SSE, request submission).",
                         [(None, time.thread_time())])
        for h in (self.ttft, self.tpot, self.e2e):
            lines += h.render()
        return "\n".join(lines) + "\n"
