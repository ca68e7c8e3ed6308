"""EngineConfig: every engine setting with its one default, validated once where it is built; LLM, AsyncLLM,
LLMEngine and the CLI pass it down instead of repeating keyword defaults; ServerSettings, what the server adds. The
command-line flags of both are generated from their fields (add_settings_flags). Also the resolution of what the
settings name (device, dtype); the checkpoint a model name stands for is config's (config.load_model_config)."""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .errors import BackendError, InternVLEngineError
from .ops import OpTable, resolve
from .processor.media import MediaPolicy

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
DECODE_PATHS = ("default", "fused")  # EngineConfig.decode_path


class EngineConfigError(InternVLEngineError, ValueError):
    """An engine setting is out of range or of the wrong type."""


def _int(name: str, value, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise EngineConfigError(f"{name} must be {'None or ' if optional else ''}an integer >= {minimum}, "
                                f"got {value!r}")


def setting(default, *, help: str, flag: str | None = None, metavar: str | None = None, **more):
    """A settings field with its command-line face in the field's metadata, read by add_settings_flags: `flag`
    (absent: not a flag), `help`, `metavar`, `zero_is_none` (the flag's 0 means the field's None) and `comma_list`
    (the flag's "a,b" is a tuple). The dataclass default is the flag's default, so a default is written once, here."""
    meta = {"help": help, "flag": flag, "metavar": metavar, **more}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


@dataclass(frozen=True)
class EngineConfig:
    """Each field's help is its documentation; fields with a `flag` are the CLI's engine flags (generate, serve)."""
    model: str | os.PathLike = field(metadata={
        "help": "checkpoint directory, hub id (needs the hub extra) or random:<preset>"})
    dtype: str | torch.dtype = setting(
        "auto", flag="--dtype", help="auto (fp32 on CPU, checkpoint dtype on GPU, bf16 if it names none), bfloat16, "
        "float16, float32")
    device: str | torch.device | None = setting(
        None, flag="--device", metavar="D", help="cpu, cuda, cuda:N (default: cuda if available)")
    max_model_len: int | None = setting(
        None, flag="--max-model-len", metavar="N",
        help="longest sequence in tokens (default: the model's context, RoPE scaling included)")
    seed: int = setting(0, help="seed of random:<preset> weights")  # no flag: generate's --seed seeds sampling
    block_size: int = setting(16, help="tokens per KV block")
    backend: str = setting("auto", flag="--backend", metavar="B",
                           help="kernel backend: auto, torch, cpp (CPU), triton, cuda")
    quant_backend: str | None = setting(
        None, flag="--quant-backend", metavar="B",
        help="backend of the quantized matmuls alone (awq_gemm, fp8_gemm), e.g. triton for the W4A16 / FP8 Triton "
             "kernels (default: --backend's choice)")
    kv_cache_tokens: int | None = setting(
        None, flag="--kv-cache-tokens", metavar="N",
        help="KV pool size in tokens (default: 16384 on the CPU, --gpu-memory-utilization on CUDA)")
    gpu_memory_utilization: float = setting(0.9, flag="--gpu-memory-utilization", metavar="F",
                                            help="share of free GPU memory the KV pool takes")
    max_num_seqs: int = setting(64, flag="--max-num-seqs", metavar="N", help="sequences running at once")
    max_num_batched_tokens: int = setting(8192, flag="--max-num-batched-tokens", metavar="N",
                                          help="prefill tokens per step (chunked prefill)")
    enable_prefix_caching: bool = setting(True, flag="--no-prefix-caching",  # a True default: the flag turns it off
                                          help="reuse the KV blocks of shared prompt prefixes")
    vision_cache_bytes: int | None = setting(
        None, help="bytes of projector outputs kept (LRU; default: 256 MiB on CUDA, 64 MiB on the CPU)")
    enforce_eager: bool = setting(False, flag="--enforce-eager", help="decode without CUDA graphs")
    vision_graphs: bool = setting(  # opt-in until a device run shows them equal
        False, flag="--vision-graphs",
        help="the vision tower from CUDA graphs (opt-in until a device run shows them equal to eager)")
    decode_path: str = setting(  # opt-in until a device run measures it (issue 3.6)
        "default", flag="--decode-path", metavar="P",
        help="decode forward: default, or fused (batches of 1-8; with CUDA graphs the sampler runs inside the "
             "decode graph); fused is opt-in until a device run measures it")
    tensor_parallel_size: int = setting(
        1, flag="--tensor-parallel-size", metavar="N",
        help="ranks the language model is sharded over (parallel.py, worker/); one process per rank, or torchrun's "
             "processes (README: tensor parallelism)")
    tensor_parallel_timeout_s: float = setting(  # a hung worker, not a slow step
        300.0, flag="--tensor-parallel-timeout", metavar="S",
        help="bound on every wait for another tensor-parallel rank (a collective, a whole step); past it the engine "
             "is dead")
    media_policy: MediaPolicy | None = setting(  # the server passes .strict(), opened by its flags
        None, help="what media a request may name; None: a trusted caller (processor.MediaPolicy())")
    consumer_timeout_s: float | None = setting(
        60.0, flag="--consumer-timeout", metavar="S", zero_is_none=True,
        help="AsyncLLM: abort a request (SlowConsumerError) whose consumer takes no output for S seconds while "
             "outputs wait (0: never)")
    max_prompt_chars: int | None = setting(  # no flag: serve's --max-prompt-chars is ServerSettings'
        None, help="refuse (PromptError) a request with more text characters (its text parts, or a raw prompt), "
                   "before it is rendered or tokenised; None: only what cannot fit in max_model_len tokens")

    def __post_init__(self):
        _int("max_model_len", self.max_model_len, 2, optional=True)
        _int("seed", self.seed, 0)
        _int("block_size", self.block_size)
        _int("max_num_seqs", self.max_num_seqs)
        _int("max_num_batched_tokens", self.max_num_batched_tokens, self.block_size)
        _int("kv_cache_tokens", self.kv_cache_tokens, self.block_size, optional=True)
        _int("vision_cache_bytes", self.vision_cache_bytes, 0, optional=True)
        _int("tensor_parallel_size", self.tensor_parallel_size)
        _int("max_prompt_chars", self.max_prompt_chars, optional=True)
        t = self.tensor_parallel_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise EngineConfigError(f"tensor_parallel_timeout_s must be a number of seconds > 0, got {t!r}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise EngineConfigError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        t = self.consumer_timeout_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise EngineConfigError(f"consumer_timeout_s must be None or a number > 0, got {t!r}")
        if self.media_policy is not None and not isinstance(self.media_policy, MediaPolicy):
            raise EngineConfigError(f"media_policy must be a MediaPolicy, got {type(self.media_policy).__name__}")
        if not isinstance(self.backend, str):
            raise EngineConfigError(f"backend must be a string, got {self.backend!r}")
        if self.quant_backend is not None and self.quant_backend not in ("torch", "cpp", "triton", "cuda"):
            raise EngineConfigError(f"quant_backend must be None or one of torch, cpp, triton, cuda; got "
                                    f"{self.quant_backend!r}")
        if self.decode_path not in DECODE_PATHS:
            raise EngineConfigError(f"decode_path must be one of {', '.join(DECODE_PATHS)}; got {self.decode_path!r}")
        if not isinstance(self.dtype, torch.dtype) and self.dtype != "auto" and self.dtype not in DTYPES:
            raise EngineConfigError(f"dtype {self.dtype!r} is not supported; use one of auto, {sorted(DTYPES)}")

    def op_table(self, device: torch.device):
        """The kernel table an engine (and each tensor-parallel worker) builds its model with; an unavailable
        backend fails here, before any weight is read."""
        binding = resolve(self.backend, device)
        if self.quant_backend is None:
            return OpTable(binding, self.backend)
        quant = resolve(self.quant_backend, device)
        return OpTable(binding | {op: quant[op] for op in ("awq_gemm", "fp8_gemm")})


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device} requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise BackendError(f"device type {device.type!r} is not supported (cpu, cuda)")
    return device


def resolve_dtype(dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto": fp32 on the CPU (bf16 matmuls are slow there), else the checkpoint's dtype, bf16 if it names none."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return DTYPES.get(str(config.torch_dtype).replace("torch.", ""), torch.bfloat16)


# ------------------------------------------------------------------------------------------------ flags
# The parsed value of a field's flag lands on args.<field name>; settings_from_args turns the namespace back into the
# dataclass's keyword arguments. Used by the CLI (generate, demo, serve) and the benchmark harness.
def _show(value) -> str:
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value >> 20} MiB"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _scalar(hint) -> type:
    """The type a flag's text is parsed as: the first of bool, int, float, str in the field's annotation."""
    args = typing.get_args(hint) or (hint,)
    return next((t for t in (bool, int, float, str) if t in args), str)


def add_settings_flags(parser, cls, only=None, skip=(), defaults_in_help: bool = True) -> None:
    """Adds a flag for every field of the settings dataclass `cls` whose metadata names one (`only`: just these
    fields; `skip`: not these). defaults_in_help=False for a parser whose formatter adds them itself."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "flag" not in meta or f.name in skip or (only is not None and f.name not in only):
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        text = meta["help"]
        if defaults_in_help and default is not None and not isinstance(default, bool) and "default" not in text:
            text += f" (default: {_show(default)})"
        kind = _scalar(hints[f.name])
        if kind is bool:  # a switch away from the default
            if default:
                text = f"turn off (on by default): {text}"
            parser.add_argument(meta["flag"], dest=f.name, action="store_false" if default else "store_true",
                                help=text.replace("%", "%%"))
        else:
            parser.add_argument(meta["flag"], dest=f.name, type=kind, default=default, metavar=meta.get("metavar"),
                                help=text.replace("%", "%%"))


def settings_from_args(cls, args) -> dict:
    """Keyword arguments of `cls` from the flags add_settings_flags added (those the namespace holds)."""
    out = {}
    for f in dataclasses.fields(cls):
        if "flag" not in f.metadata or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.metadata.get("zero_is_none") and value == 0:
            value = None
        if f.metadata.get("comma_list") and value is not None:
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        out[f.name] = value
    return out


# ------------------------------------------------------------------------------------------------ server
MiB = 1 << 20


_STRICT = MediaPolicy.strict()  # what the media flags open up from; their help quotes its values


@dataclass(frozen=True)
class ServerSettings:
    """What the server adds to the engine's settings: the serve command's server flags (add_settings_flags reads
    each field's `flag`, `help` and default, `setting` above)."""
    model_name: str = field(metadata={"flag": "--served-model-name", "metavar": "NAME", "help":
                                      "the model name clients send and /v1/models lists (default: the --model value)"})
    api_key: str | None = setting(
        None, flag="--api-key", metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $INTERNVL_ENGINE_API_KEY, else none)")
    max_waiting: int | None = setting(
        1024, flag="--max-waiting", metavar="N",
        help="answer 429 when admitting a request would make more than N wait for the scheduler")
    max_request_bytes: int = setting(64 * MiB, flag="--max-request-bytes", metavar="N",
                                     help="413 for a larger request body")
    default_max_tokens: int = setting(1024, flag="--default-max-tokens", metavar="N",
                                      help="max_tokens of chat requests that give none (nor max_completion_tokens)")
    allowed_local_media_path: str | None = setting(
        None, flag="--allowed-local-media-path", metavar="DIR",
        help="allow local media files (paths, file:// URLs) under DIR (default: none)")
    allowed_media_domains: tuple[str, ...] | None = setting(
        None, flag="--allowed-media-domains", metavar="A,B", comma_list=True,
        help="media URLs only from these hosts and their subdomains (default: any public host)")
    allow_private_media_networks: bool = setting(
        False, flag="--allow-private-media-networks",
        help="let media URLs reach loopback and private addresses (default: refused)")
    max_media_bytes: int | None = setting(
        None, flag="--max-media-bytes", metavar="N",
        help=f"bytes per media download and per data: URI (default: {_STRICT.max_download_bytes // MiB} MiB)")
    media_fetch_timeout_s: float | None = setting(
        None, flag="--media-fetch-timeout", metavar="S",
        help=f"seconds per media URL fetch (default: {_STRICT.fetch_timeout_s:g})")
    max_json_depth: int = setting(64, flag="--max-json-depth", metavar="N",  # (chat: 5)
                                  help="400 for a request body nesting arrays/objects deeper")
    max_prompts: int = setting(256, flag="--max-prompts", metavar="N",
                               help="400 for a completions request with more prompts")
    max_prompt_chars: int | None = setting(
        1_000_000, flag="--max-prompt-chars", metavar="N", zero_is_none=True,
        help="400 for more text characters in one request, before tokenising (0: off)")
    stream_stall_timeout_s: float | None = setting(
        60.0, flag="--stream-stall-timeout", metavar="S", zero_is_none=True,
        help="cut off a streaming client that takes no data for S seconds (0: never)")
    reasoning_parser: str = setting(
        "auto", flag="--reasoning-parser", metavar="P",
        help="split a chat answer's <think>...</think> block into reasoning_content: auto (for models with a "
             "thinking mode: InternVL3.5, or a chat template with enable_thinking), think (always; vLLM's names "
             "qwen3 and deepseek_r1 mean the same), none (never: the block stays in content)")

    def media_policy(self) -> MediaPolicy:
        """The strict media policy (MediaPolicy.strict) opened only as far as the flags say."""
        changes = {"local_media_root": self.allowed_local_media_path,
                   "allow_private_networks": self.allow_private_media_networks}
        if self.allowed_media_domains is not None:
            changes["allowed_domains"] = tuple(self.allowed_media_domains)
        if self.max_media_bytes is not None:
            changes["max_download_bytes"] = changes["max_data_uri_bytes"] = self.max_media_bytes
        if self.media_fetch_timeout_s is not None:
            changes["fetch_timeout_s"] = self.media_fetch_timeout_s
        return MediaPolicy.strict(**changes)
