"""Grammar libraries for structured outputs, measured on InternVL3's vocabulary (151,674 tokens, the tokenizer the
engine builds for random:tiny): llguidance and xgrammar, side by side. Per library: import time and whether the
import pulls in transformers (the engine never imports it), install size (its package folders, du), tokenizer
set-up time, compile time of a nested JSON schema (enums, integer ranges, string patterns, arrays, nested objects,
additionalProperties false), and the time to fill one token's bitmask while walking a valid document token by token
(median and p99 over the document's tokens, one matcher), and a batch of 32 matchers at once (each library's batch
call where it has one). Then, for the engine's overlap: whether a fill in a worker thread lets the main thread run
(the share of a pure-Python loop's pace kept while fills run beside it: ~1.0 means the fill drops the GIL).

    python benchmarks/structured.py --json benchmarks/results/<date>-cpu-<commit>-structured.json
    pip install --target /tmp/xg --no-deps xgrammar apache-tvm-ffi   # xgrammar beside the venv, not in it
    python benchmarks/structured.py --xgrammar-path /tmp/xg --json ...

Either library may be missing; it is then recorded as such."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,10}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "floor": {"type": "integer", "minimum": -3, "maximum": 200},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Alice", "age": 37, "role": "admin", "address": {"city": "Zurich", "zip": "80331", "floor": 4},
            "tags": ["a", "c"], "active": True}
BATCH = 32
CITY = 0


def tokenizer():
    from internvl_engine.config import load_model_config
    from internvl_engine.processor.tokenizer import Tokenizer, builtin_tokenizer_json
    config, _ = load_model_config("random:tiny")
    return Tokenizer(builtin_tokenizer_json(config)), config.text.vocab_size


def du(paths) -> int:
    return sum(f.stat().st_size for p in paths for f in Path(p).rglob("*") if f.is_file())


def timed_import(name: str):
    """The module, and its import time and whether importing it imports transformers, in a fresh interpreter (here
    the engine's own import may have loaded it already)."""
    code = (f"import sys, time; t = time.perf_counter(); import {name}; "
            "print(time.perf_counter() - t, 'transformers' in sys.modules, 'torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    seconds, transformers, torch_ = out.split()
    return importlib.import_module(name), float(seconds), transformers == "True", torch_ == "True"


def pace(work) -> float:
    """The share of a pure-Python loop's pace kept while work() runs in another thread."""
    def loop(seconds):
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        return n
    alone = loop(0.5)
    stop = threading.Event()

    def background():
        while not stop.is_set():
            work()
    t = threading.Thread(target=background)
    t.start()
    beside = loop(0.5)
    stop.set()
    t.join()
    return beside / alone


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"median_ms": statistics.median(times) * 1e3, "p99_ms": times[int(0.99 * (len(times) - 1))] * 1e3,
            "max_ms": times[-1] * 1e3, "n": len(times)}


def llguidance_numbers(tok, vocab, doc_ids):
    llg, import_s, pulls, pulls_torch = timed_import("llguidance")
    import llguidance.torch as lt
    import torch
    t0 = time.perf_counter()
    lltok = llg.LLTokenizer(tok.backend.to_str(), n_vocab=max(vocab, tok.vocab_size), eos_token=tok.eos_token_id)
    tok_s = time.perf_counter() - t0
    opts = {"whitespace_flexible": False}
    t0 = time.perf_counter()
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), overrides=opts)
    err = llg.LLMatcher.validate_grammar(grammar, lltok)
    matcher = llg.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    assert not err and not matcher.is_error(), (err, matcher.get_error())
    mask = lt.allocate_token_bitmask(BATCH, lltok.vocab_size)
    fills = []
    for t in doc_ids:
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask(matcher, mask, 0)
        fills.append(time.perf_counter() - t0)
        assert matcher.consume_token(t), matcher.get_error()
    assert matcher.is_accepting()
    executor = llg.LLExecutor()
    batch, matchers = [], [llg.LLMatcher(lltok, grammar) for _ in range(BATCH)]
    for t in doc_ids:
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
        batch.append(time.perf_counter() - t0)
        for m in matchers:
            m.consume_token(t)
    fresh = [llg.LLMatcher(lltok, grammar) for _ in range(BATCH)]
    for m in fresh:
        m.consume_tokens(doc_ids[:CITY])
    kept = pace(lambda: lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(fresh)], mask))
    return {"version": importlib.metadata.version("llguidance"), "import_s": import_s,
            "imports_transformers": pulls, "imports_torch": pulls_torch,
            "install_bytes": du([Path(llg.__file__).parent]),
            "tokenizer_setup_s": tok_s, "compile_s": compile_s, "fill_one": summary(fills),
            f"fill_batch{BATCH}": summary(batch), "python_pace_kept_during_fill": kept}


def xgrammar_numbers(tok, vocab, doc_ids):
    xgr, import_s, pulls, pulls_torch = timed_import("xgrammar")
    import torch
    vocab_map = tok.backend.get_vocab(with_added_tokens=True)
    vocab = max(vocab, tok.vocab_size)
    encoded = [""] * vocab
    for s, i in vocab_map.items():
        encoded[i] = s
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab,
                             stop_token_ids=[tok.eos_token_id])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(BATCH, vocab)
    fills = []
    for t in doc_ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        fills.append(time.perf_counter() - t0)
        assert matcher.accept_token(t), t
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    batcher = getattr(xgr, "BatchGrammarMatcher", None)
    batcher = batcher() if batcher is not None else None
    batch = []
    for t in doc_ids:
        t0 = time.perf_counter()
        if batcher is not None:
            batcher.batch_fill_next_token_bitmask(matchers, mask)
        else:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(mask, i)
        batch.append(time.perf_counter() - t0)
        for m in matchers:
            m.accept_token(t)
    fresh = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    for m in fresh:
        for t in doc_ids[:CITY]:
            m.accept_token(t)
    kept = pace(lambda: batcher.batch_fill_next_token_bitmask(fresh, mask) if batcher else
                [m.fill_next_token_bitmask(mask, i) for i, m in enumerate(fresh)])
    folders = [Path(xgr.__file__).parent] + [Path(m.__file__).parent for m in
                                             [sys.modules.get("tvm_ffi")] if m is not None]
    return {"version": importlib.metadata.version("xgrammar"), "import_s": import_s, "imports_transformers": pulls,
            "imports_torch": pulls_torch,
            "install_bytes": du(folders), "install_note": "xgrammar + tvm_ffi; its dependencies also need "
            "transformers (and torch) installed", "tokenizer_setup_s": tok_s, "compile_s": compile_s,
            "fill_one": summary(fills), f"fill_batch{BATCH}": summary(batch),
            "batch_call": "BatchGrammarMatcher" if batcher else "loop", "python_pace_kept_during_fill": kept}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the record here")
    ap.add_argument("--xgrammar-path", help="a folder to put on sys.path first (pip install --target)")
    args = ap.parse_args()
    if args.xgrammar_path:
        sys.path.append(args.xgrammar_path)
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    tok, vocab = tokenizer()
    doc = json.dumps(DOCUMENT, separators=(",", ":"))
    doc_ids = tok.encode(doc)
    global CITY  # tokens up to the inside of the free "city" string: the pace test's state
    CITY = next(i for i in range(len(doc_ids)) if tok.decode(doc_ids[:i]).endswith('"city":"'))
    record = {"schema": "structured-v1", "date": time.strftime("%Y-%m-%d"),
              "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "command": " ".join(["python"] + sys.argv), "vocab": vocab, "document_tokens": len(doc_ids),
              "batch": BATCH, "schema_text": SCHEMA, "results": {}}
    for name, fn in (("llguidance", llguidance_numbers), ("xgrammar", xgrammar_numbers)):
        try:
            record["results"][name] = fn(tok, vocab, doc_ids)
        except ImportError as e:
            record["results"][name] = {"missing": str(e)}
        print(name, json.dumps(record["results"][name], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
