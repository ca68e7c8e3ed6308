"""The driver's side of tensor parallelism. The driver is rank 0, in the caller's process: it keeps the scheduler,
block manager and processor, samples, and its ParallelRunner sends every forward to the workers before running its
own shard of it.

Starting: `launch(cfg, device, dtype)` spawns one worker per rank beyond the driver (torch.multiprocessing, spawn)
around a TCPStore the driver hosts; under torchrun (RANK / WORLD_SIZE set) every process is started already, ranks
other than 0 become workers right here and never return, and the store is torchrun's (env://). The driver waits for
every rank's hello, builds the groups, loads its own shard while the workers load theirs, then waits until each has
said ready (or raised, or died: the error is raised here, no hang).

Watching: a thread waits on the spawned workers' process sentinels; an exit the driver did not ask for marks the
executor dead (the reason names the rank, its exit code or signal, and what it raised). Any failure inside a
parallel call does too: the ranks are then out of step, so the workers are stopped and every later call raises
EngineDeadError. A worker that hangs (alive, its sockets open) is seen by no sentinel: every wait on another rank
is bounded by tensor_parallel_timeout_s (the driver's control sends, the device collectives), and a watchdog thread
marks the executor dead once a parallel call has run longer than that, stopping the workers, which ends the call;
`dead_reason` says so at once, without the engine lock the call holds. `shutdown()` tells the workers to leave,
joins them, and kills any that do not (with a call in flight on another thread it kills them at once: the ranks
cannot take "shutdown" in step); it also runs when the executor is collected and at interpreter exit.
"""
from __future__ import annotations

import json
import multiprocessing.connection
import os
import signal
import threading
import time
import uuid
import weakref
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import BackendError, EngineDeadError
from ..parallel import TensorParallel, check_shardable
from ..settings import EngineConfigError
from ..quant import check_tensor_parallel
from .loop import STORE_TIMEOUT, WorkerSpec, run_worker, split_tiles, vision_share, worker_main
from .step_output import finish_step

JOIN_TIMEOUT_S = 10.0  # a worker told to shut down that is still alive after this is killed
REAP_GRACE_S = 2.0     # a terminated worker still alive after this is killed


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun (or any env:// launcher), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device, rank: int, local_rank: int | None = None) -> torch.device:
    """The device of a rank: the driver's on the CPU; cuda:<driver's index + rank> when spawned, cuda:<LOCAL_RANK>
    under torchrun."""
    if device.type != "cuda":
        return device
    index = local_rank if local_rank is not None else (device.index or 0) + rank
    if index >= torch.cuda.device_count():
        raise BackendError(f"tensor parallel rank {rank} needs cuda:{index} but {torch.cuda.device_count()} "
                           "CUDA device(s) are visible")
    return torch.device("cuda", index)


def launch(cfg, config, device: torch.device, dtype: torch.dtype) -> "Executor | None":
    """The executor of an engine with cfg.tensor_parallel_size > 1 (None for 1), once its workers are up (each then
    loads its shard while the driver loads its own). ShardingError before anything starts when the model (`config`)
    cannot be split (UnsupportedModelError when its quantized layers cannot). On a torchrun rank other than 0 this
    runs the worker loop; the process exits when the driver shuts down."""
    n = cfg.tensor_parallel_size
    if n == 1:
        return None
    check_shardable(config.text, n)
    check_tensor_parallel(config.text, config.quant, n)  # a quantized format's packs / groups
    env = torchrun_env()
    if env is not None:
        rank, world, local = env
        if world != n:
            raise EngineConfigError(f"tensor_parallel_size {n} but torchrun started WORLD_SIZE={world} processes")
        if rank != 0:
            run_worker(WorkerSpec(cfg, rank, n, str(rank_device(device, rank, local)), dtype, None, "internvl-tp",
                                  watch_parent=False))
    return Executor(cfg, device, dtype, torchrun=env is not None)


def _reap(procs: list, waiting, grace_s: float | None = None) -> None:
    """Terminate, then kill after grace_s (None: REAP_GRACE_S; 0: at once), whichever spawned workers are still
    alive, and join them all. The signals go at once, from any thread; the waits, one thread at a time (`waiting`):
    of two threads in waitpid on one child, the one that loses gets ECHILD and returns before the other has set
    the exit code, so a caller could find the worker neither alive nor exited."""
    for p in procs:  # no-ops for a worker reaped already
        if grace_s == 0:
            p.kill()
        else:
            p.terminate()
    with waiting:
        deadline = time.monotonic() + (REAP_GRACE_S if grace_s is None else grace_s)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()  # SIGKILL also ends a stopped process, which SIGTERM does not
                p.join()


class _Closer:
    """What stopping the workers needs, without the executor itself: it runs from shutdown(), when the executor is
    collected, and at interpreter exit (weakref.finalize), so an engine nobody shut down leaves no process either
    (and torchrun's ranks exit 0)."""

    def __init__(self, procs: list):
        self.procs, self.tp, self.live = procs, None, True
        self.grace_s: float | None = None  # 0: kill at once (the workers are mid-call, perhaps hung)
        self.waiting = threading.RLock()   # held by whoever waits on the workers' exit (_reap)

    def __call__(self) -> None:
        if self.live and self.tp is not None:
            self.live = False
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            try:  # bounded: a hung worker never posts the receive a send may wait for
                self.tp.send_object(("shutdown", None, []), timeout=timedelta(seconds=JOIN_TIMEOUT_S))
            except Exception:  # a worker gone or hung: reaped below
                pass
            with self.waiting:
                for p in self.procs:
                    p.join(max(0.0, deadline - time.monotonic()))
        self.reap(self.grace_s)

    def reap(self, grace_s: float | None = None) -> None:
        _reap(self.procs, self.waiting, grace_s)


def _watch(executor_ref, sentinels: dict) -> None:
    """Wait for any spawned worker to exit; one the driver did not stop marks the executor dead."""
    done = multiprocessing.connection.wait(list(sentinels))
    executor = executor_ref()
    if executor is not None and not executor._closing:
        executor._mark_dead(executor._worker_reason(sentinels[done[0]]))


def _watchdog(executor_ref, limit_s: float) -> None:
    """Mark the executor dead once a parallel call has run longer than limit_s: its workers are then stopped, which
    ends the call. Reads a timestamp now and then; holds the executor only while it looks."""
    while True:
        time.sleep(min(1.0, limit_s / 4))
        executor = executor_ref()
        if executor is None or executor._closing or executor._dead is not None:
            return
        call = executor._call
        if call is not None and time.monotonic() - call[1] > limit_s:
            executor._mark_dead(executor._hung_reason(call))
            return
        del executor


class Executor:
    def __init__(self, cfg, device: torch.device, dtype: torch.dtype, torchrun: bool = False):
        self.size, self.device = cfg.tensor_parallel_size, device
        self.timeout_s = cfg.tensor_parallel_timeout_s
        self.procs: dict[int, mp.Process] = {}
        self.worker_info: dict[int, dict] = {}   # rank -> what it reported when ready (pid, peak RSS, load time)
        self._dead: str | None = None
        self._closing = False
        self._call: tuple[str, float] | None = None  # (what, monotonic start) of the parallel call in flight
        self._lock = threading.Lock()           # the store client, from the caller's thread and the watcher
        self._dead_lock = threading.Lock()      # _mark_dead from the caller's thread, the watcher and the watchdog
        if torchrun:
            self.prefix = "internvl-tp"
            self.store, _, _ = next(dist.rendezvous("env://", 0, self.size, timeout=STORE_TIMEOUT))
        else:
            self.prefix = f"internvl-tp-{uuid.uuid4().hex[:12]}"
            self.store = dist.TCPStore("127.0.0.1", 0, self.size, True, timeout=STORE_TIMEOUT,
                                       wait_for_workers=False)
            ctx = mp.get_context("spawn")
            for r in range(1, self.size):
                spec = WorkerSpec(cfg, r, self.size, str(rank_device(device, r)), dtype,
                                  ("127.0.0.1", self.store.port), self.prefix)
                p = ctx.Process(target=worker_main, args=(spec,), name=f"internvl-tp-rank{r}", daemon=True)
                p.start()
                self.procs[r] = p
        self._closer = _Closer(list(self.procs.values()))
        self._finalizer = weakref.finalize(self, self._closer)
        try:
            self._wait_all("hello", timeout_s=STORE_TIMEOUT.total_seconds())
            self.tp = self._closer.tp = TensorParallel.create(self.store, 0, self.size, device, self.prefix,
                                                              timedelta(seconds=self.timeout_s))
        except BaseException:
            self.shutdown()
            raise
        # the threads hold only a weak reference: a dropped executor is still collected (and reaped)
        if self.procs:
            sentinels = {p.sentinel: r for r, p in self.procs.items()}
            threading.Thread(target=_watch, args=(weakref.ref(self), sentinels), name="internvl-tp-watch",
                             daemon=True).start()
        threading.Thread(target=_watchdog, args=(weakref.ref(self), self.timeout_s), name="internvl-tp-watchdog",
                         daemon=True).start()

    # ------------------------------------------------------------------ startup
    def _key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}/{kind}/{rank}"

    def _has(self, key: str) -> bool:
        with self._lock:
            return self.store.check([key])

    def _get(self, key: str) -> str:
        with self._lock:
            return self.store.get(key).decode()

    def _wait_all(self, kind: str, timeout_s: float | None = None) -> None:
        """Until every worker has written `<kind>/<rank>`; raises EngineDeadError as soon as one raised or died."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waiting = set(range(1, self.size))
        while waiting:
            for r in sorted(waiting):
                if self._has(self._key(kind, r)):
                    waiting.discard(r)
                elif self._has(self._key("error", r)) or (r in self.procs and not self.procs[r].is_alive()):
                    hint = "" if kind != "hello" or self._has(self._key("error", r)) else (
                        " before it started (its stderr says why). Spawned workers import the main module: a script "
                        "that builds a tensor-parallel engine must do so under `if __name__ == '__main__':`, and "
                        "cannot be read from stdin")
                    raise self.fail(RuntimeError(f"worker rank {r} did not start"), hint)
            if waiting and deadline is not None and time.monotonic() > deadline:
                raise self.fail(TimeoutError(f"worker rank(s) {sorted(waiting)} did not reach {kind!r} in "
                                             f"{timeout_s:.0f} s"))
            time.sleep(0.02)

    def wait_ready(self) -> None:
        """After the driver loaded its own shard: until every worker has loaded its shard."""
        self._wait_all("ready")
        for r in range(1, self.size):
            self.worker_info[r] = json.loads(self._get(self._key("ready", r)))

    # ------------------------------------------------------------------ health
    def _worker_reason(self, rank: int) -> str:
        what = f"tensor-parallel worker rank {rank}"
        p = self.procs.get(rank)
        if p is not None:
            if self._closer.waiting.acquire(timeout=0.5):  # else another thread is reaping it
                try:
                    p.join(0.5)
                finally:
                    self._closer.waiting.release()
            what += f" (pid {p.pid})"
            if p.exitcode is not None and p.exitcode < 0:
                what += f" was killed by {signal.Signals(-p.exitcode).name}"
            elif p.exitcode is not None:
                what += f" exited with code {p.exitcode}"
        try:
            if self._has(self._key("error", rank)):
                what += f"; it raised {self._get(self._key('error', rank)).splitlines()[0]}"
        except Exception:  # the store itself is unreachable: say what is known
            pass
        return what

    def _hung_reason(self, call: tuple[str, float]) -> str:
        what, started = call
        return (f"a tensor-parallel {what} call waited {time.monotonic() - started:.1f} s for the workers, over the "
                f"{self.timeout_s:g} s limit (tensor_parallel_timeout_s): a worker is hung (alive but not answering; "
                f"pids {[p.pid for p in self.procs.values()] or 'under torchrun'})")

    def _mark_dead(self, why: str) -> None:
        """Record why (the first reason wins) and stop the workers; whoever calls this returns once they are gone,
        even when another thread got here first."""
        with self._dead_lock:
            if self._dead is None:
                self._dead = why
            self._closer.live = False  # nothing more is sent: the ranks are out of step
        if self.device.type == "cuda" and hasattr(self, "tp"):
            self.tp.abort()  # NCCL collectives do not notice a dead peer by themselves
        self._closer.reap()  # a hung worker too: its sockets close, so the driver's call ends

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def check(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead}")

    def fail(self, cause: BaseException, hint: str = "") -> EngineDeadError:
        """A parallel call failed: the ranks are out of step. Find out which worker is to blame (give a dying one a
        moment to exit and say why), stop them all, and return the error to raise."""
        if self._dead is not None:
            self._mark_dead(self._dead)  # the workers may still be being stopped by the thread that saw it first
        else:
            why = None
            deadline = time.monotonic() + 2.0
            while why is None and time.monotonic() < deadline:
                for r in range(1, self.size):
                    gone = r in self.procs and not self.procs[r].is_alive()
                    if gone or self._has(self._key("error", r)):
                        why = self._worker_reason(r)
                        break
                else:
                    time.sleep(0.05)
            call = self._call
            if why is None and call is not None and time.monotonic() - call[1] >= self.timeout_s:
                why = f"{self._hung_reason(call)}; {type(cause).__name__}: {cause}"  # a wait bounded by the limit
            self._mark_dead((why or f"a tensor-parallel call failed on the driver: {type(cause).__name__}: {cause}")
                            + hint)
        return EngineDeadError(f"the engine is dead: {self._dead}")

    # ------------------------------------------------------------------ messages
    def send(self, op: str, payload=None, tensors: tuple[torch.Tensor, ...] = ()) -> None:
        """One message to every worker: the plain data over the control group, then each tensor (device group)."""
        metas = [(tuple(t.shape), t.dtype) for t in tensors]
        self.tp.send_object((op, payload, metas))
        for t in tensors:
            self.tp.broadcast(t.to(self.device).contiguous())

    def inject_fault(self) -> None:
        """Test hook: every worker raises at the next forward (the engine must die, not hang)."""
        self.send("fault")

    def shutdown(self) -> None:
        """Tell the workers to leave, join them (killing any that linger), no process left behind. Idempotent, and
        callable from any thread: with a parallel call in flight on another thread (perhaps hung), the workers are
        killed at once, which ends that call with EngineDeadError."""
        if self._closing:
            return
        self._closing = True
        with self._dead_lock:
            if self._dead is None:
                self._dead = "the engine was shut down"
        # _dead is set before _call is read, and ParallelRunner sets _call before check(): a call either is seen
        # here or refuses to start
        if self._call is not None:
            self._closer.live, self._closer.grace_s = False, 0.0
        self._finalizer()  # _Closer: "shutdown" to every worker, join, kill what lingers
        if hasattr(self, "tp"):  # every rank has left: the groups and the store go now, not at interpreter exit
            self.tp.release()
        self.store = None


class ParallelRunner:
    """ModelRunner's interface on the driver of a tensor-parallel engine: each call that runs the model is sent to
    the workers first, then run on the driver's own shard (the collectives inside meet up). The driver alone
    computes logits and samples: the workers get each StepInput without its sampling rows. The pool and the
    kernel table are the driver's ModelRunner's."""

    vision_mode = "spread"  # "spread": a batch's tiles split over the ranks; "driver": the driver runs every tile

    def __init__(self, local, executor: Executor):
        self.local, self.executor = local, executor
        self.graphs = self.vision_graphs = None  # eager under tensor parallelism

    @property
    def cache(self):
        return self.local.cache

    @property
    def kernels(self) -> dict[str, str]:
        return self.local.kernels

    def kv_bytes_per_token(self) -> int:
        return self.local.kv_bytes_per_token()

    def _parallel(self, what: str, fn):
        executor = self.executor
        executor._call = (what, time.monotonic())  # the watchdog's clock; set before check() (see shutdown)
        try:
            executor.check()
            return fn()
        except EngineDeadError:
            raise
        except Exception as e:
            raise executor.fail(e) from e
        finally:
            executor._call = None

    def allocate_pool(self, num_blocks: int):
        def run():
            self.executor.send("pool", num_blocks)
            return self.local.allocate_pool(num_blocks)
        return self._parallel("pool", run)

    def enable_graphs(self, *args, **kwargs) -> None:
        raise NotImplementedError("CUDA graphs are not used under tensor parallelism (enforce_eager)")

    def _step(self, step, run_local):
        self.local.check(step)  # a step the driver would refuse is never sent
        feats = () if step.image_features is None else (step.image_features,)

        def run():
            # the driver alone reads the logits: the workers get none of the sampling or logprob rows
            self.executor.send("execute", replace(step, image_features=None, sampling=None, sample_index=None,
                                                  prompt_rows=None), feats)
            return run_local(step)
        return self._parallel("execute", run)

    @torch.inference_mode()
    def execute(self, step):
        """The step's forward on every rank; then the driver alone samples, after the parallel call: a sampler
        failure is its requests' (rerun in halves), not the ranks' (the workers are past the step)."""
        return finish_step(self._step(step, self.local._logits), step, self.local.sampler, self.local.to_host)

    def logits(self, step) -> torch.Tensor:
        """The step's forward on every rank; the driver's host logits."""
        return self._step(step, self.local.logits)

    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projector rows of a batch of tiles. A single tile cannot be split: the driver runs it alone."""
        n = pixel_values.shape[0]
        if n < 2 or self.vision_mode == "driver":
            return self.local.vision(pixel_values)
        counts = split_tiles(n, self.executor.size)
        shape, dtype = tuple(pixel_values.shape[1:]), pixel_values.dtype

        def run():
            self.executor.send("vision", (counts, shape, dtype))
            return vision_share(self.executor.tp, self.local, counts, shape, dtype, pixel_values)
        return self._parallel("vision", run)

