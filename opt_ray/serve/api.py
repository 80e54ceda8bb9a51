"""The OpenAI-compatible completions API: request parsing and validation, response and
stream-chunk shapes, error mapping. No web framework and no Ray in here: the front end
(``opt_ray.serve.frontend``, with ``http`` and ``grpc_service`` on top) and the CLI call
these functions, and the gRPC service goes through the same parsing (its message is
turned into the same dict), so HTTP and gRPC validate identically.

Validation happens before anything reaches the engine: a bad value is an ``ApiError``
with HTTP 400 / INVALID_ARGUMENT and a message naming the field.

Parsing is two phases so that the expensive part can be bounded and moved off the event
loop: ``parse_body`` checks every field and the prompts' sizes without tokenising (a
prompt that cannot fit the context is refused here, before any tokeniser sees it), and
``tokenize`` encodes the string prompts and checks the context length. ``parse_completion``
runs both.

Prompts are accepted as OpenAI and vLLM accept them: a string, a list of strings, a list
of token ids, or a list of token-id lists. Choices are indexed across prompts x n (prompt
``p``'s choice ``i`` is ``p * n + i``), and ``echo`` + ``logprobs`` return vLLM's layout:
``{tokens, token_logprobs, top_logprobs, text_offset}``, the first prompt token's logprob
and top entry null, every other entry's top dict holding the top-k alternatives plus the
token itself. ``max_tokens: 0`` with ``echo`` (lm-eval's scoring request) returns the
prompt alone: as vLLM, the engine generates one token that the response leaves out.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

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
        return {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
                429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}.get(self.status, "INTERNAL")

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


def body_too_large(size: int | None, limit: int) -> ApiError:
    got = f" ({size} bytes)" if size is not None else ""
    return ApiError(f"request body too large{got}: the limit is {limit} bytes; send fewer or "
                    f"shorter prompts per request", status=413, param="body")


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------

@dataclass
class Prompt:
    """One prompt of a request: its text (for echo) and token ids (for the engine).
    A string prompt has no ids until ``tokenize``; an id prompt no text until then."""
    text: str | None
    token_ids: list[int] | None


@dataclass
class Limits:
    """Size limits of the served model, checked before tokenising."""
    max_model_len: int
    vocab_size: int
    # A string longer than this cannot fit the context whatever it encodes to (see
    # ``max_prompt_chars``); None: no check before tokenising.
    max_prompt_chars: int | None = None
    max_prompts: int = 256            # prompts per request (each is an engine request)


def max_prompt_chars(tokenizer, max_model_len: int) -> int:
    """An exact upper bound on the characters of a prompt that can still fit the context.

    Every token of a byte-level BPE covers at least one byte and at most ``longest`` bytes
    (the longest vocabulary entry), and a character is at least one byte, so a string of
    more than ``max_model_len * longest`` characters encodes to more than ``max_model_len``
    tokens. Checking that first bounds the tokeniser's work per request."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    longest = max((len(t) for t in vocab), default=1)
    return max_model_len * max(longest, 1)


@dataclass
class CompletionRequest:
    """A validated completions request, ready for the engine (one engine request per
    prompt). ``params.max_tokens`` is what the engine generates; ``echo_only`` marks a
    ``max_tokens: 0`` + ``echo`` request whose one generated token is left out."""
    model: str
    prompts: list[Prompt]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo_only: bool = False
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")

    @property
    def prompt_text(self) -> str:
        """The first prompt's text (the only one in a single-prompt request)."""
        return self.prompts[0].text or ""

    @property
    def prompt_token_ids(self) -> list[int]:
        """The first prompt's token ids (the only one in a single-prompt request)."""
        return self.prompts[0].token_ids or []

    def sub_request_id(self, p: int) -> str:
        """The engine request id of prompt ``p`` (unique per request and prompt)."""
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{p}"


# OpenAI fields we implement, plus vLLM's extensions (top_k, min_tokens, ...).
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream",
           "stream_options", "logprobs", "echo", "stop", "seed", "user", "top_k",
           "min_tokens", "repetition_penalty", "stop_token_ids", "ignore_eos",
           # accepted only at their neutral values:
           "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "suffix"}


MAX_STOP = 16


def _num(body: dict, name: str, kind: type, default: Any) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
            (kind is int and not float(v).is_integer()):
        raise bad(name, f"must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return kind(v)


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)


def _prompts(prompt: Any, limits: Limits) -> list[Prompt]:
    """The prompts of a body, in the four shapes OpenAI accepts, with their sizes checked."""
    if isinstance(prompt, str) or _is_ids(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        items = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        items = prompt
    else:
        raise bad("prompt", "must be a non-empty string, a list of strings, a list of token ids "
                            "or a list of token-id lists")
    if len(items) > limits.max_prompts:
        raise bad("prompt", f"{len(items)} prompts in one request; at most {limits.max_prompts}")
    out = []
    for i, p in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise bad("prompt", f"{where} must not be empty")
            if limits.max_prompt_chars is not None and len(p) > limits.max_prompt_chars:
                raise bad("prompt", f"{where} is too long ({len(p)} characters): it cannot fit the "
                                    f"model's context of {limits.max_model_len} tokens")
            out.append(Prompt(p, None))
            continue
        if not _is_ids(p):
            raise bad("prompt", f"{where} must be a non-empty list of token ids")
        if len(p) > limits.max_model_len:
            raise bad("prompt", f"{where} has {len(p)} tokens; the model's context is "
                                f"{limits.max_model_len} tokens")
        if any(not 0 <= t < limits.vocab_size for t in p):
            raise bad("prompt", f"{where}: token ids must be in [0, {limits.vocab_size})")
        out.append(Prompt(None, list(p)))
    return out


def parse_body(body: Any, *, model_name: str, limits: Limits) -> CompletionRequest:
    """Validate an OpenAI completions body (a dict from JSON) against the served model,
    without tokenising: every field, and every prompt's size."""
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
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
    prompts = _prompts(body.get("prompt"), limits)

    vocab_size = limits.vocab_size
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    # OpenAI allows 4; lm-eval sends a task's `until` list plus the EOS string (often more),
    # and vLLM takes any number: allow a few more, each bounded.
    if not isinstance(stop, list) or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop) \
            or len(stop) > MAX_STOP:
        raise bad("stop", f"must be a non-empty string or a list of up to {MAX_STOP} non-empty "
                          f"strings of at most 256 characters")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(type(t) is int and 0 <= t < vocab_size for t in stop_ids):
        raise bad("stop_token_ids", f"must be a list of token ids in [0, {vocab_size})")
    for name in ("stream", "echo", "ignore_eos"):
        if not isinstance(body.get(name, False), bool):
            raise bad(name, f"must be true or false, got {body[name]!r}")
    seed = body.get("seed")
    if seed is not None and type(seed) is not int:
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
    echo = body.get("echo", False)
    max_tokens = _num(body, "max_tokens", int, 16)
    echo_only = max_tokens == 0 and echo
    if echo_only:
        # vLLM's rule: score the prompt, generate nothing. The engine runs one step (it
        # always samples after the prefill); that token is not returned.
        max_tokens = 1

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", float, 1.0),
        top_p=_num(body, "top_p", float, 1.0),
        top_k=_num(body, "top_k", int, 0),
        repetition_penalty=_num(body, "repetition_penalty", float, 1.0),
        seed=seed, stop=stop, stop_token_ids=stop_ids,
        min_tokens=0 if echo_only else _num(body, "min_tokens", int, 0), n=n, logprobs=logprobs,
        echo=echo, ignore_eos=body.get("ignore_eos", False),
    )
    # The top_k API convention of vLLM: -1 also means off.
    if params.top_k == -1:
        params.top_k = 0
    try:
        params.validate()
    except UserError as e:
        msg = str(e)
        if msg.startswith("max_tokens"):
            msg += " (0 is allowed only with echo: true)"
        raise ApiError(msg, param=msg.split(" ", 1)[0]) from e
    if len(prompts) * n > 4096:
        raise bad("n", f"{len(prompts)} prompts x n={n} choices is more than 4096")
    req = CompletionRequest(model, prompts, params, stream=body.get("stream", False),
                            include_usage=bool(stream_options.get("include_usage")),
                            echo_only=echo_only)
    for p in prompts:
        if p.token_ids is not None:
            check_context(req, p, limits.max_model_len)
    return req


def check_context(req: CompletionRequest, p: Prompt, max_model_len: int) -> None:
    """400 when a prompt's tokens plus max_tokens do not fit the context."""
    P, m = len(p.token_ids or ()), req.params.max_tokens
    if P + m <= max_model_len:
        return
    if req.echo_only:
        raise bad("prompt", f"prompt ({P} tokens) does not fit the model's context of "
                            f"{max_model_len} tokens (scoring needs one free position)")
    raise bad("max_tokens", f"prompt ({P} tokens) + max_tokens ({m}) exceeds the model's "
                            f"context of {max_model_len} tokens")


def tokenize(req: CompletionRequest, tokenizer, max_model_len: int) -> CompletionRequest:
    """Encode the string prompts (and decode id prompts, for echo) and check the context.
    The CPU-heavy part of a request: the front end runs it on a thread pool."""
    for p in req.prompts:
        if p.token_ids is None:
            p.token_ids = tokenizer.encode(p.text).ids
            if not p.token_ids:
                raise bad("prompt", "encodes to no tokens")
            check_context(req, p, max_model_len)
        elif p.text is None:
            p.text = tokenizer.decode(p.token_ids) if req.params.echo else ""
    return req


def parse_completion(body: Any, *, model_name: str, tokenizer, max_model_len: int,
                     vocab_size: int, max_prompts: int = 256) -> CompletionRequest:
    """Validate and tokenise an OpenAI completions body in one call (the CLI, tests)."""
    limits = Limits(max_model_len, vocab_size, max_prompt_chars(tokenizer, max_model_len), max_prompts)
    return tokenize(parse_body(body, model_name=model_name, limits=limits), tokenizer, max_model_len)


# --------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------

class Accumulator:
    """Collects one prompt's engine deltas into full choices (non-streaming responses)
    and counts its tokens (usage)."""

    def __init__(self, req: CompletionRequest, prompt_index: int = 0):
        self.req, self.prompt_index = req, prompt_index
        self.choices: dict[int, CompletionOutput] = {
            i: CompletionOutput(i, "", [], [] if req.params.logprobs is not None else None)
            for i in range(req.params.n)}
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def prompt(self) -> Prompt:
        return self.req.prompts[self.prompt_index]

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
        if self.req.echo_only:
            return 0
        return sum(len(c.token_ids) for c in self.choices.values())

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.token_ids or ())

    def usage(self) -> dict[str, int]:
        return usage_of([self])


def usage_of(accs: Sequence[Accumulator]) -> dict[str, int]:
    """OpenAI usage: each prompt counted once (whatever n), every choice's tokens."""
    p = sum(a.prompt_tokens for a in accs)
    c = sum(a.completion_tokens for a in accs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def token_str(tokenizer, token_id: int) -> str:
    """One token as text, special tokens included (as vLLM shows them)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _clamp(lp: float) -> float:
    # JSON has no -inf; vLLM and OpenAI send -9999.0 for impossible tokens.
    return max(lp, -9999.0) if lp == lp else -9999.0


def logprobs_json(tokenizer, entries: Sequence[TokenLogprob | None], start_offset: int = 0,
                  *, first_token_id: int | None = None) -> dict[str, Any]:
    """OpenAI/vLLM's completions logprobs object for a list of tokens. An entry of None
    is the first prompt token under echo (no context to predict it from): its id is
    ``first_token_id`` and its logprob and top entry are null."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = start_offset
    for e in entries:
        if e is None:
            s = token_str(tokenizer, first_token_id) if first_token_id is not None else ""
            lps.append(None)
            tops.append(None)
        else:
            s = token_str(tokenizer, e.token_id)
            lps.append(_clamp(e.logprob))
            # The top-k alternatives plus the token itself (vLLM: up to k + 1 entries).
            top = {token_str(tokenizer, t): _clamp(lp) for t, lp in e.top}
            top.setdefault(s, _clamp(e.logprob))
            tops.append(top)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _prompt_entries(prompt_logprobs) -> list[TokenLogprob | None]:
    """Echoed prompt tokens as logprob entries; the first one has no logprob (None)."""
    if prompt_logprobs is None:
        return []
    return [None] + list(prompt_logprobs[1:])


def _choice_index(req: CompletionRequest, prompt_index: int, i: int) -> int:
    return prompt_index * req.params.n + i


def completion_response(accs: Accumulator | Sequence[Accumulator], tokenizer) -> dict[str, Any]:
    """The non-streaming response: one choice per prompt x n, in that order."""
    accs = [accs] if isinstance(accs, Accumulator) else list(accs)
    req = accs[0].req
    echo, want_lp = req.params.echo, req.params.logprobs is not None
    choices = []
    for acc in accs:
        prompt = acc.prompt
        for i, c in sorted(acc.choices.items()):
            gen_text, gen_lps = ("", []) if req.echo_only else (c.text, c.logprobs or [])
            text = (prompt.text or "") + gen_text if echo else gen_text
            lp = None
            if want_lp:
                entries = (_prompt_entries(acc.prompt_logprobs) if echo else []) + list(gen_lps)
                lp = logprobs_json(tokenizer, entries, 0,
                                   first_token_id=(prompt.token_ids or [None])[0])
            choices.append({"index": _choice_index(req, acc.prompt_index, i), "text": text,
                            "logprobs": lp, "finish_reason": c.finish_reason or "length"})
    return {"id": req.request_id, "object": "text_completion", "created": int(time.time()),
            "model": req.model, "choices": choices, "usage": usage_of(accs)}


def stream_chunks(req: CompletionRequest, out: RequestOutput, tokenizer, *, first: bool,
                  prompt_index: int = 0, offsets: dict[int, int] | None = None) -> list[dict[str, Any]]:
    """The SSE chunk objects for one engine delta of prompt ``prompt_index`` (one chunk,
    a choice per index). ``offsets`` (choice index -> characters sent so far) carries the
    text offsets of logprobs across chunks, as vLLM does."""
    offsets = {} if offsets is None else offsets
    want_lp = req.params.logprobs is not None
    prompt = req.prompts[prompt_index]
    choices = []
    if first and req.params.echo:
        entries = _prompt_entries(out.prompt_logprobs)
        for i in range(req.params.n):
            idx = _choice_index(req, prompt_index, i)
            lp = logprobs_json(tokenizer, entries, 0, first_token_id=(prompt.token_ids or [None])[0]) \
                if want_lp else None
            choices.append({"index": idx, "text": prompt.text or "", "finish_reason": None, "logprobs": lp})
            offsets[idx] = len(prompt.text or "")
    for c in out.outputs:
        if c.finish_reason == "abort":
            continue
        idx = _choice_index(req, prompt_index, c.index)
        text, lps = ("", []) if req.echo_only else (c.text, c.logprobs or [])
        lp = logprobs_json(tokenizer, lps, offsets.get(idx, 0)) if want_lp else None
        offsets[idx] = offsets.get(idx, 0) + len(text)
        if not c.finish_reason and (req.echo_only or not (text or (want_lp and lps))):
            continue                       # nothing to show yet (a held-back partial character)
        choices.append({"index": idx, "text": text, "finish_reason": c.finish_reason, "logprobs": lp})
    if not choices:
        return []
    return [{"id": req.request_id, "object": "text_completion", "created": int(time.time()),
             "model": req.model, "choices": choices}]


def usage_chunk(accs: Accumulator | Sequence[Accumulator]) -> dict[str, Any]:
    accs = [accs] if isinstance(accs, Accumulator) else list(accs)
    req = accs[0].req
    return {"id": req.request_id, "object": "text_completion", "created": int(time.time()),
            "model": req.model, "choices": [], "usage": usage_of(accs)}


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
            lp = ch.logprobs.add(token_id=e.token_id, token=token_str(tokenizer, e.token_id),
                                 logprob=_clamp(e.logprob))
            for t, v in e.top:
                lp.top.add(token_id=t, token=token_str(tokenizer, t), logprob=_clamp(v))
    if usage is not None:
        resp.usage.CopyFrom(pb.Usage(**usage))
    return resp
