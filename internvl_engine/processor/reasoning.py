"""A sample's text split into its reasoning (the <think>...</think> block a thinking model writes first) and its
content (the answer after it), whole or piece by piece as it streams, with the same result either way.

The rules follow vLLM's think-tag reasoning parsers (vllm/reasoning/basic_parsers.py, qwen3_reasoning_parser.py):
the text before the first `</think>` is reasoning, the text after it content (a second think block is content);
a block never closed (max_tokens ran out) is all reasoning. Where vLLM has to guess, the prompt says here: a prompt
whose template opened the block (it ends with `<think>`, as Qwen3-style templates do) starts the output inside it,
so a lone `</think>` closes it; otherwise the block counts only where the output begins with `<think>` (after
whitespace), as InternVL3.5's thinking system prompt has the model write it, and an output without one is all
content. The tags are matched as text, not token ids: `<think>` is one token in Qwen3's vocabulary (151667, not
special, so it survives skip_special_tokens) but plain text in InternVL3's, where 151667 is <IMG_CONTEXT>."""
from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside a think block (its generation prompt ends with <think>)."""
    return prompt.rstrip().endswith(THINK_OPEN)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (a tag cut between two pieces)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    """One sample's splitter: feed() each new piece of text, finish() at the end; each returns the (reasoning,
    content) text it could place. A piece that may be the start of a tag is held until the next one decides it."""
    __slots__ = ("state", "held", "saw_block")

    def __init__(self, opened: bool = False):
        self.state = "reasoning" if opened else "start"  # "start": nothing but whitespace seen yet
        self.held = ""
        self.saw_block = opened

    def feed(self, text: str) -> tuple[str, str]:
        buf, self.held = self.held + text, ""
        reasoning = content = ""
        while buf:
            if self.state == "start":
                rest = buf.lstrip()
                if rest.startswith(THINK_OPEN):
                    buf, self.state, self.saw_block = rest[len(THINK_OPEN):], "reasoning", True
                elif not rest or THINK_OPEN.startswith(rest):  # whitespace, or "<thi" so far: undecided
                    self.held = buf
                    break
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += buf[:end]
                    buf, self.state = buf[end + len(THINK_CLOSE):], "content"
                else:
                    keep = _partial_tag(buf, THINK_CLOSE)
                    reasoning += buf[:len(buf) - keep]
                    self.held = buf[len(buf) - keep:]
                    break
            else:
                content += buf
                break
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held: reasoning inside an unclosed block, else content (whitespace, a cut-off "<thi")."""
        held, self.held = self.held, ""
        return (held, "") if self.state == "reasoning" else ("", held)


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output: reasoning None when it has no think block; content None when a think
    block takes all of it (vLLM's shape for the OpenAI message)."""
    parser = ReasoningParser(opened)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    if not parser.saw_block:
        return None, c1 + c2
    return r1 + r2, (c1 + c2) or None
