"""Engine-wide request statistics, the request-level half of /metrics (vLLM's set): histograms of token gaps and of
each finished request's timings and sizes, and counters of tokens and of requests by finish reason.

Written only by the output processor, under the engine lock; the server reads them without the lock (its event loop
never waits for a step). A reader copies each histogram's bucket list in one C-level call, so what it renders is
self-consistent (the count is the sum of the buckets); the sum may be one observation ahead or behind."""
from __future__ import annotations

from bisect import bisect_left

# Bucket bounds, seconds. Token gaps and TPOT: a decode step is ~1 ms (tiny models) to ~100 ms (large ones, big
# batches); vLLM's inter-token buckets start at 10 ms, too coarse for a GPU's usual 5-20 ms gaps.
GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# TTFT, end to end, queue, prefill, decode, inference: from a queue wait of a millisecond to a long generation
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0, 7680.0)
N_BUCKETS = (1, 2, 5, 10, 20)
FINISH_REASONS = ("stop", "length", "abort", "error")


def token_buckets(max_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_len (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class Histogram:
    """Prometheus-style cumulative-at-render histogram: counts[i] holds observations v with bounds[i-1] < v <=
    bounds[i]; the last slot those over every bound (+Inf only)."""
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: Prometheus' "le"
        self.sum += value

    def snapshot(self) -> tuple[list[int], float]:
        """(bucket counts, not cumulative, sum): the counts in one copy."""
        return list(self.counts), self.sum


def request_finish_reason(samples) -> str:
    """One reason per engine request, whatever its samples say: error over abort over length over stop, so a
    request that any sample failed, was cut or truncated is counted as such once."""
    reasons = {s.finish_reason for s in samples}
    return next((r for r in ("error", "abort", "length") if r in reasons), "stop")


class RequestStats:
    """Attributes are named as exported (after the "internvl_" prefix); histograms() finds them by type."""

    def __init__(self, max_model_len: int):
        tokens = token_buckets(max_model_len)
        self.time_to_first_token_seconds = Histogram(LATENCY_BUCKETS)
        self.inter_token_latency_seconds = Histogram(GAP_BUCKETS)  # each token's gap to its sample's previous one
        self.time_per_output_token_seconds = Histogram(GAP_BUCKETS)  # RequestMetrics.tpot_s (decode forward time)
        self.e2e_request_latency_seconds = Histogram(LATENCY_BUCKETS)
        self.request_queue_time_seconds = Histogram(LATENCY_BUCKETS)      # arrival -> first scheduled
        self.request_prefill_time_seconds = Histogram(LATENCY_BUCKETS)    # first scheduled -> first token
        self.request_decode_time_seconds = Histogram(LATENCY_BUCKETS)     # first token -> last token
        self.request_inference_time_seconds = Histogram(LATENCY_BUCKETS)  # first scheduled -> last token
        self.request_prompt_tokens = Histogram(tokens)
        self.request_generation_tokens = Histogram(tokens)
        self.request_max_num_generation_tokens = Histogram(tokens)  # the longest sample's tokens (n > 1)
        self.request_params_n = Histogram(N_BUCKETS)
        self.request_params_max_tokens = Histogram(tokens)
        self.finished = dict.fromkeys(FINISH_REASONS, 0)  # engine requests by request_finish_reason
        self.prompt_tokens = 0      # prompts of requests whose prefill completed (counted at their first token)
        self.generation_tokens = 0  # every generated token as it is made (aborted requests' included)

    def histograms(self) -> dict[str, Histogram]:
        return {name: h for name, h in vars(self).items() if isinstance(h, Histogram)}

    def first_token(self, m, prompt_tokens: int) -> None:
        self.time_to_first_token_seconds.observe(m.ttft_s)
        self.prompt_tokens += prompt_tokens

    def finished_request(self, reason: str, m, n: int, max_tokens: int, generated: int, longest: int,
                         scheduled: bool, first_token: bool) -> None:
        """m: the request's RequestMetrics with its closing fields set. Timings a request never reached (never
        scheduled, no token) are not observed; the rest are, whatever its finish reason, so every histogram
        without a missing stage counts the same requests as `finished`."""
        self.finished[reason] += 1
        self.e2e_request_latency_seconds.observe(m.e2e_s)
        if scheduled:
            self.request_queue_time_seconds.observe(m.queue_s)
        if first_token:
            self.request_prefill_time_seconds.observe(max(0.0, m.ttft_s - m.queue_s))
            self.request_decode_time_seconds.observe(max(0.0, m.last_token_s - m.ttft_s))
            self.request_inference_time_seconds.observe(max(0.0, m.last_token_s - m.queue_s))
            self.time_per_output_token_seconds.observe(m.tpot_s)
        self.request_prompt_tokens.observe(m.prompt_tokens)
        self.request_generation_tokens.observe(generated)
        self.request_max_num_generation_tokens.observe(longest)
        self.request_params_n.observe(n)
        self.request_params_max_tokens.observe(max_tokens)
