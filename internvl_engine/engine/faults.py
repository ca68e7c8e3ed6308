"""Fault injection: a documented test hook that makes one request fail at a chosen stage, so tests and the soak
benchmark can show that a failure stays with its request (docs/ARCHITECTURE.md, "Failure model").

    engine.inject_fault("req-3", "decode")                       # RuntimeError at req-3's next decode step
    engine.inject_fault("req-4", "vision", MemoryError("boom"))  # any exception, raised where req-4's image runs
    engine.inject_fault("req-5", "step", fatal=True)             # a fault the engine cannot recover from

Stages, in a request's order: preprocess (raises to the caller at submission, like bad input), vision, prefill,
decode, sample, detokenize, deliver (AsyncLLM handing the output to its consumer), plus step (any step that
touches the request). A fault fires every time a step reaches its request at that stage, as a fault of the request's
own would (so reruns in smaller groups find it), until the request ends or `times` firings are spent. With nothing
injected the engine pays one falsy check per stage."""
from __future__ import annotations

import threading
from dataclasses import dataclass

STAGES = ("preprocess", "vision", "prefill", "decode", "sample", "detokenize", "deliver", "step")


class InjectedFault(RuntimeError):
    """The default exception of an injected fault."""


class InjectedFatalFault(RuntimeError):
    """An injected fault the engine must treat as unrecoverable (it marks itself dead)."""


@dataclass
class _Fault:
    error: BaseException
    times: int | None  # None: until the request ends


class FaultInjector:
    def __init__(self):
        self._faults: dict[tuple[str, str], _Fault] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._faults)

    def add(self, request_id: str, stage: str, error: BaseException | None = None, times: int | None = None,
            fatal: bool = False) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown fault stage {stage!r}; stages: {STAGES}")
        if error is None:
            kind = InjectedFatalFault if fatal else InjectedFault
            error = kind(f"injected {'fatal ' if fatal else ''}fault at {stage} for request {request_id}")
        with self._lock:
            self._faults[(request_id, stage)] = _Fault(error, times)

    def check(self, stage: str, requests) -> None:
        """Raise the fault injected for `stage` and any of `requests` (sequences or request ids), if one is due."""
        if not self._faults:
            return
        with self._lock:
            for rid in (getattr(r, "request_id", r) for r in requests):
                fault = self._faults.get((rid, stage))
                if fault is not None:
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            del self._faults[(rid, stage)]
                    raise fault.error

    def clear(self, request_id: str) -> None:
        if self._faults:
            with self._lock:
                for key in [k for k in self._faults if k[0] == request_id]:
                    del self._faults[key]


class Stage:
    """`with stage("decode", seqs): ...` (or a bare `stage("sample", seqs)`) marks what the engine is doing, which
    a failed request's RequestFailedError and a fatal fault's death message name, and fires the faults injected
    for that stage and any of those sequences as it begins (one falsy check when nothing is injected)."""
    __slots__ = ("faults", "injected", "name")

    def __init__(self, faults: FaultInjector):
        self.faults, self.name = faults, ""
        self.injected = faults._faults  # the injector's own dict: a C-level emptiness test, for every row of a step

    def __call__(self, name: str, requests) -> "Stage":
        self.name = name
        if self.injected:
            self.faults.check(name, requests)
        return self

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, *exc) -> None:
        return None
