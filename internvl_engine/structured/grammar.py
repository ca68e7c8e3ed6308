"""A request's StructuredOutputsParams -> an llguidance grammar, checked against the model's tokenizer at intake
(a schema, regex or grammar the library refuses is a StructuredOutputError naming what it reported), cached by the
constraint's text so that the requests of an agent or a benchmark, which repeat one schema, compile it once.

Why llguidance (benchmarks/structured.py, record in benchmarks/results/*-structured.json): no dependencies and ~8 MB
installed, where importing xgrammar imports transformers and torch (transformers the engine never needs); its mask
fill drops the GIL, so it runs beside the forward; it compiles lazily (a nested schema in ~2 ms against xgrammar's
60-110 ms), and its median mask per token is ~25 us on the InternVL3 vocabulary. xgrammar's precomputed masks are
~10x faster per token (its p99 too), paid for by that compile, per schema.

JSON whitespace: llguidance's `whitespace_flexible: false`, i.e. no whitespace between tokens and "," / ":" as the
separators, unless the request gives whitespace_pattern. A flexible default would let a weak model (or a random one)
emit newlines and spaces until max_tokens; compact JSON is what a program reads anyway."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

from ..errors import StructuredOutputError
from ..processor.tokenizer import Tokenizer
from ..sampling import StructuredOutputsParams

try:  # an extra (`pip install 'internvl-engine[structured]'`, part of [serve]); the engine runs without it
    import llguidance
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    llguidance = None

CACHE_SIZE = 256  # compiled grammars kept (their text only: a matcher is made per sequence)


def json_schema(spec: StructuredOutputsParams) -> dict:
    """The JSON schema a json / json_object constraint asks for, as a dict (a string must hold a JSON object)."""
    if spec.json_object:
        return {"type": "object"}
    if isinstance(spec.json, dict):
        return spec.json
    try:
        schema = json.loads(spec.json)
    except ValueError as e:
        raise StructuredOutputError(f"structured_outputs.json is not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"structured_outputs.json must be a JSON schema object, got "
                                    f"{type(schema).__name__}")
    return schema


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (its serialised form) of a constraint; not yet checked."""
    if spec.json is not None or spec.json_object:
        # overrides win over the schema's own "x-guidance": lenient would skip keywords llguidance does not
        # implement, i.e. ignore part of the schema, so it stays off
        options = {"whitespace_flexible": False} if spec.whitespace_pattern is None else \
            {"whitespace_flexible": True, "whitespace_pattern": spec.whitespace_pattern}
        options["lenient"] = False
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json_schema(spec), overrides=options)
        except (TypeError, ValueError) as e:
            raise StructuredOutputError(f"structured_outputs.json: {e}") from e
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:  # one alternative a choice; JSON string literals are Lark string literals
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    try:  # Lark, or GBNF (llama.cpp's), which llguidance converts
        return llguidance.grammar_from("grammar", spec.grammar)
    except ValueError as e:
        raise StructuredOutputError(f"structured_outputs.grammar: {e}") from e


def _kind(spec: StructuredOutputsParams) -> str:
    return next(k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(spec, k) not in (None,
                                                                                                            False))


class GrammarCompiler:
    """Grammars for one model's tokenizer. The llguidance tokenizer (its token trie over the vocabulary, ~1 s to
    build) is made at the first structured request, not at engine start: most engines never see one."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids):
        self.tokenizer, self.eos_token_ids = tokenizer, sorted(eos_token_ids)
        # the mask covers the model's logits and every token the tokenizer has (InternVL3's tokenizer has one token,
        # <video>, past the model's 151,674 logits); ids the tokenizer lacks (a padded vocabulary) are never allowed
        self.mask_vocab = max(vocab_size, tokenizer.vocab_size)
        self._lltok = None
        self._cache: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()  # intake runs on callers' threads (AsyncLLM, the server)

    @property
    def lltokenizer(self):
        if llguidance is None:
            raise StructuredOutputError("structured outputs need the llguidance package: "
                                        "pip install 'internvl-engine[structured]'")
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.mask_vocab,
                                                     eos_token=self.eos_token_ids)
            return self._lltok

    def compile(self, spec: StructuredOutputsParams) -> str:
        """The checked grammar of `spec` (cached); StructuredOutputError saying what llguidance refused."""
        tok = self.lltokenizer
        key = spec.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = grammar_text(spec)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if failed:
            raise StructuredOutputError(f"structured_outputs.{_kind(spec)} cannot be compiled: {messages[0]}")
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: StructuredOutputsParams):
        """A fresh matcher at the start of `spec`'s language."""
        m = llguidance.LLMatcher(self.lltokenizer, self.compile(spec), log_level=0)
        if m.is_error():
            raise StructuredOutputError(f"structured_outputs.{_kind(spec)}: {m.get_error()}")
        return m
