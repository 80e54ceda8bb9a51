"""The serving engine: continuous batching with packed steps. No Ray in here.

One ``Engine.step()`` is a short numbered sequence, as in vLLM:
  1. intake:   apply aborts and move newly added requests to the waiting queue;
  2. schedule: one row per decoding sequence (1 token), then prefill chunks under the
               ``max_prefill_tokens`` budget: first the rest of prompts already being
               prefilled, then waiting requests FCFS while slots last (a long prompt is
               split over several steps, so it never stalls the decoders);
  3. forward:  ONE packed forward over all rows' tokens, unpadded (``runner.ModelRunner``):
               every GEMM runs over exactly the real tokens, attention per row over its
               own slot; the LM head only for rows that sample (decode rows, the last
               token of a prompt) and, for echo + logprobs requests, their prompt positions;
  4. sample:   one batched sampling call over those rows (``sampling.sample_batch``);
  5. emit:     stop checks, incremental detokenisation, deltas; finished sequences free
               their slots at once (requests leave at every step).

KV cache: per layer one preallocated buffer (num_slots, heads, max_len, head_dim); the
slot count comes from a byte budget. Slots (not paged blocks): on CPU, decode attention is
bound by reading keys, and a slot is read as a strided view of just its real length with
no gather (blocks would need one per step, or a custom kernel).

Prefix caching on slots: a freed slot keeps its keys/values and the record of the token
ids they belong to (``slot_ids``). A new prompt takes the free slot that shares its
longest prefix and computes only the rest: a repeated prompt, a shared system prompt or
few-shot context, or lm-eval's choices after one context. Nothing is copied; a slot's old
content is simply overwritten when a prompt that does not match it takes the slot.

Two error tiers: ``RequestError`` (a ``UserError``: this request is bad or cannot be
admitted; the engine carries on) and ``EngineDeadError`` (a step failed: every request
fails and the replica must be restarted).

``EngineLoop`` drives an engine from a background thread for asyncio callers (the Ray
Serve replica, the CLI); torch releases the GIL in its kernels so the event loop stays
responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator, Iterator, Protocol

import torch

from opt_ray.devices import auto_dtype, local_device
from opt_ray.errors import UserError
from opt_ray.model.opt import OPT
from opt_ray.serve.engine_config import EngineConfig  # noqa: F401 - re-exported
from opt_ray.serve.runner import ModelRunner, Row, SlotKVCache, cache_dtype, local_heads
from opt_ray.serve.sampling import SamplingParams, make_generator, sample_batch


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


def default_threads() -> int:
    """Threads for one replica: OMP_NUM_THREADS when set (Ray sets it to the CPUs an actor
    reserves), else the CPUs this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class EngineRequest:
    """What crosses into the engine: already tokenized and validated."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class TokenLogprob:
    """A token's raw model log-probability (log-softmax of the logits, before temperature,
    top-k/top-p or penalties, as vLLM's default) and the top-N alternatives, best first,
    with the token itself appended when it is not among them (as OpenAI/vLLM return)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


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
    forwards: int = 0                 # model forwards run (one per step with work)
    prefill_tokens: int = 0           # prompt tokens computed so far
    prefix_cached_tokens: int = 0     # prompt tokens whose KV was reused instead (prefix cache)
    last_step_rows: int = 0           # rows in the last forward (prefill chunks + decodes)
    last_step_prefill_tokens: int = 0
    last_step_decode_rows: int = 0


def resolved(config: EngineConfig) -> EngineConfig:
    """``config`` as a replica runs it: its ``auto`` device and dtype resolved in this
    process (``opt_ray.devices``; under Ray a replica sees only the GPU Ray reserved for
    it, ``actors.serve.replica_placement``)."""
    device = local_device(config.device)
    return replace(config, device=device, dtype=auto_dtype(config.dtype, device))


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the GEMMs run in. Half types on a CPU whose kernels have no native
    bf16/fp16 (AVX2 only, like the development machine: bf16 GEMMs there ran 4-7x slower
    than fp32) compute in fp32 over the half-rounded weights; elsewhere the dtype itself."""
    if device.type == "cpu" and dtype != torch.float32 and \
            torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2", "NO AVX"):
        return torch.float32
    return dtype


# --------------------------------------------------------------------------------------
# Incremental detokenization
# --------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_TABLES: dict[int, tuple[object, list[bytes] | None]] = {}
_TABLES_LOCK = threading.Lock()


def byte_table(tokenizer) -> list[bytes] | None:
    """Per token id, the bytes it decodes to (b"" for special tokens), for a byte-level
    BPE tokenizer (GPT-2's, OPT's); None for any other kind. Built once per tokenizer and
    checked against ``tokenizer.decode`` of the whole vocabulary, so a tokenizer whose
    decoding differs (a normaliser, a different decoder) falls back to decoding windows."""
    key = id(tokenizer)
    with _TABLES_LOCK:
        hit = _TABLES.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    table = _build_byte_table(tokenizer)
    with _TABLES_LOCK:
        _TABLES[key] = (tokenizer, table)   # holds the tokenizer: its id stays unique
    return table


def _build_byte_table(tokenizer) -> list[bytes] | None:
    try:
        spec = json.loads(tokenizer.to_str())
    except Exception:   # noqa: BLE001 - not a `tokenizers` tokenizer: use the window method
        return None
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    inv = _bytes_to_unicode()
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    table: list[bytes] = [b""] * size
    for tok, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i >= size:
            return None
        if i in specials:
            continue
        if i in added:
            table[i] = added[i].encode()
        elif all(ch in inv for ch in tok):
            table[i] = bytes(inv[ch] for ch in tok)
        else:
            return None
    ids = [i for i in range(size) if i not in specials and i not in added]
    if b"".join(table[i] for i in ids).decode("utf-8", "replace") != tokenizer.decode(ids, skip_special_tokens=True):
        return None
    return table


class IncrementalDetokenizer:
    """Streams text as tokens arrive without ever emitting a broken UTF-8 character.

    Byte-level BPE splits multi-byte characters across tokens. With a byte table (OPT's
    tokenizer) each token's bytes go through one incremental UTF-8 decoder, which holds an
    incomplete character back until its last byte arrives: O(1) per token, no re-decode.
    Otherwise we decode a short window (prefix_offset..end) and emit only what it adds
    beyond the already-emitted part, holding back while it ends in U+FFFD (TGI's / vLLM's
    method). Either way the concatenated deltas equal decode(all ids)."""

    def __init__(self, tokenizer, table: list[bytes] | None | bool = True):
        self.tok = tokenizer
        self.table = byte_table(tokenizer) if table is True else (table or None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.table is not None:
            return self._utf8.decode(self.table[token_id] if token_id < len(self.table) else b"")
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back, replacement characters included."""
        if self.table is not None:
            return self._utf8.decode(b"", final=True)
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
    computed: int = 0                 # prompt tokens already in seqs[0]'s slot
    prompt_logprobs: list[TokenLogprob | None] | None = None
    sent_first: bool = False

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.req.prompt_token_ids)


class Engine:
    """Continuous-batching generation over one OPT model. ``add_request`` and
    ``abort_request`` may be called from any thread; ``step`` from one thread only."""

    def __init__(self, model: OPT, tokenizer, config: EngineConfig | None = None,
                 *, eos_token_id: int | None = None, peers: Peers | None = None):
        """``peers``: with the model split over several processes (tensor parallelism),
        this engine is the group's first rank and schedules for all of them: every model
        call it makes is sent to ``peers`` first, whose engines ``follow`` it."""
        # As run: "auto" resolved (the stats and /v1/models say what a replica does).
        self.config = resolved(config or EngineConfig())
        cfg = model.config
        self.dtype = _DTYPES[self.config.dtype]
        self.device = torch.device(self.config.device)
        if self.device.type == "cpu":
            self.threads = self.config.threads or default_threads()
            torch.set_num_threads(self.threads)
        else:
            self.threads = self.config.threads or 1
        self.compute_dtype = compute_dtype(self.dtype, self.device)
        # Weights are rounded to the requested dtype; on a CPU without native bf16/fp16
        # matmuls they are then held in fp32 for compute (exactly the rounded values).
        self.model = model.to(device=self.device, dtype=self.dtype).to(self.compute_dtype).eval()
        self.tokenizer = tokenizer
        self._byte_table = byte_table(tokenizer)
        self.eos_token_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
        self.max_model_len = min(self.config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        kv_dtype = cache_dtype(self.compute_dtype, self.device)
        heads = local_heads(model)       # this process's share of the KV
        per_slot = SlotKVCache.bytes_per_slot(cfg.num_hidden_layers, heads * cfg.head_dim,
                                              self.max_model_len, kv_dtype)
        num_slots = self.config.max_num_seqs
        if self.config.kv_cache_bytes is not None:
            num_slots = min(num_slots, self.config.kv_cache_bytes // per_slot)
            if num_slots < 1:
                raise UserError(
                    f"engine.kv_cache_bytes={self.config.kv_cache_bytes} holds no sequence of "
                    f"max_model_len={self.max_model_len} ({per_slot} bytes each); raise the "
                    f"budget or lower max_model_len")
        self.peers = peers
        self.kv = SlotKVCache(cfg.num_hidden_layers, num_slots, heads,
                              cfg.head_dim, self.max_model_len, kv_dtype, self.device)
        self.runner = ModelRunner(self.model, self.kv, prepack=self.config.prepack_weights,
                                  half=self.dtype if self.dtype != self.compute_dtype else None)
        self.free_slots: list[int] = list(range(num_slots))   # kept sorted: lowest first
        # The token ids whose keys/values each slot holds, column by column (kept when the
        # slot is freed: a later prompt that begins with them reuses them).
        self.slot_ids: list[list[int]] = [[] for _ in range(num_slots)]
        self.prefix_cached_tokens = 0
        self.waiting: deque[EngineRequest] = deque()
        self.running: dict[str, _Running] = {}
        self._inbox_lock = threading.Lock()
        self._new: deque[EngineRequest] = deque()
        self._aborts: set[str] = set()
        self._known: set[str] = set()
        self.steps = 0
        self.output_tokens = 0
        self.prefill_tokens = 0
        self.aborted = 0
        self._last = (0, 0, 0)           # rows, prefill tokens, decode rows of the last forward

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
        rows, pre, dec = self._last
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
            forwards=self.runner.forwards,
            prefill_tokens=self.prefill_tokens,
            prefix_cached_tokens=self.prefix_cached_tokens,
            last_step_rows=rows,
            last_step_prefill_tokens=pre,
            last_step_decode_rows=dec,
        )

    # ---- the step ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One iteration; returns a delta for every request that produced something."""
        try:
            if self.peers is not None:
                self.peers.check()                           # a rank that failed ends us
            outputs = self._intake()                         # 1. aborts, new requests
            self._schedule()                                 # 2. admit newcomers
            self._run()                                      # 3.+4. packed forward, sample
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
                    if not s.reported:
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

    def _schedule(self) -> None:
        """Admit waiting requests FCFS while there are slots for all their n sequences and
        prefill budget left this step (what is left of the budget after the prompts
        already being prefilled). No overtaking, so no starvation."""
        budget = self.config.max_prefill_tokens - sum(
            len(r.req.prompt_token_ids) - r.computed for r in self.running.values() if r.prefilling)
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if len(self.free_slots) < req.params.n:
                break
            self.waiting.popleft()
            run_prompt_lp = req.params.echo and req.params.logprobs is not None
            first, reused = self._take_slot(req.prompt_token_ids, reuse=not run_prompt_lp)
            slots = [first] + [self.free_slots.pop(0) for _ in range(req.params.n - 1)]
            seed = req.params.seed
            seqs = [_Seq(i, slot,
                         None if req.params.greedy else make_generator(None if seed is None else seed + i),
                         IncrementalDetokenizer(self.tokenizer, self._byte_table))
                    for i, slot in enumerate(slots)]
            run = _Running(req, seqs, torch.tensor(req.prompt_token_ids), computed=reused)
            if run_prompt_lp:
                run.prompt_logprobs = [None]
            self.running[req.request_id] = run
            self.prefix_cached_tokens += reused
            budget -= len(req.prompt_token_ids) - reused

    def _take_slot(self, prompt: list[int], reuse: bool) -> tuple[int, int]:
        """A free slot for a new prompt and how many of its first tokens that slot's KV
        already holds: with prefix caching, the free slot sharing the longest prefix with
        the prompt (capped one short of it: the last prompt token is computed, its logits
        are the first sample); else, or without a match, the lowest free slot."""
        best, hit = self.free_slots[0], 0
        if reuse and self.config.prefix_caching:
            cap = len(prompt) - 1
            for slot in self.free_slots:
                n = _common_prefix(self.slot_ids[slot], prompt, cap)
                if n > hit:
                    best, hit = slot, n
        self.free_slots.remove(best)
        return best, hit

    def _free(self, slot: int) -> None:
        self.free_slots.append(slot)
        self.free_slots.sort()

    def _run(self) -> None:
        """Build the step's rows, run one packed forward, sample every row that samples."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[Row] = []
        select: list[int] = []                # packed positions whose logits we need
        samplers: list[tuple[_Running, list[_Seq], int]] = []   # (run, seqs, select index)
        prompt_lp: list[tuple[_Running, int, int, int]] = []    # (run, first pos, count, select index)

        def add_row(slot: int, ids: list[int], past: int) -> int:
            start = len(tokens)
            tokens.extend(ids)
            positions.extend(range(past, past + len(ids)))
            slots.extend([slot] * len(ids))
            rows.append(Row(start, len(ids), slot, past))
            held = self.slot_ids[slot]
            del held[past:]
            held.extend(ids)
            return start

        # Decode rows first, then prefill chunks: every running sequence advances each step.
        n_decode = 0
        for run in self.running.values():
            if run.prefilling:
                continue
            P = len(run.req.prompt_token_ids)
            for s in run.seqs:
                if s.finish_reason is None:
                    start = add_row(s.slot, [s.token_ids[-1]], P + len(s.token_ids) - 1)
                    samplers.append((run, [s], len(select)))
                    select.append(start)
                    n_decode += 1
        budget = self.config.max_prefill_tokens
        n_prefill = 0
        for run in self.running.values():
            if not run.prefilling or budget <= 0:
                continue
            prompt = run.req.prompt_token_ids
            P, c = len(prompt), run.computed
            T = min(P - c, budget)
            start = add_row(run.seqs[0].slot, prompt[c:c + T], c)
            budget -= T
            n_prefill += T
            if run.prompt_logprobs is not None:
                # Position i predicts prompt token i+1; the last prompt position predicts
                # the first generated token and is the sampling row below.
                cnt = min(c + T, P - 1) - c
                if cnt > 0:
                    prompt_lp.append((run, c, cnt, len(select)))
                    select.extend(range(start, start + cnt))
            run.computed = c + T
            if not run.prefilling:
                samplers.append((run, [s for s in run.seqs], len(select)))
                select.append(start + T - 1)
        if not rows:
            return
        self.prefill_tokens += n_prefill
        self._last = (len(rows), n_prefill, n_decode)
        if self.peers is not None:
            self.peers.send("forward", (tokens, positions, slots, rows, select))
        h = self.runner.forward(tokens, positions, slots, rows, select)
        if not select:                   # only prompt chunks that do not end their prompt
            return
        # Sampling runs on the CPU with per-request CPU generators: reproducible anywhere.
        logits = self.runner.lm_head(h).cpu()                                   # (len(select), V)
        for run, first, cnt, at in prompt_lp:
            lp = torch.log_softmax(logits[at:at + cnt], dim=-1)
            ids = run.req.prompt_token_ids
            k = run.req.params.logprobs
            run.prompt_logprobs += _token_logprobs(lp, ids[first + 1:first + 1 + cnt], k)
        for run, seqs, _ in samplers:
            if len(seqs) > 1 and not seqs[0].token_ids:     # n > 1: share the prefilled prompt
                for s in seqs[1:]:
                    P = len(run.req.prompt_token_ids)
                    if self.peers is not None:
                        self.peers.send("copy_slot", (seqs[0].slot, s.slot, P))
                    self.kv.copy_slot(seqs[0].slot, s.slot, P)
                    self.slot_ids[s.slot] = self.slot_ids[seqs[0].slot][:P]
        self._sample(logits, samplers)

    def _sample(self, logits: torch.Tensor, samplers: list[tuple[_Running, list[_Seq], int]]) -> None:
        flat = [(run, s, at) for run, seqs, at in samplers for s in seqs]
        if not flat:
            return
        rows = torch.tensor([at for _, _, at in flat])
        x = logits[rows]                                                     # (B, V) raw
        params = [run.req.params for run, _, _ in flat]
        # min_tokens: EOS and stop ids cannot be drawn before it (a copy of those rows).
        ban = [i for i, (run, s, _) in enumerate(flat) if len(s.token_ids) < params[i].min_tokens]
        masked = x
        if ban:
            masked = x.clone()
            for i in ban:
                p = params[i]
                masked[i, list(p.stop_token_ids) + ([] if p.ignore_eos else [self.eos_token_id])] = float("-inf")
        seen = [None if p.repetition_penalty == 1.0 else
                torch.cat([run.seen, torch.tensor(s.token_ids, dtype=torch.long)])
                for p, (run, s, _) in zip(params, flat)]
        chosen = sample_batch(masked, params, seen, [s.generator for _, s, _ in flat])
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        lps: dict[int, TokenLogprob] = {}
        if want:
            # Raw model log-probabilities: before min_tokens masking, penalties, temperature.
            lp = torch.log_softmax(x[torch.tensor(want)], dim=-1)
            for j, i in enumerate(want):
                lps[i] = _token_logprobs(lp[j:j + 1], [chosen[i]], params[i].logprobs)[0]
        for i, (run, s, _) in enumerate(flat):
            self._accept(run, s, chosen[i], lps.get(i))

    def _accept(self, run: _Running, s: _Seq, tok: int, logprob: TokenLogprob | None) -> None:
        """Append the sampled token to ``s`` and apply the stop rules."""
        p = run.req.params
        may_stop = len(s.token_ids) >= p.min_tokens
        if may_stop and ((tok == self.eos_token_id and not p.ignore_eos) or tok in p.stop_token_ids):
            s.finish_reason = "stop"       # the stop token itself is not part of the output
            s.text += s.detok.flush()
            return
        s.token_ids.append(tok)
        self.output_tokens += 1
        if logprob is not None:
            s.logprobs.append(logprob)
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

    @torch.inference_mode()
    def follow(self, op: str, args: tuple) -> None:
        """On a rank > 0 of a tensor-parallel engine: the model call the first rank makes
        (``peers.send``), on this rank's shard and KV; its collectives meet the first
        rank's. ``forward`` runs the LM head too when the first rank does (rows selected),
        so that its vocabulary gather meets."""
        if op == "forward":
            h = self.runner.forward(*args)
            if args[4]:
                self.runner.lm_head(h)
        elif op == "copy_slot":
            self.kv.copy_slot(*args)
        else:
            raise ValueError(f"unknown engine op {op!r}")

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


class Peers(Protocol):
    """The other ranks of a tensor-parallel engine, as its first rank sees them."""

    def send(self, op: str, args: tuple) -> None:
        """Have every other rank's engine ``follow(op, args)``, in the order sent."""

    def check(self) -> None:
        """Raise if a rank has failed."""


def _common_prefix(a: list[int], b: list[int], cap: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``cap``."""
    n = min(len(a), len(b), cap)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _token_logprobs(logprobs: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob]:
    """One ``TokenLogprob`` per row of log-probabilities (rows, V): the given token's value
    and the top-k, with the token appended when it is not among them (OpenAI/vLLM)."""
    chosen = logprobs.gather(1, torch.tensor(token_ids).unsqueeze(1)).squeeze(1).tolist()
    if k > 0:
        vals, idx = torch.topk(logprobs, k, dim=-1)
        vals, idx = vals.tolist(), idx.tolist()
    out = []
    for j, t in enumerate(token_ids):
        top = list(zip(idx[j], vals[j])) if k > 0 else []
        if all(i != t for i, _ in top):
            top.append((t, chosen[j]))
        out.append(TokenLogprob(t, chosen[j], top))
    return out


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

#: The files of an HF checkpoint that are not weights: what a front end needs of it.
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "vocab.json",
               "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "manifest.json",
               "model.safetensors.index.json", "pytorch_model.bin.index.json")
_EXPORT_SUBDIRS = ("hf", "export", "export/hf")


def resolve_checkpoint(path: str | Path) -> Path | str:
    """What to serve, from what the user passed (``CHECKPOINT_HELP``): an HF dir (has
    config.json), or a training run / checkpoint dir that holds an export (``hf/`` or
    ``export/``), as written by ``opt-ray export``; or, with no export inside, a training
    run or one of its checkpoints: the checkpoint to serve (the run's newest committed
    one, or the one named), from which each process that loads it builds the HF dir on
    its own node (``opt_ray.serve.from_run``). Any of them may be a bucket prefix
    (``s3://bucket/exports/opt-125m``): its URL is returned, and each process that loads
    it fetches or builds it on its own node (``local_checkpoint``). Raises ``UserError``
    naming the input and the fix, before anything is loaded."""
    return _resolve(path)[0]


def _resolve(path: str | Path):
    """(``resolve_checkpoint``'s answer, the ``from_run.RunCheckpoint`` when it is a
    training checkpoint, else None)."""
    from opt_ray.run_dir import is_url
    from opt_ray.serve import from_run
    if is_url(path):
        return _resolve_url(str(path).rstrip("/"))
    p = Path(path).expanduser().absolute()
    if (p / "config.json").is_file():
        return p, None
    for sub in _EXPORT_SUBDIRS:
        if (p / sub / "config.json").is_file():
            return p / sub, None
    run = from_run.find(p)
    if run is not None:
        return run.ckpt, run
    if not p.exists():
        raise UserError(f"--checkpoint {p}: no such directory")
    raise UserError(f"--checkpoint {p}: neither an HF-format checkpoint (no config.json, nor in "
                    f"hf/ or export/) nor a training run (no checkpoints/); pass a directory "
                    f"`opt-ray export` or `opt-ray train --output` wrote")


def _resolve_url(url: str):
    from opt_ray.run_dir import store_errors
    from opt_ray.serve import from_run
    from opt_ray.storage import Loc
    with store_errors(f"--checkpoint {url}", "a read", "the bucket exists"):
        for sub in ("", *_EXPORT_SUBDIRS):
            where = f"{url}/{sub}" if sub else url
            if Loc(where).child("config.json").isfile():
                return where, None
    run = from_run.find(url)
    if run is not None:
        return str(run.ckpt), run
    raise UserError(f"--checkpoint {url}: no HF-format checkpoint there (no config.json, nor in "
                    f"hf/ or export/) and no training run (no checkpoints/); pass a prefix "
                    f"`opt-ray export --output` or `opt-ray train --output` wrote")


def checkpoint_name(ref: str | Path) -> str:
    """The default model id of a resolved checkpoint: its directory's (or prefix's) name;
    a training run's for one of its checkpoints (``RUN/checkpoints/step_N`` -> RUN)."""
    parts = str(ref).rstrip("/").rsplit("/", 3)
    if len(parts) == 4 and parts[2] == "checkpoints" and parts[3].startswith("step_"):
        return parts[1]
    return parts[-1]


@contextlib.contextmanager
def local_checkpoint(path: str | Path, *, weights: bool = True,
                     dtype: torch.dtype | None = None) -> Iterator[Path]:
    """A local HF directory of the checkpoint ``path`` (``resolve_checkpoint``), for the
    ``with`` block: itself, or this node's copy of a bucket export, or the HF directory
    this node built from a training checkpoint (its weights in ``dtype``, default
    float32); with the weights or (``weights=False``, for a front end) only its small
    files (``SMALL_FILES``; a run's: config.json and tokenizer.json). A copy is held in
    use until the block ends: the fetch cache removes no version a process is loading."""
    from opt_ray.run_dir import is_url
    from opt_ray.serve import from_run
    ref, run = _resolve(path)
    if run is not None:
        with from_run.built(run, weights=weights, dtype=dtype, progress=weights) as d:
            yield d
    elif is_url(ref):
        from opt_ray.data.artifact_io import fetched
        with fetched(str(ref), "--checkpoint", names=None if weights else SMALL_FILES,
                     progress=weights) as d:
            yield d
    else:
        yield Path(ref)


def load_model_and_tokenizer(path: str | Path, dtype: torch.dtype | None = None, *,
                             sharded: bool = False):
    """(model, tokenizer, eos_token_id) from an HF-format dir with its tokenizer beside it
    (a bucket one fetched, a training run's built, on this node first:
    ``local_checkpoint``); the weights in ``dtype`` (default fp32). ``sharded``: this
    tensor-parallel rank's part of the model only (``model.hf.from_hf_sharded``)."""
    from opt_ray.serve.loading import load_hf_model, load_tokenizer_dir
    with local_checkpoint(path, dtype=dtype) as p:
        model = load_hf_model(p, dtype, sharded=sharded)
        tok = load_tokenizer_dir(p)
        cfg = json.loads((p / "config.json").read_text())
    return model, tok, int(cfg.get("eos_token_id", model.config.eos_token_id))


def engine_from_checkpoint(path: str | Path, config: EngineConfig | None = None, *,
                           peers: Peers | None = None) -> Engine:
    """The engine over the checkpoint ``path``: with ``config.tensor_parallel_size`` > 1,
    over this rank's part of the model (its process group set up); ``peers``: the other
    ranks, when this is the first."""
    # Read in the engine's dtype: the engine rounds to it anyway, and a half-precision
    # replica then never holds the model in fp32.
    config = resolved(config or EngineConfig())
    model, tok, eos = load_model_and_tokenizer(path, _DTYPES[config.dtype],
                                               sharded=config.tensor_parallel_size > 1)
    return Engine(model, tok, config, eos_token_id=eos, peers=peers)
