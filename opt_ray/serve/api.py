"""The OpenAI-compatible completions API: request parsing and validation, response and
stream-chunk shapes, error mapping. No web framework and no Ray in here: the Serve
ingress (``actors/serve.py``) and the CLI call these functions, and the gRPC service
goes through the same ``parse_completion`` (its message is turned into the same dict),
so HTTP and gRPC validate identically.

Validation happens before anything reaches the engine: a bad value is an ``ApiError``
with HTTP 400 / INVALID_ARGUMENT and a message naming the field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from opt_ray.errors import UserError
from opt_ray.serve.engine import CompletionOutput, RequestOutput, TokenLogprob
from opt_ray.serve.sampling import SamplingParams


class ApiError(UserError):
    """An error answered to the client. ``status`` is the HTTP status; ``grpc_code`` the
    name of the matching ``grpc.StatusCode``; ``param`` the offending field."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", retry_after_s: int | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type = message, status, param, type
        self.retry_after_s = retry_after_s

    @property
    def grpc_code(self) -> str:
        return {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                503: "UNAVAILABLE"}.get(self.status, "INTERNAL")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


def bad(param: str, why: str) -> ApiError:
    return ApiError(f"{param}: {why}", param=param)


def queue_full(detail: str = "", retry_after_s: int = 1) -> ApiError:
    return ApiError(f"server busy: request queue is full{': ' + detail if detail else ''}; "
                    f"retry after {retry_after_s}s", status=429, type="rate_limit_error",
                    retry_after_s=retry_after_s)


@dataclass
class CompletionRequest:
    """A validated completions request, ready for the engine."""
    model: str
    prompt_text: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")


# OpenAI fields we implement, plus vLLM's extensions (top_k, min_tokens, ...).
_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream",
           "stream_options", "logprobs", "echo", "stop", "seed", "user", "top_k",
           "min_tokens", "repetition_penalty", "stop_token_ids", "ignore_eos",
           # accepted only at their neutral values:
           "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "suffix"}


def _num(body: dict, name: str, kind: type, default: Any) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise bad(name, f"must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return kind(v)


def parse_completion(body: Any, *, model_name: str, tokenizer, max_model_len: int,
                     vocab_size: int) -> CompletionRequest:
    """Validate an OpenAI completions body (a dict from JSON) against the served model."""
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise bad(unknown[0], f"unknown field(s) {unknown}")
    model = body.get("model") or model_name
    if model != model_name:
        raise ApiError(f"model: unknown model {model!r}; this server serves {model_name!r}",
                       param="model")
    for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("suffix", None),
                          ("logit_bias", None)):
        if body.get(name) not in (neutral, None, {}):
            raise bad(name, "is not supported by this server (use repetition_penalty)")

    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                           # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "must not be empty")
        text, ids = prompt, tokenizer.encode(prompt).ids
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < vocab_size for t in prompt):
            raise bad("prompt", f"token ids must be in [0, {vocab_size})")
        ids, text = list(prompt), tokenizer.decode(list(prompt))
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("prompt", "batches of prompts are not supported; send one request per prompt")
    else:
        raise bad("prompt", "must be a non-empty string or a non-empty list of token ids")
    if not ids:
        raise bad("prompt", "encodes to no tokens")

    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad("stop", "must be a non-empty string or a list of up to 4 non-empty strings")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in stop_ids):
        raise bad("stop_token_ids", f"must be a list of token ids in [0, {vocab_size})")
    for name in ("stream", "echo", "ignore_eos"):
        if not isinstance(body.get(name, False), bool):
            raise bad(name, f"must be true or false, got {body[name]!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"must be an integer, got {seed!r}")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _num(body, "logprobs", int, None)
    n = _num(body, "n", int, 1)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("best_of", "is not supported (must equal n)")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise bad("stream_options", "only {'include_usage': bool} is supported")

    params = SamplingParams(
        max_tokens=_num(body, "max_tokens", int, 16),
        temperature=_num(body, "temperature", float, 1.0),
        top_p=_num(body, "top_p", float, 1.0),
        top_k=_num(body, "top_k", int, 0),
        repetition_penalty=_num(body, "repetition_penalty", float, 1.0),
        seed=seed, stop=stop, stop_token_ids=stop_ids,
        min_tokens=_num(body, "min_tokens", int, 0), n=n, logprobs=logprobs,
        echo=body.get("echo", False), ignore_eos=body.get("ignore_eos", False),
    )
    # The top_k API convention of vLLM: -1 also means off.
    if params.top_k == -1:
        params.top_k = 0
    try:
        params.validate()
    except UserError as e:
        raise ApiError(str(e), param=str(e).split(" ", 1)[0]) from e
    if len(ids) + params.max_tokens > max_model_len:
        raise bad("max_tokens", f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                                f"exceeds the model's context of {max_model_len} tokens")
    return CompletionRequest(model, text, ids, params, stream=body.get("stream", False),
                             include_usage=bool(stream_options.get("include_usage")))


# --------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------

class Accumulator:
    """Collects a request's engine deltas into full choices (non-streaming responses)
    and counts tokens (usage)."""

    def __init__(self, req: CompletionRequest):
        self.req = req
        self.choices: dict[int, CompletionOutput] = {
            i: CompletionOutput(i, "", [], [] if req.params.logprobs is not None else None)
            for i in range(req.params.n)}
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        for c in out.outputs:
            a = self.choices[c.index]
            a.text += c.text
            a.token_ids += c.token_ids
            if c.logprobs:
                a.logprobs += c.logprobs
            a.finish_reason = c.finish_reason or a.finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices.values())

    def usage(self) -> dict[str, int]:
        p = len(self.req.prompt_token_ids)
        return {"prompt_tokens": p, "completion_tokens": self.completion_tokens,
                "total_tokens": p + self.completion_tokens}


def _token_str(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def logprobs_json(tokenizer, entries: list[TokenLogprob | None], start_offset: int) -> dict[str, Any]:
    """OpenAI's completions logprobs object for a list of tokens."""
    tokens, lps, tops, offsets = [], [], [], []
    offset = start_offset
    for e in entries:
        if e is None:                    # the first prompt token under echo
            continue
        s = _token_str(tokenizer, e.token_id)
        tokens.append(s)
        lps.append(e.logprob)
        tops.append({_token_str(tokenizer, t): lp for t, lp in e.top} if e.top else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _prompt_entries(req: CompletionRequest, prompt_logprobs) -> list[TokenLogprob | None]:
    """Echoed prompt tokens as logprob entries; the first one has no logprob (null)."""
    if prompt_logprobs is None:
        return []
    first = TokenLogprob(req.prompt_token_ids[0], None, [])  # type: ignore[arg-type]
    return [first] + list(prompt_logprobs[1:])


def completion_response(acc: Accumulator, tokenizer) -> dict[str, Any]:
    req = acc.req
    choices = []
    for i, c in sorted(acc.choices.items()):
        text = (req.prompt_text if req.params.echo else "") + c.text
        lp = None
        if req.params.logprobs is not None:
            entries = (_prompt_entries(req, acc.prompt_logprobs) if req.params.echo else []) + c.logprobs
            lp = logprobs_json(tokenizer, entries, 0)
        choices.append({"index": i, "text": text, "logprobs": lp,
                        "finish_reason": c.finish_reason or "length"})
    return {"id": req.request_id, "object": "text_completion", "created": int(time.time()),
            "model": req.model, "choices": choices, "usage": acc.usage()}


def stream_chunks(req: CompletionRequest, out: RequestOutput, tokenizer, *, first: bool) -> list[dict[str, Any]]:
    """The SSE chunk objects for one engine delta (one chunk, a choice per index)."""
    choices = []
    if first and req.params.echo:
        entries = _prompt_entries(req, out.prompt_logprobs)
        for i in range(req.params.n):
            choices.append({"index": i, "text": req.prompt_text, "finish_reason": None,
                            "logprobs": logprobs_json(tokenizer, entries, 0) if req.params.logprobs is not None else None})
    for c in out.outputs:
        if c.finish_reason == "abort":
            continue
        choices.append({"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                        "logprobs": logprobs_json(tokenizer, c.logprobs or [], 0)
                        if req.params.logprobs is not None else None})
    if not choices:
        return []
    return [{"id": req.request_id, "object": "text_completion", "created": int(time.time()),
             "model": req.model, "choices": choices}]


def usage_chunk(acc: Accumulator) -> dict[str, Any]:
    return {"id": acc.req.request_id, "object": "text_completion", "created": int(time.time()),
            "model": acc.req.model, "choices": [], "usage": acc.usage()}


def models_response(model_name: str, max_model_len: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "opt-ray", "max_model_len": max_model_len}]}


# --------------------------------------------------------------------------------------
# gRPC (opt_ray.v1.GenerationService): the same validation through the same dict
# --------------------------------------------------------------------------------------

_GRPC_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
                  "min_tokens", "n", "logprobs")


def body_from_grpc(msg) -> dict[str, Any]:
    """A ``GenerateRequest`` as the equivalent completions body (unset fields omitted)."""
    body: dict[str, Any] = {"model": msg.model or None, "echo": msg.echo, "ignore_eos": msg.ignore_eos,
                            "prompt": list(msg.prompt_token_ids) if msg.prompt_token_ids else msg.prompt}
    for name in _GRPC_OPTIONAL:
        if msg.HasField(name):
            v = getattr(msg, name)
            # proto floats are float32: round so 0.9 arrives as 0.9, not 0.899999976.
            body[name] = round(v, 6) if isinstance(v, float) else v
    if msg.stop:
        body["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        body["stop_token_ids"] = list(msg.stop_token_ids)
    return body


def grpc_response(req: CompletionRequest, choices: list[CompletionOutput], tokenizer,
                  usage: dict[str, int] | None = None):
    """A ``GenerateResponse`` with the given choices (full ones, or a stream's deltas)."""
    from opt_ray.v1 import generate_pb2 as pb

    resp = pb.GenerateResponse(id=req.request_id, model=req.model)
    for c in choices:
        ch = resp.choices.add(index=c.index, text=c.text, token_ids=c.token_ids,
                              finish_reason=c.finish_reason or "")
        for e in c.logprobs or []:
            lp = ch.logprobs.add(token_id=e.token_id, token=_token_str(tokenizer, e.token_id),
                                 logprob=e.logprob)
            for t, v in e.top:
                lp.top.add(token_id=t, token=_token_str(tokenizer, t), logprob=v)
    if usage is not None:
        resp.usage.CopyFrom(pb.Usage(**usage))
    return resp
