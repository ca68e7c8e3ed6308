"""A tensor-parallel worker: one rank other than the driver. It builds its shard of the model (reading only its
slices of the checkpoint) and a ModelRunner with its own KV pool, then runs whatever the driver sends, in order,
until told to stop:

    ("pool", num_blocks)      allocate the KV pool (same block count as the driver's: one block table for all)
    ("execute", StepInput)    the step's forward on this shard; image features arrive after it (device group)
    ("vision", tile counts)   this rank's tiles of a vision batch (scattered), features gathered on the driver
    ("fault", None)           test hook: raise at the next execute
    ("shutdown", None)        leave

A worker that raises writes what it raised into the store ("error/<rank>") and exits: the driver's collectives
then fail at once (its peer's sockets close) and the engine is dead. A spawned worker also exits when its driver
process is gone. Started by the executor (torch.multiprocessing spawn) or, under torchrun, by LLMEngine itself on
ranks other than 0."""
from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import load_model_config
from ..loader import load_model
from ..parallel import TensorParallel
from .runner import ModelRunner

STORE_TIMEOUT = timedelta(seconds=float(os.environ.get("INTERNVL_TP_STORE_TIMEOUT_S", "600")))


@dataclass
class WorkerSpec:
    config: object                  # the EngineConfig (picklable)
    rank: int
    world_size: int
    device: str
    dtype: torch.dtype
    store: tuple[str, int] | None   # the driver's TCPStore (spawn); None: torchrun's env:// rendezvous
    prefix: str                     # this engine's namespace in the store
    watch_parent: bool = True       # spawned: exit when the driver process is gone


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process image's peak resident memory (VmHWM; getrusage's maxrss would include the parent's at fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def connect_store(spec: WorkerSpec):
    if spec.store is None:
        store, _, _ = next(dist.rendezvous("env://", spec.rank, spec.world_size, timeout=STORE_TIMEOUT))
        return store
    host, port = spec.store
    return dist.TCPStore(host, port, spec.world_size, False, timeout=STORE_TIMEOUT)


def split_tiles(n: int, size: int) -> list[int]:
    """Tiles per rank for a vision batch of n tiles: as even as possible, the first ranks taking the remainder."""
    return [n // size + (r < n % size) for r in range(size)]


def vision_share(tp: TensorParallel, runner, counts: list[int], shape, dtype, pixels=None):
    """Every rank runs the tower on its counts[rank] tiles (scattered from the driver's `pixels`); the features come
    back to the driver in tile order. Transfers are padded to the largest share, computation is not."""
    per, device = max(counts), runner.device
    parts = None
    if tp.is_driver:
        pixels = pixels.to(device=device, dtype=dtype)
        bounds = [sum(counts[:r]) for r in range(tp.size + 1)]
        parts = []
        for r in range(tp.size):
            p = pixels[bounds[r]:bounds[r + 1]]
            parts.append(torch.cat([p, p.new_zeros((per - p.shape[0],) + tuple(shape))]) if p.shape[0] < per else p)
        parts = [p.contiguous() for p in parts]
    mine = tp.scatter(torch.empty((per,) + tuple(shape), dtype=dtype, device=device), parts)
    n = counts[tp.rank]
    rows = runner.model.config.image_seq_length
    width = runner.model.config.text.hidden_size
    feats = torch.zeros(per * rows, width, dtype=runner.dtype, device=device)
    if n:
        feats[:n * rows] = runner.vision(mine[:n])
    gathered = tp.gather(feats)
    if not tp.is_driver:
        return None
    return torch.cat([g[:c * rows] for g, c in zip(gathered, counts)])


def recv_tensors(tp: TensorParallel, metas, device) -> list[torch.Tensor]:
    return [tp.broadcast(torch.empty(shape, dtype=dtype, device=device)) for shape, dtype in metas]


def build(spec: WorkerSpec, tp: TensorParallel):
    """(model shard, runner) of this rank, as the driver builds its own."""
    cfg, device = spec.config, torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ops = cfg.op_table(device)
    config, checkpoint = load_model_config(cfg.model)
    model = load_model(config, checkpoint, ops, device, spec.dtype, cfg.seed, tp)
    return ModelRunner(model, device, spec.dtype, cfg.block_size)


def serve(tp: TensorParallel, runner) -> None:
    """The worker loop: one message from the driver at a time, until "shutdown"."""
    fault = False
    while True:
        op, payload, metas = tp.recv_object()
        tensors = recv_tensors(tp, metas, runner.device)
        if op == "shutdown":
            return
        if op == "pool":
            runner.allocate_pool(payload)
        elif op == "execute":
            if fault:
                raise RuntimeError(f"injected worker fault on rank {tp.rank}")
            if tensors:
                payload.image_features = tensors[0]
            runner.execute(payload)
        elif op == "vision":
            counts, shape, dtype = payload
            vision_share(tp, runner, counts, shape, dtype)
        elif op == "fault":
            fault = True
        else:
            raise RuntimeError(f"unknown message {op!r} from the driver")


def _watch_parent() -> None:
    parent = os.getppid()

    def loop():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)  # the driver is gone: nobody will ever send a step

    threading.Thread(target=loop, name="internvl-tp-parent-watch", daemon=True).start()


def run_worker(spec: WorkerSpec) -> None:
    """A worker rank's whole life; never returns (the process exits: 0 after "shutdown", 1 after an error)."""
    if spec.watch_parent:
        _watch_parent()
    if torch.device(spec.device).type == "cpu":  # the ranks of one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
    store, code = None, 0
    try:
        store = connect_store(spec)
        store.set(f"{spec.prefix}/hello/{spec.rank}", "1")
        tp = TensorParallel.create(store, spec.rank, spec.world_size, torch.device(spec.device), spec.prefix,
                                   timedelta(seconds=spec.config.tensor_parallel_timeout_s))
        before, t0 = rss_bytes(), time.perf_counter()
        runner = build(spec, tp)
        info = dict(rank=spec.rank, pid=os.getpid(), rss_before_load_bytes=before, peak_rss_bytes=peak_rss_bytes(),
                    load_s=time.perf_counter() - t0)
        store.set(f"{spec.prefix}/ready/{spec.rank}", json.dumps(info))
        serve(tp, runner)
    except BaseException as e:  # noqa: BLE001 - whatever it was, the driver must learn it and this rank must go
        code = 1
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        print(f"internvl-engine tensor-parallel worker rank {spec.rank}: {text}", file=sys.stderr, flush=True)
        if store is not None:
            try:
                store.set(f"{spec.prefix}/error/{spec.rank}", text)
            except Exception:  # the store is gone with the driver
                pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: nothing may block on a group whose peers are gone


def worker_main(spec: WorkerSpec) -> None:
    """torch.multiprocessing spawn target."""
    run_worker(spec)
