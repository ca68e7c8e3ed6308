"""One engine's tensor-parallel group: this process's rank, the number of ranks, how each sharded dimension is
split, and the collectives the parallel layers call. Two process groups per engine, built from one store:
`device` carries activations (NCCL on CUDA, gloo on the CPU: the same calls) and `control` (gloo, on the CPU)
carries the driver's step messages. The groups belong to the engine, not to the process (no default group), so a
process may hold an N=1 and an N=2 engine side by side. With size 1 nothing is built and every collective is the
identity."""
from __future__ import annotations

import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ShardingError

# Workers wait for the driver's next step for as long as the engine lives: no deadline on their control group. Every
# other wait (the driver's control sends, every rank's device collectives) is bounded by the engine's
# tensor_parallel_timeout_s: one that waits longer on a live peer raises (a dead peer is seen at once: its sockets
# close).
IDLE_TIMEOUT = timedelta(days=365)
_HEADER = 4096  # bytes of the first control broadcast: an 8-byte length, then the message's first bytes


def check_shardable(text, n: int) -> None:
    """Raise ShardingError, naming the dimension, N and the sizes that fit, when the language model cannot be split
    over n ranks. Ranks hold whole heads (q/o widths are heads x head_dim, so head_dim never matters here). The
    vocabulary never fails (rows are padded to ceil(V / N)); the vision tower is not split. A quantized format's
    own constraints are its linear method's (quant.check_tensor_parallel)."""
    problem = _shard_problem(text, n)
    if problem is not None:
        fit = [m for m in range(1, text.num_attention_heads + 1) if _shard_problem(text, m) is None]
        raise ShardingError(f"{problem}; tensor_parallel_size that fit this model: {', '.join(map(str, fit))}")


def _shard_problem(text, n: int) -> str | None:
    h, hk, inter = text.num_attention_heads, text.num_key_value_heads, text.intermediate_size
    if h % n:
        return f"tensor_parallel_size {n} does not divide num_attention_heads {h} (num_attention_heads % {n} = {h % n})"
    if hk % n and n % hk:
        return (f"tensor_parallel_size {n} cannot shard num_key_value_heads {hk}: neither "
                f"num_key_value_heads % {n} = {hk % n} nor {n} % num_key_value_heads = {n % hk} is 0")
    moe = text.moe_layers
    if len(moe) < text.num_hidden_layers and inter % n:  # a dense MLP in some layer
        return (f"tensor_parallel_size {n} does not divide intermediate_size {inter} "
                f"(intermediate_size % {n} = {inter % n})")
    if moe and text.moe_intermediate_size % n:  # each expert's width is split like the dense MLP's (models/moe.py)
        f = text.moe_intermediate_size
        return (f"tensor_parallel_size {n} does not divide moe_intermediate_size {f} (each expert's width; "
                f"moe_intermediate_size % {n} = {f % n})")
    return None


class TensorParallel:
    def __init__(self, rank: int = 0, size: int = 1, device_group=None, control_group=None):
        self.rank, self.size = rank, size
        self.device_group, self.control_group = device_group, control_group

    @classmethod
    def single(cls) -> "TensorParallel":
        return cls()

    @classmethod
    def create(cls, store, rank: int, size: int, device: torch.device, prefix: str,
               timeout: timedelta) -> "TensorParallel":
        """Both groups over `store` (every rank calls this with the same prefix; it returns once all have). A gloo
        timeout is each process's own: the driver's sends to a hung worker give up after `timeout` (a message beyond
        the header waits for the worker to post its receive), while the workers wait for the next step forever."""
        control = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}/control", store), rank, size,
                                        timeout if rank == 0 else IDLE_TIMEOUT)
        pg = dist.ProcessGroupNCCL if device.type == "cuda" else dist.ProcessGroupGloo
        group = pg(dist.PrefixStore(f"{prefix}/device", store), rank, size, timeout)
        return cls(rank, size, group, control)

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, size={self.size})"

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ how dimensions split
    def part(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's share of a dimension that N divides (check_shardable said so)."""
        per = total // self.size
        return self.rank * per, per

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, count): Hk/N heads each when N divides Hk; else (N a multiple of Hk) the one KV head this
        rank's query heads read, replicated on N/Hk ranks."""
        if num_kv_heads % self.size == 0:
            return self.part(num_kv_heads)
        return self.rank * num_kv_heads // self.size, 1

    def vocab_part(self, vocab_size: int) -> tuple[int, int, int]:
        """(first row, real rows, padded rows) of this rank's slice of the vocabulary: ceil(V / N) rows each, the
        last ranks' padded with zero rows, so any N works (151674 is not a multiple of 4 or 8)."""
        padded = -(-vocab_size // self.size)
        start = min(self.rank * padded, vocab_size)
        return start, min(padded, vocab_size - start), padded

    # ------------------------------------------------------------------ collectives (device group)
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's x concatenated along the last dimension, on the driver; None elsewhere."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        dist.gather(x, parts, group=self.device_group, group_dst=0)
        return torch.cat(parts, dim=-1) if self.is_driver else None

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's x (same shape everywhere), on the driver; None elsewhere."""
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        dist.gather(x.contiguous(), parts, group=self.device_group, group_dst=0)
        return parts

    def scatter(self, out: torch.Tensor, parts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The driver's parts[r] into `out` on rank r (parts only on the driver)."""
        dist.scatter(out, parts, group=self.device_group, group_src=0)
        return out

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """The driver's t, on every rank (in place)."""
        dist.broadcast(t, group=self.device_group, group_src=0)
        return t

    # ------------------------------------------------------------------ control messages (gloo, CPU)
    def send_object(self, obj, timeout: timedelta | None = None) -> None:
        """Driver: pickle `obj` to every worker (one broadcast when it fits in the header, else two). `timeout`
        bounds each broadcast more tightly than the group does (RuntimeError past it)."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        head = torch.zeros(_HEADER, dtype=torch.uint8)
        head[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        first = data[:_HEADER - 8]
        if first:
            head[8:8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        parts = [head]
        if len(data) > len(first):
            parts.append(torch.frombuffer(bytearray(data[len(first):]), dtype=torch.uint8))
        for part in parts:
            if timeout is None:
                dist.broadcast(part, group=self.control_group, group_src=0)
            else:
                dist.broadcast(part, group=self.control_group, group_src=0, async_op=True).wait(timeout)

    def recv_object(self):
        """Worker: the driver's next send_object (waits as long as it takes)."""
        head = torch.empty(_HEADER, dtype=torch.uint8)
        dist.broadcast(head, group=self.control_group, group_src=0)
        n = int(head[:8].view(torch.int64)[0])
        data = head[8:8 + min(n, _HEADER - 8)].numpy().tobytes()
        if n > len(data):
            rest = torch.empty(n - len(data), dtype=torch.uint8)
            dist.broadcast(rest, group=self.control_group, group_src=0)
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    def release(self) -> None:
        """Drop both process groups now (the engine is shutting down) rather than whenever the interpreter gets to
        them: c10d objects still alive during exit()'s C++ teardown can abort the process ("terminate called
        without an active exception", seen once on a torchrun driver in CI). Collectives after this fail."""
        self.device_group = self.control_group = None

    def abort(self) -> None:
        """Unblock collectives stuck on a dead peer (NCCL does not notice one by itself; gloo does)."""
        fn = getattr(self.device_group, "abort", None)
        if fn is not None and isinstance(self.device_group, dist.ProcessGroupNCCL):
            try:
                fn()
            except Exception:  # best effort on a group that is going away
                pass
