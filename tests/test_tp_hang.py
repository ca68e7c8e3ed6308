"""A tensor-parallel worker that hangs (alive, its sockets open: stopped with SIGSTOP, as a worker stuck in a kernel
or a deadlock looks to the driver) must not hold the engine forever. Before tensor_parallel_timeout_s the driver
waited 365 days in the control-group broadcast of any step message longer than its 4 KB header (a long prompt's
prefill), holding the engine lock, while /health said ok. Now the step ends with EngineDeadError naming the limit,
check_health says the engine is dead, and shutdown() returns at once leaving no worker process, also while the
step is still hung."""
import contextlib
import os
import signal
import threading
import time

import pytest

from internvl_engine import SamplingParams
from internvl_engine.settings import EngineConfigError
from internvl_engine.engine.llm_engine import LLMEngine
from internvl_engine.errors import EngineDeadError
from test_tensor_parallel import _alive, _workers_gone

LONG_PROMPT = "Tell me a long story about a dragon and a knight. " * 100  # a prefill message well over 4 KB


def _engine(timeout_s: float) -> LLMEngine:
    engine = LLMEngine("random:tiny", dtype="float32", device="cpu", tensor_parallel_size=2,
                       tensor_parallel_timeout_s=timeout_s)
    engine.add_request("warm", "Hello there.", SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():  # both ranks have served a step
        engine.step()
    return engine


def _generate_in_thread(engine: LLMEngine, errors: list) -> threading.Thread:
    def run():
        try:
            engine.add_request("long", LONG_PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
            while engine.has_unfinished_requests():
                engine.step()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _returns(call, what: str) -> None:
    """call() returns within a hang guard (120 s). The tests using it first raise the executor's join timeout to
    600 s, so a shutdown that waited for a stopped worker instead of killing it would overrun the guard: the verdict
    never rests on how fast a loaded machine runs."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), f"{what} waits for the hung worker"


@pytest.fixture
def long_join(monkeypatch):
    from internvl_engine.worker import executor as executor_module
    monkeypatch.setattr(executor_module, "JOIN_TIMEOUT_S", 600.0)


@contextlib.contextmanager
def _hung_step(timeout_s: float):
    """(engine, errors, thread): rank 1 stopped, then a long prompt's steps running on `thread` (its exception lands
    in `errors`); the worker is killed on the way out whatever the test did."""
    engine = _engine(timeout_s)
    worker = engine.executor.procs[1]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        errors = []
        yield engine, errors, _generate_in_thread(engine, errors)
    finally:
        if _alive(worker.pid):
            os.kill(worker.pid, signal.SIGKILL)


def test_hung_worker_kills_the_engine_after_the_timeout(long_join):
    with _hung_step(timeout_s=2) as (engine, errors, thread):
        thread.join(30)  # the limit is 2 s; the old driver never returned
        assert not thread.is_alive(), "the step hangs on a hung worker"
        assert len(errors) == 1 and isinstance(errors[0], EngineDeadError), errors
        assert "tensor_parallel_timeout_s" in str(errors[0]) and "hung" in str(errors[0])
        with pytest.raises(EngineDeadError, match=r"over the 2 s limit \(tensor_parallel_timeout_s\)"):
            engine.check_health()
        assert engine.executor.dead_reason is not None
        assert _workers_gone(engine)  # a hung worker is killed, not waited for
        _returns(engine.shutdown, "shutdown()")
        with pytest.raises(EngineDeadError):
            engine.add_request("after", "Hi.", SamplingParams(max_tokens=2))


def test_shutdown_workers_during_a_hung_step_kills_them_and_returns(long_join):
    """With a limit far away, shutting the workers down from another thread (the server's shutdown while a request
    thread is stuck in a step) kills them at once, which ends the hung step."""
    with _hung_step(timeout_s=600) as (engine, errors, thread):
        deadline = time.monotonic() + 120
        while engine.executor._call is None:  # the step is in flight (and stays: its worker is stopped)
            assert time.monotonic() < deadline and thread.is_alive(), errors
            time.sleep(0.01)
        time.sleep(0.5)
        assert thread.is_alive() and engine.executor.dead_reason is None
        _returns(engine.shutdown_workers, "shutdown_workers()")
        assert _workers_gone(engine)
        thread.join(120)
        assert not thread.is_alive(), "the step still hangs after its workers were killed"
        assert len(errors) == 1 and isinstance(errors[0], EngineDeadError), errors
        assert "shut down" in str(errors[0])
        _returns(engine.shutdown, "shutdown()")
        with pytest.raises(EngineDeadError, match="shut down"):
            engine.check_health()


def test_engine_answers_health_and_shutdown_while_a_step_hangs(monkeypatch):
    """Once the executor knows a worker is hung, check_health says so without waiting for the step that holds the
    engine lock, and shutdown() returns: the workers are killed, which ends the step. The terminated worker is
    given 600 s before it is killed, so the step stays hung meanwhile (a stopped process ignores SIGTERM), far longer
    than the hang guards here wait for check_health and shutdown, whatever the machine's load."""
    from internvl_engine.worker import executor as executor_module
    monkeypatch.setattr(executor_module, "REAP_GRACE_S", 600.0)
    with _hung_step(timeout_s=2) as (engine, errors, thread):
        deadline = time.monotonic() + 120
        while engine.executor.dead_reason is None:
            assert time.monotonic() < deadline and thread.is_alive(), errors
            time.sleep(0.01)
        assert thread.is_alive()  # the step still holds the engine lock: its worker is being reaped
        health = []
        checker = threading.Thread(target=lambda: health.append(pytest.raises(EngineDeadError, engine.check_health)),
                                   daemon=True)
        checker.start()
        checker.join(120)
        assert not checker.is_alive(), "check_health waits for the hung step"
        assert "tensor_parallel_timeout_s" in str(health[0].value)
        stopper = threading.Thread(target=engine.shutdown, daemon=True)
        stopper.start()
        stopper.join(120)
        assert not stopper.is_alive(), "shutdown() waits for the hung step"
        assert _workers_gone(engine)
        thread.join(120)
        assert not thread.is_alive() and isinstance(errors[0], EngineDeadError), errors


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True, "300"])
def test_timeout_setting_is_validated(value):
    with pytest.raises(EngineConfigError, match="tensor_parallel_timeout_s"):
        LLMEngine("random:tiny", device="cpu", tensor_parallel_timeout_s=value)
