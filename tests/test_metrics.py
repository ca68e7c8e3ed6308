"""/metrics against a live server (random:tiny, CPU): after successes, a stream, an n=3 request, a 400, a client that
leaves mid-stream and a made-up path, the text is valid Prometheus exposition (prometheus_client's parser; HELP and
TYPE once per family; no duplicate series; every series labelled model_name), and each series counts what was sent:
finish reasons once per engine request (the abort included), tokens, per-token gaps, request histograms, per-route
HTTP counts, the process's own numbers. The Grafana dashboard only queries series the server exports."""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

from internvl_engine.engine.request_stats import Histogram, token_buckets  # noqa: E402
from internvl_engine.server import ServerSettings  # noqa: E402
from internvl_engine.server.metrics import Exposition  # noqa: E402
from test_server import MODEL, served, wait_idle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Count the stars, one by one. " * 8}]  # a few full KV blocks
MAX_TOKENS = 4
LEAVER_MAX_TOKENS = 3000  # the stream its client leaves after three chunks
BODY = dict(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})


def families(text: str) -> dict:
    """name -> prometheus_client Metric, after checking what the parser lets through: each family's HELP and TYPE
    exactly once, no series twice, model_name on every sample."""
    helps = re.findall(r"^# HELP (\S+) ", text, re.M)
    types = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert [n for n, c in Counter(helps).items() if c > 1] == [] and sorted(helps) == sorted(types)
    out = {f.name: f for f in parser.text_string_to_metric_families(text)}
    series = [(s.name, tuple(sorted(s.labels.items()))) for f in out.values() for s in f.samples]
    assert [s for s, c in Counter(series).items() if c > 1] == []
    assert all(dict(labels).get("model_name") == MODEL for _, labels in series)
    assert len(out) == len(types)  # every TYPE line became one family
    return out


def value(fams: dict, family: str, sample: str | None = None, **labels) -> float:
    got = [s.value for s in fams[family].samples if s.name == (sample or family)
           and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(got) == 1, (family, sample, labels, got)
    return got[0]


@pytest.fixture(scope="module")
def server():
    with served(engine=dict(device="cpu", kv_cache_tokens=8192, max_num_seqs=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def traffic(server):
    """Sends the module's requests once; what was sent, and /metrics before and after."""
    client = server.client()
    before = families(httpx.get(server.url + "/metrics").text)
    prompt = client.chat.completions.create(**BODY).usage.prompt_tokens
    client.chat.completions.create(**BODY)
    chunks = list(client.chat.completions.create(**BODY, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    client.chat.completions.create(**BODY, n=3)  # its last two samples end in the same step
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    # a client that leaves after three chunks of a long stream (long: no lag of a loaded machine lets it finish first)
    stream = client.chat.completions.create(**{**BODY, "max_tokens": LEAVER_MAX_TOKENS}, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    wait_idle(server)
    assert httpx.get(server.url + "/no/such/path").status_code == 404
    text = httpx.get(server.url + "/metrics").text
    return {"prompt": prompt, "before": before, "after": families(text)}


def test_finish_reasons_tokens_and_histograms_count_what_was_sent(traffic):
    m, prompt = traffic["after"], traffic["prompt"]
    requests = 5  # three of one sample, the n=3 one, the abandoned stream (the 400 never reached the engine)
    samples = 3 + 3 + 1
    assert value(m, "internvl_request_success", "internvl_request_success_total", finished_reason="length") == 4
    assert value(m, "internvl_request_success", "internvl_request_success_total", finished_reason="abort") == 1
    assert value(m, "internvl_request_success", "internvl_request_success_total", finished_reason="stop") == 0
    assert value(m, "internvl_request_success", "internvl_request_success_total", finished_reason="error") == 0
    generated = value(m, "internvl_generation_tokens", "internvl_generation_tokens_total")
    left = generated - 6 * MAX_TOKENS  # what the abandoned stream had generated when it was aborted
    assert 3 <= left < LEAVER_MAX_TOKENS
    assert value(m, "internvl_prompt_tokens", "internvl_prompt_tokens_total") == requests * prompt

    def count(name):
        return value(m, name, name + "_count")

    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds", "time_to_first_token_seconds",
                 "time_per_output_token_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "request_params_n", "request_params_max_tokens", "request_max_num_generation_tokens"):
        assert count("internvl_" + name) == requests, name
    # one gap per token after each sample's first
    assert count("internvl_inter_token_latency_seconds") == generated - samples
    assert value(m, "internvl_request_generation_tokens", "internvl_request_generation_tokens_sum") == generated
    assert value(m, "internvl_request_prompt_tokens", "internvl_request_prompt_tokens_sum") == requests * prompt
    assert value(m, "internvl_request_params_n", "internvl_request_params_n_sum") == 4 + 3
    longest = value(m, "internvl_request_max_num_generation_tokens", "internvl_request_max_num_generation_tokens_sum")
    assert longest == 4 * MAX_TOKENS + left  # the n=3 request's samples are all MAX_TOKENS long
    assert value(m, "internvl_request_params_max_tokens", "internvl_request_params_max_tokens_sum") == \
        4 * MAX_TOKENS + LEAVER_MAX_TOKENS
    # every token gap is under the longest request; decode spans fit inside e2e
    itl = value(m, "internvl_inter_token_latency_seconds", "internvl_inter_token_latency_seconds_sum")
    e2e = value(m, "internvl_e2e_request_latency_seconds", "internvl_e2e_request_latency_seconds_sum")
    decode = value(m, "internvl_request_decode_time_seconds", "internvl_request_decode_time_seconds_sum")
    assert 0 < decode < e2e and 0 < itl
    # the buckets of a histogram are cumulative and end at its count
    buckets = [s for s in m["internvl_e2e_request_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == requests


def test_http_outcomes_and_routes(traffic):
    m = traffic["after"]
    assert value(m, "internvl_requests", "internvl_requests_total", outcome="success") == 4
    assert value(m, "internvl_requests", "internvl_requests_total", outcome="invalid") == 1
    assert value(m, "internvl_requests", "internvl_requests_total", outcome="abort") == 1

    def http(route, status, method="POST"):
        return value(m, "internvl_http_requests", "internvl_http_requests_total", route=route, status=status,
                     method=method)

    chat = "/v1/chat/completions"
    assert http(chat, "200") == 5 and http(chat, "400") == 1
    assert http("/metrics", "200", "GET") == 1  # the scrape before the traffic; this one is counted when it ends
    assert http("other", "404", "GET") == 1
    durations = m["internvl_http_request_duration_seconds"]
    assert value(m, "internvl_http_request_duration_seconds", "internvl_http_request_duration_seconds_count",
                 route=chat) == 6
    routes = {s.labels["route"] for s in durations.samples}
    assert routes <= {chat, "/metrics", "other"} and "/no/such/path" not in routes
    # each engine request lies inside its HTTP request, a stream's up to its last event (or its abort)
    http_s = value(m, "internvl_http_request_duration_seconds", "internvl_http_request_duration_seconds_sum",
                   route=chat)
    assert http_s >= value(m, "internvl_e2e_request_latency_seconds", "internvl_e2e_request_latency_seconds_sum")


def test_unauthorized_requests_are_counted_by_route():
    with served(ServerSettings(model_name=MODEL, api_key="sekrit"),
                dict(device="cpu", kv_cache_tokens=2048, max_num_seqs=2)) as srv:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        m = families(httpx.get(srv.url + "/metrics").text)
    for status in ("401", "200"):
        assert value(m, "internvl_http_requests", "internvl_http_requests_total", route="/v1/models",
                     status=status, method="GET") == 1


def test_engine_gauges(traffic, server):
    m = traffic["after"]
    assert value(m, "internvl_num_requests_running") == 0 and value(m, "internvl_num_requests_waiting") == 0
    assert value(m, "internvl_kv_cache_usage_perc") == 0
    bm = server.llm.engine.block_manager
    assert value(m, "internvl_kv_cache_blocks_total") == bm.num_blocks
    # the same prompt came back: its full blocks were found in the prefix cache
    assert 0 < value(m, "internvl_prefix_cache_hits", "internvl_prefix_cache_hits_total") <= \
        value(m, "internvl_prefix_cache_queries", "internvl_prefix_cache_queries_total")
    for name in ("internvl_num_preemptions", "internvl_mm_cache_queries", "internvl_mm_cache_hits",
                 "internvl_vision_cache_hits", "internvl_engine_healthy", "internvl_model_info"):
        assert name in m
    assert value(m, "internvl_engine_healthy") == 1


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process metrics read /proc (Linux)")
def test_process_metrics_are_this_process(server, traffic):
    """The server runs on a thread of this test process, so its process metrics are ours."""
    t0 = os.times()
    m = families(httpx.get(server.url + "/metrics").text)
    t1 = os.times()
    cpu = value(m, "process_cpu_seconds", "process_cpu_seconds_total")
    assert t0.user + t0.system - 0.02 <= cpu <= t1.user + t1.system + 0.02  # clock ticks: 10 ms
    rss = value(m, "process_resident_memory_bytes")
    vm_rss = int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    assert 0.8 < rss / vm_rss < 1.25
    assert value(m, "process_virtual_memory_bytes") >= rss
    assert abs(value(m, "process_open_fds") - len(os.listdir("/proc/self/fd"))) < 20
    assert value(m, "process_max_fds") > 0
    assert time.time() - 24 * 3600 < value(m, "process_start_time_seconds") < time.time()


def test_process_metrics_without_proc(monkeypatch):
    """Where /proc is missing (macOS, Windows) only what the standard library reads honestly is reported."""
    from internvl_engine.server import process
    monkeypatch.setattr(process, "_PROC", "/nonexistent-proc")
    got = {name: value for _, name, _, value in process.process_metrics()}
    assert set(got) <= {"process_cpu_seconds_total", "process_max_fds"} and "process_cpu_seconds_total" in got
    t = os.times()
    assert 0 < got["process_cpu_seconds_total"] <= t.user + t.system


def test_labels_and_help_are_escaped():
    name = 'we"ird\\model\nname'
    x = Exposition(name)
    x.family("counter", "odd_total", 'a help with \\ and\na newline', [({"route": 'a"b'}, 2)])
    h = Histogram((1, 2.5))
    for v in (0.5, 1, 3):
        h.observe(v)
    x.histogram("h", "h.", [(None, h)])
    fams = {f.name: f for f in parser.text_string_to_metric_families(x.text())}
    s = fams["internvl_odd"].samples[0]
    assert s.labels == {"model_name": name, "route": 'a"b'} and s.value == 2
    assert fams["internvl_odd"].documentation == 'a help with \\ and\na newline'
    got = {(s.name, s.labels.get("le")): s.value for s in fams["internvl_h"].samples}
    # 1 falls in le=1 (Prometheus' buckets are "less or equal")
    assert got[("internvl_h_bucket", "1.0")] == 2 and got[("internvl_h_bucket", "2.5")] == 2
    assert got[("internvl_h_bucket", "+Inf")] == 3 == got[("internvl_h_count", None)]
    assert got[("internvl_h_sum", None)] == 4.5


def test_token_buckets():
    assert token_buckets(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert token_buckets(4096)[-1] == 2000 and token_buckets(1) == (1,)


# ------------------------------------------------------------------------------------------------ deploy/
def _dashboard_metric_names(dashboard: dict) -> set[str]:
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    assert exprs
    # metric names are identifiers followed by a selector, a range or an operator; PromQL functions take "("
    names = set()
    for e in exprs:
        for tok in re.findall(r"\b((?:internvl|process)_[a-z_]+)\b", e):
            names.add(tok)
    return names


def test_dashboard_queries_only_exported_series(traffic):
    dashboard = json.loads((ROOT / "deploy/grafana/internvl-engine-dashboard.json").read_text())
    assert any(v.get("name") == "model_name" for v in dashboard["templating"]["list"])
    exported = {s.name for f in traffic["after"].values() for s in f.samples}
    used = _dashboard_metric_names(dashboard)
    assert used and used <= exported, sorted(used - exported)
    # each panel selects on the model_name variable
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            assert 'model_name=~"$model_name"' in t["expr"], (panel["title"], t["expr"])


# The series vLLM's own example dashboard (examples/online_serving/prometheus_grafana/grafana.json) queries: with
# "vllm:" replaced by "internvl_", a dashboard built for vLLM finds each of them here.
VLLM_DASHBOARD_SERIES = (
    "e2e_request_latency_seconds_bucket", "e2e_request_latency_seconds_sum", "e2e_request_latency_seconds_count",
    "prompt_tokens_total", "generation_tokens_total", "time_per_output_token_seconds_bucket",
    "time_per_output_token_seconds_sum", "time_per_output_token_seconds_count", "num_requests_running",
    "num_requests_waiting", "time_to_first_token_seconds_bucket", "time_to_first_token_seconds_sum",
    "time_to_first_token_seconds_count", "gpu_cache_usage_perc", "request_prompt_tokens_bucket",
    "request_generation_tokens_bucket", "request_success_total", "request_queue_time_seconds_sum",
    "request_prefill_time_seconds_sum", "request_decode_time_seconds_sum", "request_max_num_generation_tokens_sum")


def test_a_dashboard_built_for_vllm_finds_its_series(traffic):
    exported = {s.name for f in traffic["after"].values() for s in f.samples}
    assert [n for n in VLLM_DASHBOARD_SERIES if "internvl_" + n not in exported] == []


def test_prometheus_example_scrapes_metrics():
    text = (ROOT / "deploy/prometheus.yml").read_text()
    assert "metrics_path: /metrics" in text and "scrape_configs:" in text


def test_requests_the_engines_death_ends_count_as_errors_once():
    """A request still running when the engine dies ends with "error" and is counted so, once (n samples or one)."""
    from internvl_engine import LLMEngine, SamplingParams
    engine = LLMEngine(MODEL, device="cpu", kv_cache_tokens=2048, max_num_seqs=4)
    engine.add_request("one", "hello", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("two", "hello", SamplingParams(max_tokens=50, ignore_eos=True, n=2))
    engine.step()
    stats = engine.output_processor.stats
    before = dict(stats.finished)
    engine.fail("a test killed the engine")
    assert stats.finished["error"] - before["error"] == 2
    assert sum(stats.finished.values()) - sum(before.values()) == 2
    engine.shutdown()
