"""A request's output constraints -> SamplingParams fields: OpenAI's response_format (json_schema, json_object,
text) and logit_bias, vLLM's structured_outputs and its older guided_* fields. At most one constraint per request.
Anything that would change the output and is not implemented here is a StructuredRequestError naming the field
(protocol.py turns it into a 400), never ignored; whether a schema, regex or grammar compiles is the engine's check
at intake (a StructuredOutputError, also a 400)."""
from __future__ import annotations

from typing import Any

from ..sampling import StructuredOutputsParams

# grammar backends a client may name: this server has one, llguidance ("guidance" is vLLM's name for it)
BACKENDS = ("auto", "llguidance", "guidance")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# vLLM's StructuredOutputsParams keys: each implemented, accepted where it changes nothing, or refused
KEYS = {"json", "regex", "choice", "grammar", "json_object", "whitespace_pattern", "disable_any_whitespace",
        "disable_fallback", "disable_additional_properties", "structural_tag", "backend", "_backend"}


class StructuredRequestError(ValueError):
    """A constraint field the server cannot honour; `param` names it, `unsupported` says it is a missing feature
    rather than a malformed value."""

    def __init__(self, message: str, param: str, unsupported: bool = False):
        super().__init__(message)
        self.param, self.unsupported = param, unsupported


def _backend(value, param: str) -> None:
    if value is not None and value not in BACKENDS:
        raise StructuredRequestError(f"{param} {value!r} is not available: this server's grammar backend is "
                                     f"llguidance (accepted: {', '.join(BACKENDS)})", param, unsupported=True)


def _from_vllm(fields: dict, param: str) -> StructuredOutputsParams:
    """vLLM's structured_outputs dict (or the guided_* fields gathered under its keys)."""
    if not isinstance(fields, dict):
        raise StructuredRequestError(f"{param} must be an object, got {type(fields).__name__}", param)
    unknown = sorted(set(fields) - KEYS)
    if unknown:
        raise StructuredRequestError(f"{param}: unknown key(s) {unknown}; known: {sorted(KEYS)}", param)
    if fields.get("structural_tag") is not None:
        raise StructuredRequestError(f"{param}.structural_tag is not supported by this server", param, True)
    if fields.get("disable_additional_properties"):
        raise StructuredRequestError(f"{param}.disable_additional_properties is not supported by this server: give "
                                     "additionalProperties: false in the schema", param, True)
    if fields.get("disable_any_whitespace") is False:  # vLLM's default is False, but ours is compact JSON
        raise StructuredRequestError(f"{param}.disable_any_whitespace false is not supported: JSON is written "
                                     "compact; give whitespace_pattern to allow whitespace", param, True)
    _backend(fields.get("backend", fields.get("_backend")), f"{param}.backend")
    kw = {k: fields[k] for k in ("json", "regex", "choice", "grammar", "json_object", "whitespace_pattern")
          if fields.get(k) is not None}
    if not kw or set(kw) == {"whitespace_pattern"}:
        raise StructuredRequestError(f"{param} must give one of json, regex, choice, grammar, json_object", param)
    return StructuredOutputsParams(**kw)


def _from_response_format(fmt: dict) -> StructuredOutputsParams | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise StructuredRequestError("response_format json_schema needs json_schema.schema, a JSON schema "
                                         "object", "response_format")
        # strict or not, the schema is enforced in full: constrained decoding has no weaker mode
        return StructuredOutputsParams(json=spec["schema"])
    raise StructuredRequestError(f"response_format type {kind!r} is not supported by this server (supported: text, "
                                 "json_object, json_schema)", "response_format", unsupported=kind == "structural_tag")


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings); the values are SamplingParams' to check."""
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise StructuredRequestError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        out[token] = value
    return out


def constraint_param(req: Any) -> str:
    """The request field its compiled constraint came from: what a 400 names when the constraint does not compile."""
    tools = getattr(req, "tool_settings", None)
    if tools is not None and tools.structured_outputs() is not None:
        return "tools"
    fmt = getattr(req, "response_format", None)
    if fmt is not None and _from_response_format(fmt) is not None:
        return "response_format"
    return next((name for name in GUIDED if getattr(req, name) is not None), "structured_outputs")


def constraint_fields(req: Any) -> dict[str, Any]:
    """SamplingParams keywords (logit_bias, structured_outputs) from a request's fields."""
    kw: dict[str, Any] = {}
    if req.logit_bias:
        kw["logit_bias"] = _logit_bias(req.logit_bias)
    found: list[tuple[str, StructuredOutputsParams]] = []
    fmt = getattr(req, "response_format", None)  # chat and completions (not on _Request)
    if fmt is not None:
        spec = _from_response_format(fmt)
        if spec is not None:
            found.append(("response_format", spec))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", _from_vllm(req.structured_outputs, "structured_outputs")))
    guided = {key: getattr(req, name) for name, key in GUIDED.items() if getattr(req, name) is not None}
    _backend(req.guided_decoding_backend, "guided_decoding_backend")
    if req.guided_whitespace_pattern is not None:
        if "json" not in guided:
            raise StructuredRequestError("guided_whitespace_pattern applies to guided_json only",
                                         "guided_whitespace_pattern")
        guided["whitespace_pattern"] = req.guided_whitespace_pattern
    if len([k for k in guided if k != "whitespace_pattern"]) > 1:
        raise StructuredRequestError(f"at most one of {', '.join(GUIDED)} may be given", "guided_json")
    if guided:
        found.append((next(n for n, k in GUIDED.items() if k in guided), _from_vllm(guided, "guided_*")))
    if len(found) > 1:
        raise StructuredRequestError(f"{' and '.join(n for n, _ in found)} both constrain the output: give one",
                                     found[1][0])
    if found:
        kw["structured_outputs"] = found[0][1]
    return kw
