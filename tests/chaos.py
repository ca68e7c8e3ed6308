"""A pytest plugin that makes this machine behave like a loaded one at the hand-offs between threads, to find tests
whose verdict depends on timing (CI's 2-core machine once merged a streamed reasoning into one chunk):

    PYTHONPATH=tests python -m pytest -p chaos tests/test_server.py ...

With probability CHAOS_P (0.5) each wake-up of an AsyncLLM consumer's event loop first stalls up to CHAOS_WAKE_MS
(40; that event loop is the server's, so all its HTTP work stalls with it), and each engine step up to CHAOS_STEP_MS
(5). CHAOS_SEED makes the stalls repeatable. Nothing here runs unless asked for with -p chaos."""
import os
import random
import time


def pytest_configure(config):
    from internvl_engine.engine import async_llm, llm_engine
    wake_s = float(os.environ.get("CHAOS_WAKE_MS", "40")) / 1000
    step_s = float(os.environ.get("CHAOS_STEP_MS", "5")) / 1000
    p = float(os.environ.get("CHAOS_P", "0.5"))
    rng = random.Random(os.environ.get("CHAOS_SEED"))
    wake, step = async_llm._Channel._wake, llm_engine.LLMEngine.step

    def stalled_wake(self):
        if rng.random() < p:
            time.sleep(rng.random() * wake_s)
        wake(self)

    def stalled_step(self, *args, **kwargs):
        if rng.random() < p:
            time.sleep(rng.random() * step_s)
        return step(self, *args, **kwargs)

    async_llm._Channel._wake = stalled_wake
    llm_engine.LLMEngine.step = stalled_step
