"""OpenAI request validation and response shapes (completions and chat completions).

Parsing is strict: an unknown field, a wrong type or a value we cannot honour is a
`RequestError` (HTTP 400) naming the field, never a silently different answer.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from lumos_jax.inference.sampling import SamplingParams


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


# Upper bounds for numbers a client sends: generous for any real use, small enough that no
# value reaches the engine's int32/uint32 device arrays out of range.
MAX_TOKENS = 1 << 20
MAX_TOP_K = 1 << 20
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
MAX_STOPS, MAX_STOP_CHARS = 4, 512


COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
          "user", "presence_penalty", "frequency_penalty", "logit_bias", "stream_options"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                        "response_format", "tools", "tool_choice", "parallel_tool_calls"}
# Accepted only at their no-op value.
NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0,
           "frequency_penalty": 0, "logit_bias": None, "suffix": None, "top_logprobs": None,
           "response_format": None, "tools": None, "tool_choice": None,
           "parallel_tool_calls": None, "stream_options": None}


@dataclass
class ParsedRequest:
    kind: str                   # "completion" or "chat"
    prompt_text: str | None
    messages: list | None
    sampling: SamplingParams
    stream: bool
    stops: tuple[str, ...]
    explicit_max_tokens: bool = True   # False: the server default, may be capped to the context


def _typed(body, key, types, default, check=None, what=""):
    if key not in body or body[key] is None:
        return default
    value = body[key]
    if isinstance(value, bool) and bool not in types:
        raise RequestError(f"'{key}' must be {what}, got {value!r}", key)
    if not isinstance(value, types):
        raise RequestError(f"'{key}' must be {what}, got {type(value).__name__}", key)
    if check is not None and not check(value):
        raise RequestError(f"'{key}' must be {what}, got {value!r}", key)
    return value


def parse_request(body, kind: str, default_max_tokens: int, eos_id: int | None,
                  model_name: str | None = None) -> ParsedRequest:
    """Validate one request body. `model_name`: the one model served (another name -> 404)."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    allowed = COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown parameter(s): {', '.join(unknown)}", unknown[0])
    model = _typed(body, "model", (str,), None, None, "a string")
    if model_name is not None and model is not None and model != model_name:
        raise RequestError(f"the model {model[:100]!r} does not exist (this server serves "
                           f"{model_name!r})", "model", 404, "model_not_found")
    _typed(body, "user", (str,), None, None, "a string")
    for key, neutral in NEUTRAL.items():
        value = body.get(key)
        if value is None or value == neutral or (neutral is None and value in (False, [], {})):
            continue
        shown = f" (only {neutral!r})" if neutral is not None else ""
        raise RequestError(f"'{key}'={value!r} is not supported by this server{shown}", key)
    prompt_text, messages = None, None
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string (one prompt per request)", "prompt")
        prompt_text = prompt
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                    m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}] must have a role (system/user/assistant) and "
                                   "string content", "messages")
    in_range = f"an integer in [1, {MAX_TOKENS}]"
    max_tokens = _typed(body, "max_tokens", (int,), None, lambda v: 0 < v <= MAX_TOKENS, in_range)
    if kind == "chat":
        max_tokens = _typed(body, "max_completion_tokens", (int,), max_tokens,
                            lambda v: 0 < v <= MAX_TOKENS, in_range)
    explicit = max_tokens is not None
    max_tokens = max_tokens or default_max_tokens
    temperature = _typed(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "in [0, 2]")
    top_p = _typed(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
    top_k = _typed(body, "top_k", (int,), 0, lambda v: 0 <= v <= MAX_TOP_K,
                   f"an integer in [0, {MAX_TOP_K}] (0: no top-k)")
    seed = _typed(body, "seed", (int,), 0, lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1],
                  "a 64-bit integer")
    stream = _typed(body, "stream", (bool,), False, None, "a boolean")
    stop = body.get("stop")
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    if any(not s for s in stops):
        raise RequestError("'stop' strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(f"'stop' strings must be at most {MAX_STOP_CHARS} characters", "stop")
    sampling = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                              max_new_tokens=int(max_tokens), seed=int(seed),
                              stop_ids=(eos_id,) if eos_id is not None else (), stop_strings=stops)
    return ParsedRequest(kind, prompt_text, messages, sampling, stream, stops, explicit)


def check_strings(value, where: str = "body") -> None:
    """Every string in the parsed body must be encodable as UTF-8: JSON's `\\ud800` escapes
    give lone surrogates, which the tokenizer and the reply would choke on later."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                field = at.split(".")[0].split("[")[0]
                raise RequestError(f"'{at}' contains a lone surrogate (\\u{ord(v[e.start]):04x} at "
                                   f"character {e.start}): not valid Unicode", field) from None
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, f"{at} (a key)"))
                stack.append((x, k if at == "body" else f"{at}.{k}"))
        elif isinstance(v, list):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(v))


def decode_json(raw: bytes):
    """Parse a request body: strict UTF-8 and strict JSON (no NaN/Infinity), one line errors."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"request body is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise RequestError("request body is empty; expected a JSON object")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RequestError(f"request body is not valid JSON ({e.msg} at line {e.lineno} "
                           f"column {e.colno})") from None
    except RecursionError:
        raise RequestError("request body is not valid JSON (nested too deeply)") from None
    check_strings(value)
    return value


def _reject_constant(name: str):
    raise RequestError(f"request body is not valid JSON ({name} is not a JSON number)")


def completion_text(tokenizer, prompt_ids, generated) -> str:
    """The text the generated ids add after the prompt: `decode(prompt + gen)` minus
    `decode(prompt)`, so a completion keeps its leading space ("Lily went" + " to the park")
    that decoding the generated ids alone drops (sentencepiece strips a leading space)."""
    prompt_ids = list(prompt_ids)
    return tokenizer.decode(prompt_ids + list(generated))[len(tokenizer.decode(prompt_ids)):]


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """Text before the first stop string (OpenAI returns it without the stop)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def response(kind: str, rid: str, model: str, text: str, finish: str, prompt_tokens: int,
             completion_tokens: int) -> dict:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage}


def chunk(kind: str, rid: str, model: str, text: str | None, finish: str | None,
          first: bool = False) -> dict:
    if kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        delta = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice]}


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
