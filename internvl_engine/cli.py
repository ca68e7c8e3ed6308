"""Command line: `internvl-engine generate | demo | info | bench | serve | convert | tokenizer` (also `python -m
internvl_engine`)."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import CheckpointError, InternVLEngineError
from .settings import EngineConfig, ServerSettings, add_settings_flags, settings_from_args

DEMO_PROMPT = "Describe this image in detail."
DEMO_PRESET = "tiny"
RANDOM_WARNING = ("NOTE: this demo uses a tiny model with RANDOM weights (no download, no training). The text it "
                  "prints is meaningless;\nit only demonstrates the pipeline: checkpoint loading, image tiling, "
                  "vision tower, projector and KV-cached decoding.")


# ---------------------------------------------------------------------------------------------------- helpers
def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _format_metrics(output) -> str:
    m = output.metrics
    return (f"preprocess {m.preprocess_s:.3f} s | vision {m.vision_s:.3f} s | prefill {m.prefill_s:.3f} s | "
            f"decode {m.decode_s:.3f} s\n"
            f"TTFT {m.ttft_s * 1e3:.1f} ms | TPOT {m.tpot_s * 1e3:.1f} ms | prompt {m.prompt_tokens} tokens | "
            f"generated {m.generated_tokens} tokens | images {m.num_images} ({m.num_tiles} tiles) | "
            f"finish reason: {output.finish_reason}")


def _stream(llm, conversation, params, metrics_file) -> object:
    """Streams the answer to stdout, then prints metrics (after a blank line) on `metrics_file`."""
    stream = llm.stream(conversation, params)
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print("", file=metrics_file)
    print(_format_metrics(stream.output), file=metrics_file, flush=True)
    return stream.output


def demo_image_path() -> Path:
    try:
        from importlib.resources import files
        p = Path(str(files("internvl_engine") / "assets" / "demo.png"))
        if p.is_file():
            return p
    except Exception:  # pragma: no cover - odd installs
        pass
    return Path(__file__).resolve().parent / "assets" / "demo.png"


def default_demo_dir() -> Path:
    root = os.environ.get("INTERNVL_ENGINE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "internvl-engine"
    return base / f"demo-{DEMO_PRESET}"


def _is_checkpoint(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def ensure_demo_checkpoint(directory: Path) -> tuple[Path, bool]:
    """Returns (checkpoint dir, created). Writes into a temp dir beside it, then renames it into place."""
    directory = Path(directory).expanduser()
    if _is_checkpoint(directory):
        return directory, False
    if directory.exists():
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        else:
            raise CheckpointError(f"{directory}: exists but is not a complete checkpoint (config.json + "
                                  "model.safetensors); remove it or pass another --cache-dir")
    directory.parent.mkdir(parents=True, exist_ok=True)
    from .loader import write_checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write_checkpoint(tmp, DEMO_PRESET, seed=0)
        try:
            os.rename(tmp, directory)
        except OSError:
            if _is_checkpoint(directory):  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return directory, False
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory, True


# ---------------------------------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from .llm import LLM
    from .sampling import SamplingParams

    for kind, paths in (("image", args.image), ("video", args.video)):
        for p in paths:
            if "://" not in p and not p.startswith("data:") and not Path(p).is_file():
                _err(f"{kind} file not found: {p}")
                return 2
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, max_num_tiles=args.max_num_tiles,
                            num_frames=args.num_frames)
    content = [{"type": "image", "path": p} for p in args.image]
    content += [{"type": "video", "path": p} for p in args.video]
    content.append({"type": "text", "text": args.prompt})
    llm = LLM(args.model, **settings_from_args(EngineConfig, args))
    _stream(llm, [{"role": "user", "content": content}], params, sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .llm import LLM
    from .sampling import SamplingParams

    print(RANDOM_WARNING, flush=True)
    t0 = time.perf_counter()
    directory = Path(args.cache_dir) if args.cache_dir else default_demo_dir()
    ckpt, created = ensure_demo_checkpoint(directory)
    verb = "wrote" if created else "reusing cached"
    print(f"\n{verb} random-weight checkpoint ({DEMO_PRESET}): {ckpt}  [{time.perf_counter() - t0:.2f} s]")
    image = demo_image_path()
    t0 = time.perf_counter()
    llm = LLM(ckpt, dtype="auto", **settings_from_args(EngineConfig, args))  # the demo's --device among them
    print(f"loaded model on {llm.device} ({str(llm.dtype).replace('torch.', '')}) in {time.perf_counter() - t0:.2f} s")
    print(f"image: {image}\nprompt: {DEMO_PROMPT}\n\nanswer (random weights):", flush=True)
    conversation = [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                                 {"type": "text", "text": DEMO_PROMPT}]}]
    _stream(llm, conversation, SamplingParams(max_tokens=args.max_tokens), sys.stdout)
    print("\nReminder: the weights are random, so the answer above is meaningless text; the run shows that every "
          "stage of the pipeline works.\nFor real answers: internvl-engine generate --model "
          "OpenGVLab/InternVL3-1B-hf --image PATH \"PROMPT\"", flush=True)
    return 0


def _version(module: str, attr: str = "__version__"):
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, attr, "unknown"))


def extension_info() -> dict:
    from .ops import load_extension

    ext, why = load_extension()
    if ext is None:
        return {"built": False, "cuda_kernels": False, "archs": [], "error": why}
    return {"built": True, "cuda_kernels": bool(getattr(ext, "CUDA_KERNELS", False)),
            "archs": [str(a) for a in (getattr(ext, "CUDA_ARCHS", None) or [])]}


def collect_info() -> dict:
    from . import ops
    from ._version import __version__

    versions = {"internvl_engine": __version__, "python": platform.python_version()}
    for name, module in (("torch", "torch"), ("safetensors", "safetensors"), ("tokenizers", "tokenizers"),
                         ("numpy", "numpy"), ("pillow", "PIL"), ("jinja2", "jinja2"), ("av", "av"),
                         ("triton", "triton")):
        v = _version(module)
        if v is not None or name not in ("av", "triton"):
            versions[name] = v
    device = {"cpu_count": os.cpu_count(), "cuda_available": False, "cuda_version": None, "devices": []}
    try:
        import torch
        device["cuda_version"] = torch.version.cuda
        device["cuda_available"] = bool(torch.cuda.is_available())
        if device["cuda_available"]:
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                device["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                          "memory_gib": round(p.total_memory / 2 ** 30, 2)})
    except Exception as e:  # pragma: no cover - broken torch installs
        device["error"] = str(e)
    return {"versions": versions,
            "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                         "platform": platform.platform()},
            "device": device, "extension": extension_info(), "kernel_backends": ops.available_backends(),
            "kernel_defaults": {d: ops.resolve("auto", d) for d in ("cpu", "cuda")
                                if d == "cpu" or device["cuda_available"]}}


def model_info(model: str, dtype: str) -> dict:
    """The --model part of `info`: format, quantization block and byte counts (bench/floors.weight_summary)."""
    import torch

    from .bench.floors import weight_summary
    from .config import load_model_config
    from .settings import DTYPES, EngineConfigError

    config, _ = load_model_config(model)
    if dtype not in DTYPES:
        raise EngineConfigError(f"--dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    quant, t = config.quant, config.text
    return {"model": model,
            "decoder": {"family": t.model_type, "layers": t.num_hidden_layers, "hidden_size": t.hidden_size,
                        "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
                        "qk_norm": t.qk_norm, "tied_lm_head": config.lm_head_may_tie, "vocab_size": t.vocab_size,
                        "max_model_len": config.max_model_len, "image_token_id": config.image_token_id},
            "quantization": None if quant is None else {"method": quant.method, "bits": quant.bits,
                                                        "group_size": quant.group_size or None,
                                                        "ignore": list(quant.ignore)},
            "weights": weight_summary(config, torch.empty((), dtype=DTYPES[dtype]).element_size())}


def cmd_info(args) -> int:
    info = collect_info()
    if args.model is not None:
        info["model"] = model_info(args.model, args.dtype)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:")
    for k, v in info["versions"].items():
        print(f"  {k:16s} {v if v is not None else 'not installed'}")
    print(f"platform:          {info['platform']['platform']}")
    d = info["device"]
    print(f"cpu count:         {d['cpu_count']}")
    print(f"cuda available:    {d['cuda_available']} (torch built with CUDA {d['cuda_version']})")
    for dev in d["devices"]:
        print(f"  cuda:{dev['index']} {dev['name']}, capability {dev['capability']}, {dev['memory_gib']} GiB")
    e = info["extension"]
    print(f"extension (_C):    built={e['built']} cuda_kernels={e['cuda_kernels']} archs={e['archs']}")
    print(f"kernel backends:   {', '.join(info['kernel_backends'])}")
    if "model" in info:
        m, w = info["model"], info["model"]["weights"]
        print(f"model:             {m['model']} ({(m['quantization'] or {}).get('method', 'unquantized')})")
        dec = m["decoder"]
        print(f"  decoder: {dec['family']}, {dec['layers']} layers x {dec['hidden_size']}, {dec['heads']} heads / "
              f"{dec['kv_heads']} KV heads of {dec['head_dim']}{', q/k norm' if dec['qk_norm'] else ''}, "
              f"{'tied' if dec['tied_lm_head'] else 'untied'} lm_head, vocabulary {dec['vocab_size']}, "
              f"max_model_len {dec['max_model_len']}")
        if w["moe"]:
            e = w["moe"]
            print(f"  experts: {e['experts']} routed, top-{e['experts_per_token']}"
                  f"{' (renormalised)' if e['norm_topk_prob'] else ''}, expert width {e['expert_width']}, in "
                  f"{e['moe_layers']} of {dec['layers']} layers; active {e['lm_active_params'] / 1e9:.2f}B of "
                  f"{e['lm_total_params'] / 1e9:.2f}B LM parameters (with vision {e['active_params'] / 1e9:.2f}B of "
                  f"{e['total_params'] / 1e9:.2f}B)")
            print(f"  LM bytes a decode step reads: {w['lm_decode_bytes'] / 1e9:.3f} GB at batch 1 "
                  f"({e['experts_per_token']} experts a layer; every expert: {w['lm_weight_bytes_all'] / 1e9:.3f} GB)")
        else:
            print(f"  LM bytes a decode step reads: {w['lm_decode_bytes'] / 1e9:.3f} GB "
                  f"(dense at {w['activation_dtype_bytes']} bytes: {w['lm_decode_bytes_dense'] / 1e9:.3f} GB)")
        print(f"  vision bytes per forward:     {w['vision_bytes'] / 1e9:.3f} GB")
    return 0


def cmd_bench(args) -> int:
    """`internvl-engine bench ...`: every argument goes to the end-to-end harness (internvl_engine.bench.e2e)."""
    from .bench.e2e import main as bench_main

    bench_main(args.bench_args, prog="internvl-engine bench")
    return 0


def serve_settings(args):
    """(ServerSettings, the engine's keyword arguments) the serve command's flags ask for."""
    kwargs = settings_from_args(ServerSettings, args)
    kwargs["model_name"] = kwargs["model_name"] or str(args.model)
    kwargs["api_key"] = kwargs["api_key"] or os.environ.get("INTERNVL_ENGINE_API_KEY") or None
    settings = ServerSettings(**kwargs)
    return settings, {**settings_from_args(EngineConfig, args), "media_policy": settings.media_policy()}


def cmd_serve(args) -> int:
    """`internvl-engine serve --model M`: the OpenAI-compatible HTTP server (needs the `serve` extra)."""
    try:
        from .server import serve
    except ImportError as e:
        _err(f"the server needs the serve extra (pip install 'internvl-engine[serve]'): {e}")
        return 2
    from .engine.async_llm import AsyncLLM

    settings, engine_args = serve_settings(args)
    llm = AsyncLLM(args.model, **engine_args)
    print(f"internvl-engine serve: {settings.model_name} on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    return serve(llm, settings, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
                 log_level=args.log_level, access_log=args.access_log, loop=args.loop)


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, completions, models, "
                                     "health, metrics)")
    s.add_argument("--model", required=True, help=_engine_config_help("model"))
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds requests in flight may take to finish before they are aborted "
                        "(default: 30)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--access-log", action="store_true", help="log every HTTP request")
    s.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                   help="event loop (auto: uvloop when installed)")
    _add_progress_flag(s)
    add_settings_flags(s.add_argument_group("server settings (ServerSettings)"), ServerSettings)
    add_settings_flags(s.add_argument_group("engine settings (EngineConfig)"), EngineConfig)
    s.set_defaults(func=cmd_serve)


def _engine_config_help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(EngineConfig) if f.name == name)


def _add_progress_flag(parser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar while the checkpoint loads (the log still gets a line per shard; "
                             "also INTERNVL_ENGINE_PROGRESS=0)")


# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="internvl-engine", description="InternVL3 inference engine.")
    parser.add_argument("--version", action="version", version=f"internvl-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{generate,demo,info,bench,serve,convert}")
    sub.required = True

    g = sub.add_parser("generate", help="answer a prompt about images / videos, streaming the text")
    g.add_argument("--model", required=True, help=_engine_config_help("model"))
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="image file or URL (repeatable)")
    g.add_argument("--video", action="append", default=[], metavar="PATH", help="video file (repeatable)")
    g.add_argument("--num-frames", type=int, default=None, metavar="N", help="frames sampled from each video")
    g.add_argument("--max-tokens", type=int, default=256, metavar="N")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P")
    g.add_argument("--top-k", type=int, default=0, metavar="K")
    g.add_argument("--seed", type=int, default=None, metavar="S")
    g.add_argument("--max-num-tiles", type=int, default=None, metavar="N")
    g.add_argument("prompt", metavar="PROMPT")
    _add_progress_flag(g)
    # consumer_timeout_s is AsyncLLM's (serve); generate streams from LLM
    add_settings_flags(g.add_argument_group("engine settings (EngineConfig)"), EngineConfig,
                       skip=("consumer_timeout_s",))
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="run the shipped demo image through a tiny RANDOM-weight model (no download)")
    d.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where the demo checkpoint is written once and reused "
                        "(default: $INTERNVL_ENGINE_CACHE/demo-tiny or ~/.cache/internvl-engine/demo-tiny)")
    d.add_argument("--max-tokens", type=int, default=32, metavar="N")
    d.add_argument("--device", default="cpu", metavar="D", help="default: cpu")
    _add_progress_flag(d)
    # the demo's own --device default (cpu) and dtype (auto) stay; these are the engine's
    add_settings_flags(d, EngineConfig, only=("backend", "enforce_eager", "tensor_parallel_size"))
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="versions, platform, devices, compiled extension and kernel backends")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--model", default=None, metavar="M",
                   help="also describe a model (checkpoint dir or random:<preset>): its format (dense, AWQ, FP8) "
                        "and the weight bytes each stage reads; reads config.json only, no weights")
    i.add_argument("--dtype", default="bfloat16", metavar="T", help="activation dtype for --model (default bfloat16)")
    i.set_defaults(func=cmd_info)

    # The harness owns its flags (internvl_engine.bench.e2e.build_parser): everything after `bench` is forwarded,
    # --help included (main() collects them with parse_known_args).
    b = sub.add_parser("bench", add_help=False,
                       help="end-to-end benchmark: TTFT/TPOT/throughput per batch size vs floors and transformers "
                            "(bench --help for its flags)")
    b.set_defaults(func=cmd_bench, bench_args=[])
    _add_serve_parser(sub)

    c = sub.add_parser("convert", help="rewrite a pickle .bin checkpoint (pytorch_model*.bin) as safetensors, once")
    c.add_argument("src", metavar="SRC", help="checkpoint directory with pytorch_model*.bin")
    c.add_argument("dst", metavar="DST", help="new directory for the safetensors checkpoint")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("tokenizer", help="write a model's tokenizer files (tokenizer.json, tokenizer_config.json "
                                         "with its chat template, special_tokens_map.json) for transformers' "
                                         "AutoTokenizer: what guidellm and `vllm bench serve` load by path")
    t.add_argument("--model", required=True, metavar="M", help="checkpoint dir or random:<preset>")
    t.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if missing)")
    t.set_defaults(func=cmd_tokenizer)
    return parser


def cmd_convert(args) -> int:
    from .loader import convert_bin_to_safetensors

    written = convert_bin_to_safetensors(args.src, args.dst)
    print(f"wrote {len(written)} safetensors file(s) to {args.dst}")
    return 0


def cmd_tokenizer(args) -> int:
    """The tokenizer the engine runs the model with (a random preset's built-in one, or the checkpoint's), and the
    chat template it renders prompts with; config.json is read, no weights."""
    from .config import load_model_config
    from .processor import Processor
    from .processor.files import write_tokenizer_files
    from .processor.tokenizer import builtin_tokenizer_json

    config, checkpoint = load_model_config(args.model)
    processor = (Processor.from_parts(builtin_tokenizer_json(config), None, model_config=config) if checkpoint is None
                 else Processor.from_pretrained(checkpoint, model_config=config))
    written = write_tokenizer_files(args.out, json.loads(processor.tokenizer.backend.to_str()),
                                    processor.template.source, config.max_model_len)
    print(f"wrote {', '.join(p.name for p in written)} to {args.out}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("generate", "demo", "serve", "bench"):  # they load checkpoints: a log line per shard
        from . import progress
        progress.log_to_stderr()
        progress.set_enabled(False if getattr(args, "no_progress", False) else None)
    try:
        return args.func(args)
    except InternVLEngineError as e:
        sys.stdout.flush()
        _err(str(e))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
