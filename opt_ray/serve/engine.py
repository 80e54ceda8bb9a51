"""The serving engine: continuous batching over a slot-based KV cache. No Ray in here.

One ``Engine.step()`` is a short numbered sequence, as in vLLM:
  1. intake:   apply aborts and move newly added requests to the waiting queue;
  2. schedule: admit waiting requests FCFS while free slots and the prefill token
               budget allow (iteration-level batching: requests join at every step);
  3. prefill:  one forward over the admitted prompts (right-padded), writing their
               keys/values into their slots;
  4. decode:   one batched forward of one token for every other running sequence;
  5. sample + emit: pick tokens, check stops, detokenize incrementally, free the slots
               of finished sequences at once (requests leave at every step).

KV cache: per layer one preallocated buffer (num_slots, heads, max_len + 1, head_dim),
zero-filled so its memory is really committed. The slot count comes from a byte budget.
Preallocated slots (not paged blocks) because on CPU the decode step is dominated by the
weight matmuls; a slot is written in place and read back as a strided view, so no step
copies or concatenates the cache (HF's DynamicCache re-concatenates every step).
The decode batch covers slot rows 0..n-1 (n = highest busy slot + 1) so the cache is a
view, not a gather; idle rows in between cost a little compute and write their k/v into
the spare last column, which no real query ever sees.

Two error tiers: ``RequestError`` (a ``UserError``: this request is bad or cannot be
admitted; the engine carries on) and ``EngineDeadError`` (a step failed: every request
fails and the replica must be restarted).

``EngineLoop`` drives an engine from a background thread for asyncio callers (the Ray
Serve replica, the CLI); torch releases the GIL in its kernels so the event loop stays
responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch

from opt_ray.errors import UserError
from opt_ray.model.opt import OPT
from opt_ray.serve.sampling import SamplingParams, make_generator, sample_row


# --------------------------------------------------------------------------------------
# Errors, config, typed records
# --------------------------------------------------------------------------------------

class RequestError(UserError):
    """This request cannot be served (bad parameters, too long); the engine is fine."""


class QueueFullError(RequestError):
    """The bounded waiting queue is full: retry later (HTTP 429 / RESOURCE_EXHAUSTED)."""


class EngineDeadError(RuntimeError):
    """A step failed: the engine's state is unknown, the replica must be replaced."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """Capacity and scheduling knobs of one engine (one Serve replica)."""
    max_num_seqs: int = 8             # upper bound on concurrently decoding sequences
    max_model_len: int | None = None  # tokens per slot (prompt + output); None = model context
    kv_cache_bytes: int | None = None  # KV memory budget; None = exactly max_num_seqs slots
    max_waiting: int = 64             # bounded queue; beyond it add_request raises QueueFullError
    max_prefill_tokens: int = 2048    # prompt tokens prefilled per step (>= 1 request always)
    dtype: str = "float32"
    device: str | None = None         # None: "cuda" when available, else "cpu"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_waiting", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"engine.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise UserError(f"engine.max_model_len must be >= 2, got {self.max_model_len!r}")
        if self.dtype not in _DTYPES:
            raise UserError(f"engine.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")


@dataclass
class EngineRequest:
    """What crosses into the engine: already tokenized and validated."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]      # the top-k alternatives (id, logprob), best first


@dataclass
class CompletionOutput:
    """What one of a request's n sequences produced in one step (a delta)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool
    num_prompt_tokens: int
    # Only on a request's first output, when echo + logprobs asked for them; entry 0 is
    # None (the first prompt token has no context to be predicted from).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EngineStats:
    num_slots: int
    free_slots: int
    running_requests: int
    running_seqs: int
    waiting_requests: int
    kv_tokens_used: int
    kv_tokens_capacity: int
    kv_cache_bytes: int
    steps: int
    output_tokens: int
    aborted_requests: int


# --------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------

class SlotKVCache:
    """Preallocated keys/values: per layer (num_slots, heads, max_len + 1, head_dim).
    Column ``max_len`` is scratch for idle decode rows."""

    def __init__(self, num_layers: int, num_slots: int, num_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_slots, num_heads, max_len + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_len = num_slots, max_len

    @staticmethod
    def bytes_per_slot(num_layers: int, hidden: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * hidden * (max_len + 1) * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Duplicate a prefilled prompt into another slot (the n > 1 choices)."""
        for buf in self.k + self.v:
            buf[dst, :, :length] = buf[src, :, :length]


class _PrefillWriter:
    """``Cache`` for prompts starting at position 0, row b going to ``slots[b]``: writes
    the keys/values into the slots and attends to exactly them. Prompts are right-padded
    to a common length; a real query i only sees keys j <= i (causal), all real, and the
    padding written past a prompt's end is overwritten by decode before anyone reads it."""
    length = 0

    def __init__(self, kv: SlotKVCache, slots: list[int]):
        self.kv, self.slots = kv, torch.tensor(slots, device=kv.k[0].device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.kv.k[layer][self.slots, :, :T] = k
        self.kv.v[layer][self.slots, :, :T] = v
        return k, v


class _DecodeView:
    """``Cache`` for one decode step over slot rows 0..n-1: row r writes its new key at
    ``positions[r]`` and attends to a view of columns 0..L-1 (masked per row)."""

    def __init__(self, kv: SlotKVCache, n: int, positions: torch.Tensor, L: int):
        self.kv, self.n, self.positions, self.L = kv, n, positions, L
        self.rows = torch.arange(n, device=positions.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kb, vb = self.kv.k[layer], self.kv.v[layer]
        kb[self.rows, :, self.positions] = k[:, :, 0]                # (n, nh, hs)
        vb[self.rows, :, self.positions] = v[:, :, 0]
        return kb[: self.n, :, : self.L], vb[: self.n, :, : self.L]  # views, no copy


# --------------------------------------------------------------------------------------
# Incremental detokenization
# --------------------------------------------------------------------------------------

class IncrementalDetokenizer:
    """Streams text as tokens arrive without ever emitting a broken UTF-8 character.

    Byte-level BPE splits multi-byte characters across tokens; decoding such a prefix
    yields U+FFFD. We decode a short window (prefix_offset..end) and emit only what it adds
    beyond the already-emitted part (prefix_offset..read_offset), and hold back while it
    ends in U+FFFD (TGI's / vLLM's method). Concatenated deltas equal decode(all ids)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back, replacement characters included."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


# --------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------

@dataclass
class _Seq:
    index: int
    slot: int
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    emitted_logprobs: int = 0
    finish_reason: str | None = None
    reported: bool = False            # finish already sent to the caller


@dataclass
class _Running:
    req: EngineRequest
    seqs: list[_Seq]
    seen: torch.Tensor                # prompt ids (for the repetition penalty)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    sent_first: bool = False


class Engine:
    """Continuous-batching generation over one OPT model. ``add_request`` and
    ``abort_request`` may be called from any thread; ``step`` from one thread only."""

    def __init__(self, model: OPT, tokenizer, config: EngineConfig | None = None,
                 *, eos_token_id: int | None = None):
        self.config = config or EngineConfig()
        cfg = model.config
        self.dtype = _DTYPES[self.config.dtype]
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.eos_token_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
        self.max_model_len = min(self.config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        per_slot = SlotKVCache.bytes_per_slot(cfg.num_hidden_layers, cfg.hidden_size,
                                              self.max_model_len, self.dtype)
        num_slots = self.config.max_num_seqs
        if self.config.kv_cache_bytes is not None:
            num_slots = min(num_slots, self.config.kv_cache_bytes // per_slot)
            if num_slots < 1:
                raise UserError(
                    f"engine.kv_cache_bytes={self.config.kv_cache_bytes} holds no sequence of "
                    f"max_model_len={self.max_model_len} ({per_slot} bytes each); raise the "
                    f"budget or lower max_model_len")
        self.kv = SlotKVCache(cfg.num_hidden_layers, num_slots, cfg.num_attention_heads,
                              cfg.head_dim, self.max_model_len, self.dtype, self.device)
        self.free_slots: list[int] = list(range(num_slots))   # kept sorted: lowest first
        self.waiting: deque[EngineRequest] = deque()
        self.running: dict[str, _Running] = {}
        self._inbox_lock = threading.Lock()
        self._new: deque[EngineRequest] = deque()
        self._aborts: set[str] = set()
        self._known: set[str] = set()
        self.steps = 0
        self.output_tokens = 0
        self.aborted = 0

    # ---- thread-safe intake ------------------------------------------------------------

    def add_request(self, req: EngineRequest) -> None:
        """Queue a request. Raises ``RequestError`` (bad/too long) or ``QueueFullError``."""
        req.params.validate()
        P = len(req.prompt_token_ids)
        if P == 0:
            raise RequestError("prompt must not be empty")
        if P + req.params.max_tokens > self.max_model_len:
            raise RequestError(
                f"max_tokens: prompt ({P} tokens) + max_tokens ({req.params.max_tokens}) "
                f"exceeds the context of {self.max_model_len} tokens")
        if req.params.n > self.kv.num_slots:
            raise RequestError(f"n must be <= {self.kv.num_slots} (KV slots of this replica), "
                               f"got {req.params.n}")
        vocab = self.model.config.vocab_size
        if any(not (0 <= t < vocab) for t in req.prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        with self._inbox_lock:
            if req.request_id in self._known:
                raise RequestError(f"request_id {req.request_id!r} is already in use")
            # Requests not yet admitted: the ones free slots will take at the next step
            # do not count as waiting (free_slots is read racily; it only errs by a step).
            if len(self.waiting) + len(self._new) >= self.config.max_waiting + len(self.free_slots):
                raise QueueFullError(
                    f"queue full ({self.config.max_waiting} requests waiting); retry later")
            self._known.add(req.request_id)
            self._new.append(req)

    def abort_request(self, request_id: str) -> None:
        """Cancel a request; its slots and KV memory are freed at the start of the next step."""
        with self._inbox_lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._inbox_lock:
            return bool(self.waiting or self.running or self._new or self._aborts)

    def stats(self) -> EngineStats:
        """A snapshot; safe to call from another thread while ``step`` runs (the list()
        copies happen under the GIL, so the dicts cannot change mid-iteration)."""
        running = list(self.running.values())
        return EngineStats(
            num_slots=self.kv.num_slots,
            free_slots=len(self.free_slots),
            running_requests=len(running),
            running_seqs=sum(len(r.seqs) for r in running),
            waiting_requests=len(self.waiting) + len(self._new),
            kv_tokens_used=sum(len(r.req.prompt_token_ids) + len(s.token_ids)
                               for r in running for s in r.seqs),
            kv_tokens_capacity=self.kv.num_slots * self.max_model_len,
            kv_cache_bytes=self.kv.nbytes,
            steps=self.steps,
            output_tokens=self.output_tokens,
            aborted_requests=self.aborted,
        )

    # ---- the step ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One iteration; returns a delta for every request that produced something."""
        try:
            outputs = self._intake()                         # 1. aborts, new requests
            admitted = self._schedule()                      # 2. who joins the batch
            decoding = [s for r in self.running.values() for s in r.seqs
                        if s.finish_reason is None and r.req.request_id not in admitted]
            if admitted:                                     # 3. prefill newcomers
                self._prefill([self.running[rid] for rid in admitted])
            if decoding:                                     # 4. one token for the rest
                self._decode(decoding)
            outputs += self._emit()                          # 5. deltas, free finished slots
        except (RequestError, QueueFullError):
            raise
        except Exception as e:
            raise EngineDeadError(f"engine step failed: {e!r}") from e
        self.steps += 1
        return outputs

    def _intake(self) -> list[RequestOutput]:
        with self._inbox_lock:
            self.waiting.extend(self._new)
            self._new.clear()
            aborts, self._aborts = self._aborts, set()
        outputs = []
        for rid in aborts:
            self._known.discard(rid)
            if rid in self.running:
                self.aborted += 1
                run = self.running.pop(rid)
                for s in run.seqs:
                    self._free(s.slot)
                outputs.append(RequestOutput(rid, [CompletionOutput(s.index, "", [], None, "abort")
                                                   for s in run.seqs if not s.reported],
                                             True, len(run.req.prompt_token_ids)))
            else:
                kept = [r for r in self.waiting if r.request_id != rid]
                if len(kept) != len(self.waiting):
                    self.aborted += 1
                    self.waiting = deque(kept)
                    outputs.append(RequestOutput(rid, [], True, 0))
        return outputs

    def _schedule(self) -> list[str]:
        admitted: list[str] = []
        budget = self.config.max_prefill_tokens
        while self.waiting:
            req = self.waiting[0]
            P = len(req.prompt_token_ids)
            # Prompts are prefilled together, padded to the longest: budget the padded size.
            longest = max([P] + [len(self.running[r].req.prompt_token_ids) for r in admitted])
            if len(self.free_slots) < req.params.n or (admitted and longest * (len(admitted) + 1) > budget):
                break                      # FCFS: no overtaking, so no starvation
            self.waiting.popleft()
            slots = [self.free_slots.pop(0) for _ in range(req.params.n)]
            seed = req.params.seed
            seqs = [_Seq(i, slot,
                         None if req.params.greedy else make_generator(None if seed is None else seed + i),
                         IncrementalDetokenizer(self.tokenizer))
                    for i, slot in enumerate(slots)]
            self.running[req.request_id] = _Running(req, seqs, torch.tensor(req.prompt_token_ids))
            admitted.append(req.request_id)
        return admitted

    def _free(self, slot: int) -> None:
        self.free_slots.append(slot)
        self.free_slots.sort()

    def _prefill(self, runs: list[_Running]) -> None:
        """One forward over all newcomers' prompts (right-padded), then their first token."""
        pad = self.model.config.pad_token_id
        lens = [len(r.req.prompt_token_ids) for r in runs]
        T = max(lens)
        ids = torch.tensor([r.req.prompt_token_ids + [pad] * (T - len(r.req.prompt_token_ids)) for r in runs],
                           device=self.device)
        h = self.model.hidden_states(ids, cache=_PrefillWriter(self.kv, [r.seqs[0].slot for r in runs]))
        last_h = h[torch.arange(len(runs), device=self.device),
                   torch.tensor(lens, device=self.device) - 1]                       # (B, d)
        # Sampling runs on the CPU with per-request CPU generators: reproducible anywhere.
        last_logits = self.model.lm_head(last_h).float().cpu()                       # (B, V)
        for b, run in enumerate(runs):
            p, P = run.req.params, lens[b]
            if p.echo and p.logprobs is not None:
                lp = torch.log_softmax(self.model.lm_head(h[b, : P - 1]).float(), dim=-1).cpu()  # (P-1, V)
                run.prompt_logprobs = [None] + [
                    _token_logprob(lp[i], run.req.prompt_token_ids[i + 1], p.logprobs)
                    for i in range(P - 1)]
            for s in run.seqs[1:]:
                self.kv.copy_slot(run.seqs[0].slot, s.slot, P)
            for s in run.seqs:
                self._accept(run, s, last_logits[b])

    def _decode(self, seqs: list[_Seq]) -> None:
        by_slot = {s.slot: s for s in seqs}
        n = max(by_slot) + 1
        scratch = self.kv.max_len
        tokens = torch.full((n,), self.model.config.pad_token_id, dtype=torch.long)
        positions = torch.full((n,), scratch, dtype=torch.long)
        owner = {}
        for run in self.running.values():
            for s in run.seqs:
                if s.slot in by_slot:
                    owner[s.slot] = run
                    tokens[s.slot] = s.token_ids[-1]
                    positions[s.slot] = len(run.req.prompt_token_ids) + len(s.token_ids) - 1
        L = int(positions[list(by_slot)].max()) + 1
        # Row r attends to its own keys 0..positions[r]; idle rows see column 0 only (its
        # contents are irrelevant, it just keeps their softmax finite).
        cols = torch.arange(L)
        visible = cols.unsqueeze(0) <= positions.clamp(max=L - 1).unsqueeze(1)      # (n, L)
        idle = positions == scratch
        visible[idle] = cols == 0
        dev = self.device
        h = self.model.hidden_states(
            tokens.unsqueeze(1).to(dev),
            position_ids=torch.where(idle, 0, positions).unsqueeze(1).to(dev),
            cache=_DecodeView(self.kv, n, positions.to(dev), L),
            attn_mask=visible[:, None, None, :].to(dev),                          # (n, 1, 1, L)
        )                                                                          # (n, 1, d)
        rows = sorted(by_slot)
        logits = self.model.lm_head(h[rows, 0]).float().cpu()                     # (m, V)
        for i, slot in enumerate(rows):
            self._accept(owner[slot], by_slot[slot], logits[i])

    def _accept(self, run: _Running, s: _Seq, logits: torch.Tensor) -> None:
        """Sample one token for ``s`` from its logits row and apply the stop rules."""
        p = run.req.params
        if len(s.token_ids) < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else [self.eos_token_id])
            logits = logits.clone()
            logits[banned] = float("-inf")
        seen = run.seen if p.repetition_penalty == 1.0 else \
            torch.cat([run.seen, torch.tensor(s.token_ids, dtype=torch.long)])
        tok = sample_row(logits, p, seen, s.generator)
        may_stop = len(s.token_ids) >= p.min_tokens
        if may_stop and ((tok == self.eos_token_id and not p.ignore_eos) or tok in p.stop_token_ids):
            s.finish_reason = "stop"       # the stop token itself is not part of the output
            s.text += s.detok.flush()
            return
        s.token_ids.append(tok)
        self.output_tokens += 1
        if p.logprobs is not None:
            s.logprobs.append(_token_logprob(torch.log_softmax(logits, -1), tok, p.logprobs))
        s.text += s.detok.push(tok)
        if len(s.token_ids) >= p.max_tokens:
            s.finish_reason = "length"
            s.text += s.detok.flush()
        if may_stop and p.stop:
            # Only the tail can hold a new match: search from just before the emitted part.
            start = max(0, s.emitted_chars - max(map(len, p.stop)) + 1)
            hits = [i for i in (s.text.find(x, start) for x in p.stop) if i >= 0]
            if hits:
                s.text = s.text[: min(hits)]
                s.finish_reason = "stop"

    def _emit(self) -> list[RequestOutput]:
        outputs, done = [], []
        for rid, run in self.running.items():
            p = run.req.params
            hold = max(map(len, p.stop)) - 1 if p.stop else 0
            deltas = []
            for s in run.seqs:
                if s.reported:
                    continue
                # Hold back a tail that may be the start of a stop string.
                end = len(s.text) if s.finish_reason else max(s.emitted_chars, len(s.text) - hold)
                text = s.text[s.emitted_chars:end]
                toks = s.token_ids[s.emitted_tokens:]
                lps = s.logprobs[s.emitted_logprobs:] if p.logprobs is not None else None
                if text or toks or s.finish_reason:
                    deltas.append(CompletionOutput(s.index, text, toks, lps, s.finish_reason))
                s.emitted_chars, s.emitted_tokens, s.emitted_logprobs = end, len(s.token_ids), len(s.logprobs)
                if s.finish_reason:
                    s.reported = True
                    self._free(s.slot)     # the slot is reusable from the next step on
            finished = all(s.reported for s in run.seqs)
            if deltas or finished:
                out = RequestOutput(rid, deltas, finished, len(run.req.prompt_token_ids))
                if not run.sent_first:
                    out.prompt_logprobs, run.sent_first = run.prompt_logprobs, True
                outputs.append(out)
            if finished:
                done.append(rid)
        for rid in done:
            del self.running[rid]
            self._known.discard(rid)
        return outputs

    # ---- one-shot convenience ------------------------------------------------------------

    def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> list[CompletionOutput]:
        """Run one request to completion on this thread (the CLI, tests); one output per n."""
        rid = f"local-{next(_ids)}"
        self.add_request(EngineRequest(rid, list(prompt_token_ids), params))
        acc: dict[int, CompletionOutput] = {}
        while True:
            for out in self.step():
                if out.request_id != rid:
                    continue
                for c in out.outputs:
                    a = acc.setdefault(c.index, CompletionOutput(c.index, "", [], [] if params.logprobs is not None else None))
                    a.text += c.text
                    a.token_ids += c.token_ids
                    if c.logprobs:
                        a.logprobs += c.logprobs
                    a.finish_reason = c.finish_reason or a.finish_reason
                if out.finished:
                    return [acc[i] for i in sorted(acc)]


_ids = itertools.count()


def _token_logprob(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    top = []
    if k > 0:
        vals, idx = torch.topk(logprobs, k)
        top = [(int(i), float(v)) for i, v in zip(idx, vals)]
    return TokenLogprob(token_id, float(logprobs[token_id]), top)


# --------------------------------------------------------------------------------------
# Driving the engine from asyncio
# --------------------------------------------------------------------------------------

class EngineLoop:
    """Runs ``engine.step()`` on a background thread while there is work and hands each
    request's outputs to its asyncio caller. Leaving ``generate``'s iterator early (client
    gone, task cancelled) aborts the request, which frees its slots on the next step."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self.dead: EngineDeadError | None = None
        self._thread = threading.Thread(target=self._run, name="opt-ray-engine", daemon=True)
        self._thread.start()

    async def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise self.dead
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        self._streams[req.request_id] = (loop, q)
        try:
            self.engine.add_request(req)
        except BaseException:
            self._streams.pop(req.request_id, None)
            raise
        with self._wake:
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(req.request_id, None)
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        with self._wake:
            self._wake.notify()

    def idle(self) -> bool:
        return not self.engine.has_work()

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop the thread, first letting running requests finish for up to the timeout."""
        deadline = time.monotonic() + drain_timeout_s
        while not self.idle() and time.monotonic() < deadline and not self.dead:
            time.sleep(0.05)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.engine.has_work():
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                outputs = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - every failure here is fatal
                self.dead = e if isinstance(e, EngineDeadError) else EngineDeadError(repr(e))
                for loop, q in list(self._streams.values()):
                    loop.call_soon_threadsafe(q.put_nowait, self.dead)
                return
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    loop, q = target
                    loop.call_soon_threadsafe(q.put_nowait, out)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """The HF-format directory to serve, from what the user passed: an HF dir (has
    config.json), or a training run / checkpoint dir that holds an export (``hf/`` or
    ``export/``), as written by ``opt-ray export``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--checkpoint {p}: no such directory")
    if (p / "config.json").is_file():
        return p
    for sub in ("hf", "export", "export/hf"):
        if (p / sub / "config.json").is_file():
            return p / sub
    raise UserError(f"--checkpoint {p}: not an HF-format checkpoint (no config.json) and no "
                    f"export inside it (hf/ or export/); export the training run first: "
                    f"opt-ray export {p} --output {p / 'hf'}")


def load_model_and_tokenizer(path: str | Path):
    """(model, tokenizer, eos_token_id) from an HF-format dir with its tokenizer beside it."""
    from opt_ray.serve.loading import load_hf_model, load_tokenizer_dir
    p = resolve_checkpoint(path)
    model = load_hf_model(p)
    tok = load_tokenizer_dir(p)
    cfg = json.loads((p / "config.json").read_text())
    return model, tok, int(cfg.get("eos_token_id", model.config.eos_token_id))


def engine_from_checkpoint(path: str | Path, config: EngineConfig | None = None) -> Engine:
    model, tok, eos = load_model_and_tokenizer(path)
    return Engine(model, tok, config, eos_token_id=eos)
