"""The command line (internvl_engine.cli): info, demo (cached random checkpoint) and generate, on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl_engine.cli import demo_image_path, main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from internvl_engine.loader import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


def test_demo_image_is_shipped():
    p = demo_image_path()
    assert p.is_file() and p.stat().st_size < 60_000
    from PIL import Image
    with Image.open(p) as im:
        assert im.size == (640, 400)


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("versions", "platform", "device", "extension", "kernel_backends"):
        assert key in info
    for key in ("internvl_engine", "python", "torch", "safetensors", "tokenizers", "numpy", "pillow", "jinja2"):
        assert key in info["versions"]
    assert {"cuda_available", "cpu_count"} <= set(info["device"])
    ext = info["extension"]
    assert isinstance(ext["built"], bool) and isinstance(ext["cuda_kernels"], bool) and isinstance(ext["archs"], list)
    assert "torch" in info["kernel_backends"]


def test_info_model_knows_quantized_bytes(capsys, tmp_path):
    """info --model reads config.json only: a written AWQ checkpoint and its random: preset report the same bytes,
    and AWQ's decode bytes are the dense ones' share the formats predict (linears at 0.5 + 2.5/128 of 2 bytes)."""
    from internvl_engine.loader import write_checkpoint

    write_checkpoint(tmp_path / "awq", "small-awq")
    reports = []
    for model in (str(tmp_path / "awq"), "random:small-awq", "random:small"):
        assert main(["info", "--json", "--model", model]) == 0
        reports.append(json.loads(capsys.readouterr().out)["model"])
    awq, preset, dense = reports
    assert awq["quantization"]["method"] == "awq" and awq["quantization"]["group_size"] == 128
    assert awq["weights"] == preset["weights"] and dense["quantization"] is None
    w, d = awq["weights"], dense["weights"]
    assert d["lm_decode_bytes"] == d["lm_decode_bytes_dense"] == w["lm_decode_bytes_dense"]
    linear = 2 * (128 * 128 * 2 + 2 * 128 * 64 + 3 * 128 * 256)  # layers x (q, o + k, v + gate, up, down)
    assert w["lm_decode_bytes"] == d["lm_decode_bytes"] - linear * 2 + linear * (0.5 + 2.5 / 128)
    assert main(["info", "--model", "random:small-fp8"]) == 0
    assert "(fp8)" in capsys.readouterr().out


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "kernel backends" in out


def test_demo_writes_then_reuses_cache(tmp_path, capsys):
    cache = tmp_path / "demo"
    assert main(["demo", "--cache-dir", str(cache), "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "meaningless" in out
    assert "wrote random-weight checkpoint" in out
    assert "TTFT" in out and "finish reason" in out
    files = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert {"config.json", "model.safetensors"} <= set(files)
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"]  # no temp dir left behind

    assert main(["demo", "--cache-dir", str(cache), "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "reusing cached" in out and "meaningless" in out
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == files


def test_demo_refuses_foreign_dir(tmp_path, capsys):
    (tmp_path / "something.txt").write_text("not a checkpoint")
    assert main(["demo", "--cache-dir", str(tmp_path), "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(tmp_path) in err
    assert (tmp_path / "something.txt").exists()


def test_generate_streams_and_prints_metrics(tiny_checkpoint, capsys):
    rc = main(["generate", "--model", str(tiny_checkpoint), "--image", str(demo_image_path()),
               "--max-num-tiles", "2", "--max-tokens", "4", "Hi"])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.out.strip()  # the (meaningless) answer
    for word in ("preprocess", "vision", "prefill", "decode", "TTFT", "TPOT", "prompt", "generated 4 tokens",
                 "finish reason: length"):
        assert word in cap.err


def test_generate_sampling_options(tiny_checkpoint, capsys):
    rc = main(["generate", "--model", str(tiny_checkpoint), "--max-tokens", "3", "--temperature", "0.8",
               "--top-p", "0.9", "--top-k", "50", "--seed", "1", "Hello"])
    assert rc == 0
    assert "generated 3 tokens" in capsys.readouterr().err


def test_generate_missing_image(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    rc = main(["generate", "--model", str(tiny_checkpoint), "--image", str(missing), "Hi"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(missing) in err and "Traceback" not in err


def test_generate_missing_model(capsys):
    rc = main(["generate", "--model", "/nonexistent", "Hi"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "/nonexistent" in err


def test_generate_bad_sampling_params(tiny_checkpoint, capsys):
    rc = main(["generate", "--model", str(tiny_checkpoint), "--top-p", "0", "Hi"])
    assert rc == 2
    assert "top_p" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "internvl_engine", "info", "--json"], capture_output=True, text=True,
                       cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kernel_backends" in json.loads(r.stdout)


# ---------------------------------------------------------------------------------------------- load progress
@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint split into three shards and an index, as the hub stores the larger models."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("sharded") / "tiny"
    shutil.copytree(tiny_checkpoint, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    keys, weight_map = sorted(tensors), {}
    for i in range(3):
        name = f"model-0000{i + 1}-of-00003.safetensors"
        part = keys[i::3]
        save_file({k: tensors[k] for k in part}, str(dst / name))
        weight_map.update(dict.fromkeys(part, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_loading_logs_every_shard_and_the_total_bytes(sharded_checkpoint, caplog):
    import logging

    from internvl_engine import LLM

    shards = sorted(sharded_checkpoint.glob("model-*.safetensors"))
    with caplog.at_level(logging.INFO, logger="internvl_engine.progress"):
        LLM(sharded_checkpoint, device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "internvl_engine.progress"]
    assert len(lines) == len(shards) + 1
    for i, (line, shard) in enumerate(zip(lines, shards)):
        assert line.startswith(f"loaded shard {i + 1}/3 {shard.name} (")
    total = sum(s.stat().st_size for s in shards)
    assert lines[-1].startswith("loaded checkpoint: 3 shards,") and f"({total} bytes)" in lines[-1]


class _Terminal:
    """A stderr that says it is a terminal (tqdm draws only on one) and keeps what is written."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


@pytest.mark.parametrize("on", [True, False])
def test_loading_draws_a_bar_on_a_terminal_unless_turned_off(sharded_checkpoint, monkeypatch, on):
    from internvl_engine import LLM, progress

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(progress, "_enabled", None)
    monkeypatch.setenv("INTERNVL_ENGINE_PROGRESS", "1" if on else "0")
    LLM(sharded_checkpoint, device="cpu")
    if on:
        assert "loading checkpoint" in terminal.text and "shard 3/3" in terminal.text
    else:
        assert terminal.text == ""


# ---------------------------------------------------------------------------------------------- flags from settings
def _subparser(command: str):
    from internvl_engine.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[command]


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_settings_field_meant_as_a_flag_has_one_with_its_default(command):
    import dataclasses

    from internvl_engine.settings import EngineConfig
    from internvl_engine.settings import ServerSettings

    parser = _subparser(command)
    by_dest = {a.dest: a for a in parser._actions}
    classes = (EngineConfig, ServerSettings) if command == "serve" else (EngineConfig,)
    skip = {"generate": {"consumer_timeout_s"}, "serve": set()}[command]  # AsyncLLM's: serve alone
    flagged = [f for cls in classes for f in dataclasses.fields(cls) if "flag" in f.metadata and f.name not in skip]
    # the flags the hand-written parsers had (scripts and the README use them) are all still there
    engine = {"--dtype", "--device", "--backend", "--enforce-eager", "--tensor-parallel-size"}
    before = {"generate": engine, "serve": engine | {
        "--max-model-len", "--kv-cache-tokens", "--gpu-memory-utilization", "--max-num-seqs",
        "--max-num-batched-tokens", "--no-prefix-caching", "--tensor-parallel-timeout", "--consumer-timeout",
        "--served-model-name", "--api-key", "--max-waiting", "--allowed-local-media-path", "--allowed-media-domains",
        "--allow-private-media-networks", "--max-media-bytes", "--media-fetch-timeout", "--max-request-bytes",
        "--default-max-tokens", "--max-json-depth", "--max-prompts", "--max-prompt-chars", "--stream-stall-timeout"}}
    assert before[command] <= {f.metadata["flag"] for f in flagged}
    for f in flagged:
        action = by_dest[f.name]
        assert action.option_strings == [f.metadata["flag"]], f.name
        assert action.help and "%" not in action.help.replace("%%", ""), f.name
        if f.default is dataclasses.MISSING:  # ServerSettings.model_name: the --model value unless given
            assert action.default is None
        else:
            assert action.default == f.default, f.name
    # fields without a flag stay off the command line
    unflagged = {f.name for f in dataclasses.fields(EngineConfig) if "flag" not in f.metadata}
    assert unflagged == {"model", "seed", "block_size", "vision_cache_bytes", "media_policy", "max_prompt_chars"}
    # (--model is the engine's model; generate's --seed seeds sampling; serve's --max-prompt-chars is the server's)
    assert not (unflagged - {"model", "seed", "max_prompt_chars"}) & set(by_dest)


def test_flag_help_names_only_files_that_exist():
    """A setting's help that points into the code (a module, a room) points at one that exists: the package's
    rooms moved in issue 3.1 (--tensor-parallel-size named distributed/, which is gone)."""
    import dataclasses
    import re

    from internvl_engine.settings import EngineConfig, ServerSettings

    root = Path(__file__).resolve().parents[1]
    for cls in (EngineConfig, ServerSettings):
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "")
            for ref in re.findall(r"(?<![\w./:-])((?:\w+/)+|\w+\.py)(?![\w/])", text):
                assert any((base / ref).exists() for base in (root / "internvl_engine", root)), (f.name, ref)


def test_serve_flags_give_the_settings_the_hand_written_flags_gave(monkeypatch):
    """A full serve command line against the objects the hand-written flags built before issue 3.1."""
    from internvl_engine.cli import build_parser, serve_settings
    from internvl_engine.processor.media import MediaPolicy
    from internvl_engine.settings import ServerSettings

    monkeypatch.delenv("INTERNVL_ENGINE_API_KEY", raising=False)
    argv = ["serve", "--model", "random:tiny", "--host", "0.0.0.0", "--port", "9000", "--served-model-name", "m",
            "--api-key", "k", "--max-waiting", "7", "--shutdown-timeout", "3", "--allowed-local-media-path", "/srv",
            "--allowed-media-domains", "a.com, b.org,", "--allow-private-media-networks", "--max-media-bytes", "999",
            "--media-fetch-timeout", "2.5", "--max-request-bytes", "12345", "--default-max-tokens", "17",
            "--max-json-depth", "9", "--max-prompts", "3", "--max-prompt-chars", "0", "--stream-stall-timeout", "0",
            "--consumer-timeout", "0", "--tensor-parallel-timeout", "11", "--dtype", "bfloat16", "--device", "cpu",
            "--backend", "torch", "--enforce-eager", "--tensor-parallel-size", "2", "--max-model-len", "512",
            "--kv-cache-tokens", "4096", "--gpu-memory-utilization", "0.5", "--max-num-seqs", "8",
            "--max-num-batched-tokens", "1024", "--no-prefix-caching", "--log-level", "debug", "--access-log",
            "--loop", "asyncio"]
    args = build_parser().parse_args(argv)
    settings, engine = serve_settings(args)
    expected = ServerSettings(
        model_name="m", api_key="k", max_waiting=7, max_request_bytes=12345, default_max_tokens=17,
        allowed_local_media_path="/srv", allowed_media_domains=("a.com", "b.org"), allow_private_media_networks=True,
        max_media_bytes=999, media_fetch_timeout_s=2.5, max_json_depth=9, max_prompts=3, max_prompt_chars=None,
        stream_stall_timeout_s=None)
    assert settings == expected
    assert engine == dict(
        dtype="bfloat16", device="cpu", backend="torch", quant_backend=None, enforce_eager=True, vision_graphs=False,
        decode_path="default", max_model_len=512, kv_cache_tokens=4096, gpu_memory_utilization=0.5, max_num_seqs=8,
        max_num_batched_tokens=1024, enable_prefix_caching=False, media_policy=expected.media_policy(),
        tensor_parallel_size=2, tensor_parallel_timeout_s=11.0, consumer_timeout_s=None)
    assert isinstance(engine["media_policy"], MediaPolicy) and engine["media_policy"].max_download_bytes == 999
    assert (args.host, args.port, args.shutdown_timeout, args.log_level, args.access_log, args.loop) == \
        ("0.0.0.0", 9000, 3.0, "debug", True, "asyncio")

    # no flags: the dataclasses' defaults, the model name from --model, the API key from the environment
    monkeypatch.setenv("INTERNVL_ENGINE_API_KEY", "env-key")
    settings, engine = serve_settings(build_parser().parse_args(["serve", "--model", "random:tiny"]))
    assert settings == ServerSettings(model_name="random:tiny", api_key="env-key")
    from internvl_engine.settings import EngineConfig
    config = EngineConfig("random:tiny", **engine)
    assert config == EngineConfig("random:tiny", media_policy=MediaPolicy.strict())


def test_generate_flags_give_the_engine_settings(tiny_checkpoint):
    from internvl_engine.cli import build_parser
    from internvl_engine.settings import EngineConfig, settings_from_args

    args = build_parser().parse_args(["generate", "--model", "m", "--seed", "5", "--dtype", "float16", "--backend",
                                      "cpp", "--enforce-eager", "--tensor-parallel-size", "2", "Hi"])
    assert args.seed == 5  # the sampling seed, not EngineConfig.seed
    engine = settings_from_args(EngineConfig, args)
    assert "seed" not in engine and "consumer_timeout_s" not in engine
    from internvl_engine.settings import EngineConfig
    assert EngineConfig("m", **engine) == EngineConfig("m", dtype="float16", backend="cpp", enforce_eager=True,
                                                       tensor_parallel_size=2)
