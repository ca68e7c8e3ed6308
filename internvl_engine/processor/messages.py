"""The one reading of a chat conversation, for LLM, AsyncLLM and the server alike. Two spellings are accepted and
may be mixed: the engine's content items ({"type": "image", "image" | "url" | "path" | "base64": ...},
{"type": "video", "video" | "url" | "path": ...}, plain strings) and OpenAI's content parts
({"type": "image_url" | "video_url", ...: {"url": ...}}), with OpenAI's "developer" role read as "system". Tool
use in OpenAI's shape is read too: an assistant message's tool_calls ([{"id", "type": "function", "function":
{"name", "arguments"}}], its content then optional) and role "tool" messages (tool_call_id, text content) answering
them; tools.py renders them. Whatever is wrong is a PromptError naming the item by its place
(messages[i].content[j]), which the server answers with a 400."""

from __future__ import annotations

from ..errors import PromptError
from .detail import media_source, with_detail
from .tools import call_arguments, check_unicode

ROLES = ("system", "user", "assistant", "tool")
_ROLE_NAMES = "system, developer, user, assistant or tool"  # OpenAI's "developer" is the system role of newer models
_SOURCE_KEYS = {"image": ("image", "url", "path", "base64"), "video": ("video", "url", "path")}
_URL_PARTS = {"image_url": "image", "video_url": "video"}
_MEDIA_MARKER = "<media>"  # what a template sees in place of a medium: never its bytes, path or URL


def normalize_messages(messages) -> list[dict]:
    """The conversation in the engine's own form: each message's role (one of ROLES) and content, a string or a
    list of {"type": "text", "text": str}, {"type": "image", "image": source} and {"type": "video", "video": source}
    items; other keys of a message are kept for the chat template. A source of None means the caller passes that
    medium through images= / videos=. Normalising a normalised conversation returns an equal one."""
    if not isinstance(messages, (list, tuple)):
        raise PromptError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    conversation = [_message(m, mi) for mi, m in enumerate(messages)]
    _check_tool_results(conversation)
    return conversation


def split_media(conversation: list[dict]) -> tuple[list[dict], list[tuple[str, object]]]:
    """(the messages a chat template renders, [("image" | "video", source)] in order of appearance) of a
    normalised conversation: each medium's place holds a marker, so a template never reads a medium itself."""
    rendered, media = [], []
    for m in conversation:
        content = m["content"]
        if not isinstance(content, str):
            items = []
            for item in content:
                kind = item["type"]
                if kind != "text":
                    media.append((kind, media_source(item)))
                    item = {"type": kind, kind: _MEDIA_MARKER}
                items.append(item)
            m = {**m, "content": items}
        rendered.append(m)
    return rendered, media


def _message(msg, mi: int) -> dict:
    if not isinstance(msg, dict):
        raise PromptError(f"messages[{mi}] must be a dict with 'role' and 'content', got {type(msg).__name__}")
    if "role" not in msg:
        raise PromptError(f"messages[{mi}] has no 'role'")
    role = "system" if msg["role"] == "developer" else msg["role"]
    if role not in ROLES:
        raise PromptError(f"messages[{mi}].role must be {_ROLE_NAMES}, got {msg['role']!r}")
    content = msg.get("content")
    if content is None:  # OpenAI's assistant messages may carry none
        content = ""
    if isinstance(content, (list, tuple)):
        content = [_item(item, mi, ci) for ci, item in enumerate(content)]
    elif not isinstance(content, str):
        raise PromptError(f"messages[{mi}].content must be a string or a list of parts, got {type(content).__name__}")
    msg = {**msg, "role": role, "content": content}
    if role == "tool":
        return _tool_result(msg, mi)
    if msg.get("tool_calls") is not None:
        if role != "assistant":
            raise PromptError(f"messages[{mi}].tool_calls: only an assistant message makes tool calls")
        msg["tool_calls"] = [_tool_call(c, f"messages[{mi}].tool_calls[{ci}]")
                             for ci, c in enumerate(_list(msg["tool_calls"], f"messages[{mi}].tool_calls"))]
    return msg


def _list(value, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"{where} must be a list, got {type(value).__name__}")
    return list(value)


def _tool_call(call, where: str) -> dict:
    """One call of an assistant message, in OpenAI's shape; arguments a JSON object (as a string, OpenAI's way, or
    as a dict, transformers')."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise PromptError(f'{where} must be {{"id": ..., "type": "function", "function": {{"name", "arguments"}}}}')
    if call.get("type", "function") != "function":
        raise PromptError(f"{where}.type must be 'function', got {call.get('type')!r}")
    if not isinstance(call.get("id"), str):
        raise PromptError(f"{where}.id must be a string (the id the tool message answering it gives)")
    fn = call["function"]
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise PromptError(f"{where}.function.name must be a non-empty string")
    check_unicode(fn["name"], f"{where}.function.name")
    call_arguments(fn.get("arguments"), f"{where}.function.arguments")
    return {**call, "type": "function"}


def _tool_result(msg: dict, mi: int) -> dict:
    """A role "tool" message: tool_call_id a string; its content text (parts joined), as templates write it."""
    if not isinstance(msg.get("tool_call_id"), str) or not msg["tool_call_id"]:
        raise PromptError(f"messages[{mi}].tool_call_id must be the id of the call this tool message answers")
    content = msg["content"]
    if not isinstance(content, str):
        media = next((ci for ci, item in enumerate(content) if item["type"] != "text"), None)
        if media is not None:
            raise PromptError(f"messages[{mi}].content[{media}]: a tool message carries text only")
        content = "".join(item["text"] for item in content)
    return {**msg, "content": content}


def _check_tool_results(conversation: list[dict]) -> None:
    """Each tool message answers a call of the assistant message before it (OpenAI's rule), by that call's id."""
    ids: set[str] = set()
    for mi, m in enumerate(conversation):
        if m["role"] == "assistant":
            ids = {c["id"] for c in m.get("tool_calls") or ()}
        elif m["role"] == "tool":
            if m["tool_call_id"] not in ids:
                raise PromptError(f"messages[{mi}].tool_call_id {m['tool_call_id']!r} answers no tool call of the "
                                  "assistant message before it")
        else:
            ids = set()


def _item(item, mi: int, ci: int) -> dict:
    where = f"messages[{mi}].content[{ci}]"
    if isinstance(item, str):
        return {"type": "text", "text": item}
    if not isinstance(item, dict):
        raise PromptError(f"{where} must be a string or a dict, got {type(item).__name__}")
    kind = item.get("type")
    if kind == "text":
        text = item.get("text", "")
        if not isinstance(text, str):
            raise PromptError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        return {"type": "text", "text": text}
    if kind in _SOURCE_KEYS:
        key = next((k for k in _SOURCE_KEYS[kind] if item.get(k) is not None), None)
        source = None if key is None else item[key]
        if key == "base64" and isinstance(source, str) and not source.startswith("data:"):
            source = "data:image/png;base64," + source  # a bare payload: Pillow reads the format from its bytes
        return with_detail({"type": kind, kind: source}, item.get("detail"), f"{where}.detail")
    if kind in _URL_PARTS:
        ref = item.get(kind)
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url:
            raise PromptError(f"{where}.{kind}.url must be a non-empty string")
        return with_detail({"type": _URL_PARTS[kind], _URL_PARTS[kind]: url}, ref.get("detail") if isinstance(ref, dict)
                           else None, f"{where}.{kind}.detail")
    raise PromptError(f"{where} has unknown type {kind!r}; supported: text, image, image_url, video, video_url")
