"""Progress a user can see: checkpoint loading (shards, bytes, time) and benchmark runs.

Two faces, through maintained machinery rather than hand-drawn bars:
- a tqdm bar on stderr, drawn only when stderr is a terminal (tqdm's disable=None), in the process that drives the
  engine (not in a spawned tensor-parallel worker, nor on a torchrun rank other than 0), and while progress is on;
- a log record per step on the "internvl_engine.progress" logger (INFO), always: where it goes is the logging
  configuration's business (the CLI sends INFO records to stderr, log_to_stderr), so a server's log holds one line
  per shard even when no terminal is watching.

Off: INTERNVL_ENGINE_PROGRESS=0 in the environment, set_enabled(False), or the CLI's --no-progress (bench: --quiet).
Turning it off hides the bar only; the log records stay (raise the logger's level to drop them)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

try:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError:  # an install without the dependency still loads checkpoints; it only loses the bar
    tqdm = logging_redirect_tqdm = None

log = logging.getLogger("internvl_engine.progress")
_enabled: bool | None = None  # set_enabled's choice; None: the environment's


def set_enabled(on: bool | None) -> None:
    """Turns the bars on or off for this process (None: back to INTERNVL_ENGINE_PROGRESS, default on)."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("INTERNVL_ENGINE_PROGRESS", "1").strip().lower() not in ("0", "off", "false", "no")


def _drives() -> bool:
    """This process is the one a user watches: not a spawned worker, not a torchrun rank other than 0."""
    return multiprocessing.parent_process() is None and os.environ.get("RANK", "0") == "0"


def bar(total: float | None, desc: str, **kwargs):
    """A tqdm bar on stderr (a disabled one, which draws nothing, when progress is off or stderr no terminal)."""
    if tqdm is None:
        return _NoBar()
    show = enabled() and _drives()
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None if show else True, dynamic_ncols=True,
                leave=True, **kwargs)


class _NoBar:
    """tqdm's interface where tqdm is not installed."""
    n = 0

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s="", refresh=True):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _redirect():
    """While a bar is drawn, log records to the terminal go through tqdm.write: printed above the bar, not through
    it (the root's handlers and the package's own, log_to_stderr)."""
    def to_terminal(logger) -> bool:
        return any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.stdout)
                   for h in logger.handlers)
    # (a logger without such a handler is left alone: tqdm would give it one, and its records would show twice)
    loggers = [lg for lg in (logging.getLogger(), logging.getLogger("internvl_engine")) if to_terminal(lg)]
    return logging_redirect_tqdm(loggers=loggers)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@contextmanager
def checkpoint_shards(files: list[Path]):
    """Around the loop that reads a checkpoint's weight files: yields done(file), to call once each file is read.
    The bar counts bytes (file sizes: what a rank scans, whatever slice of it it keeps) with shards as its postfix;
    the log gets a line per shard and one for the whole load."""
    sizes = {Path(f): Path(f).stat().st_size for f in files}
    total, count, t0 = sum(sizes.values()), 0, time.perf_counter()
    with bar(total, "loading checkpoint", unit="B", unit_scale=True, unit_divisor=1024) as b, \
            (_redirect() if tqdm is not None and not b.disable else nullcontext()):
        last = t0

        def done(file) -> None:
            nonlocal count, last
            now, size = time.perf_counter(), sizes[Path(file)]
            count += 1
            b.set_postfix_str(f"shard {count}/{len(sizes)}", refresh=False)  # drawn by the update
            b.update(size)
            log.info("loaded shard %d/%d %s (%s) in %.1f s", count, len(sizes), Path(file).name, _size(size),
                     now - last)
            last = now

        yield done
    elapsed = time.perf_counter() - t0
    log.info("loaded checkpoint: %d shards, %s (%d bytes) in %.1f s (%.2f GB/s)", count, _size(total), total,
             elapsed, total / 1e9 / max(elapsed, 1e-9))


def log_to_stderr() -> None:
    """The CLI's logging: INFO records of the package to stderr, one line each, unless logging is configured
    already (a handler on the package's logger or on the root)."""
    package = logging.getLogger("internvl_engine")
    if package.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("internvl-engine: %(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)
