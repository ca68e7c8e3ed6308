"""The one reading of a chat conversation, for LLM, AsyncLLM and the server alike. Two spellings are accepted and
may be mixed: the engine's content items ({"type": "image", "image" | "url" | "path" | "base64": ...},
{"type": "video", "video" | "url" | "path": ...}, plain strings) and OpenAI's content parts
({"type": "image_url" | "video_url", ...: {"url": ...}}), with OpenAI's "developer" role read as "system".
Whatever is wrong is a PromptError naming the item by its place (messages[i].content[j]), which the server
answers with a 400."""

from __future__ import annotations

from ..errors import PromptError

ROLES = ("system", "user", "assistant")
_ROLE_NAMES = "system, developer, user or assistant"  # OpenAI's "developer" is the system role of newer models
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
    return [_message(m, mi) for mi, m in enumerate(messages)]


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
                    media.append((kind, item[kind]))
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
    return {**msg, "role": role, "content": content}


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
        return {"type": kind, kind: source}
    if kind in _URL_PARTS:
        ref = item.get(kind)
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url:
            raise PromptError(f"{where}.{kind}.url must be a non-empty string")
        return {"type": _URL_PARTS[kind], _URL_PARTS[kind]: url}
    raise PromptError(f"{where} has unknown type {kind!r}; supported: text, image, image_url, video, video_url")
