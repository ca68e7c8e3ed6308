"""Whether the engine may still serve (docs/ARCHITECTURE.md, "Failure model"). A request is the unit of failure; the
engine itself dies only of a fault no rerun can survive (a sticky device error, a tensor-parallel worker that died,
raised or hung, an injected fatal fault, a front end's loop failing outside any request) or at shutdown, and from
then on every call raises EngineDeadError saying why."""
from __future__ import annotations

import threading
from typing import Callable

import torch

from ..errors import EngineDeadError
from .faults import InjectedFatalFault


class Health:
    def __init__(self, lock: threading.RLock, executor, device: torch.device,
                 on_death: Callable[[EngineDeadError], None]):
        """lock: the engine's; executor: the tensor-parallel driver or None; on_death(error) finishes every request
        the engine holds with the error (called under the lock)."""
        self.lock, self.executor, self.device, self.on_death = lock, executor, device, on_death
        self.dead: str | None = None  # why the engine died

    def check(self) -> None:
        reason = None if self.executor is None else self.executor.dead_reason  # a worker died, raised or hung
        if self.dead is None and reason is not None:
            if not self.lock.acquire(blocking=False):  # a step hung on a worker holds it: answer without waiting
                raise EngineDeadError(f"the engine is dead: {reason}")
            try:
                if self.dead is None:
                    self.die(reason)
            finally:
                self.lock.release()
        if self.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead}")

    def die(self, why: str) -> EngineDeadError:
        """Under the lock: the engine is dead from now on; the error to raise."""
        self.dead = why
        dead = EngineDeadError(f"the engine is dead: {why}")
        self.on_death(dead)
        return dead

    def fail(self, why: str) -> EngineDeadError:
        with self.lock:
            return self.die(why) if self.dead is None else EngineDeadError(f"the engine is dead: {self.dead}")

    def raise_if_fatal(self, e: Exception, stage: str) -> None:
        """A step failed with `e` at `stage`: a fault no rerun can survive kills the engine (raises its
        EngineDeadError); any other returns, and the step is rerun in halves."""
        # EngineDeadError: e.g. a tensor-parallel worker died
        fatal = e if isinstance(e, (InjectedFatalFault, EngineDeadError)) else None
        if fatal is None and self.device.type == "cuda":
            try:  # a sticky CUDA error poisons the context: every later call on the device fails too
                torch.cuda.synchronize(self.device)
            except Exception as sticky:
                fatal = sticky
        if fatal is not None:
            raise self.die(f"{stage}: {type(fatal).__name__}: {fatal}") from fatal
