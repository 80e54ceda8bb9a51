"""Sampling parameters and the batched logits -> token step of the serving engine.

``SamplingParams`` is the engine's typed view of a request's decoding options (the API
layer validates user input before it gets here; ``validate`` is the engine's own guard).
``sample_batch`` turns one row of logits per sampling sequence into the next token per
row, vectorised over the batch: greedy rows take one argmax together; the others go
through repetition penalty (only rows that ask for it), temperature, top-k and top-p in
one sort, then each draws one uniform number from its own ``torch.Generator`` and picks
by inverse CDF, so a seeded request gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opt_ray.errors import UserError


@dataclass
class SamplingParams:
    """Decoding options of one request (OpenAI completions semantics)."""
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # nucleus mass in (0, 1]
    top_k: int = 0                    # 0 = off
    repetition_penalty: float = 1.0   # HF/CTRL style: > 1 discourages tokens already seen
    seed: int | None = None           # per-request generator; None = fresh entropy
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0               # EOS, stop ids and stop strings ignored before this
    n: int = 1                        # completions per prompt
    logprobs: int | None = None       # None = off; k >= 0 = chosen token + top-k alternatives
    echo: bool = False                # return the prompt before the completion
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ``UserError`` naming the field when a value is out of range."""
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.temperature >= 0.0, "temperature", "must be >= 0 (0 = greedy)"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 = off)"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]"),
            (self.n >= 1, "n", "must be >= 1"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise UserError(f"{name} {why}, got {getattr(self, name)!r}")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one sequence: seeded for reproducibility, else from entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule on one row: a seen token's positive logit is divided by the penalty and
    a negative one multiplied, so the penalty always makes it less likely."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits.gather(0, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(0, seen, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside the top-k and outside the smallest set whose
    probability reaches top_p; the most likely token always survives. One row (V,)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass *before* it already reaches top_p.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
               generator: torch.Generator | None) -> int:
    """Next token for one sequence from its fp32 logits row (V,)."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], seen: list[torch.Tensor | None],
                 generators: list[torch.Generator | None]) -> list[int]:
    """Next token for every row of fp32 ``logits`` (B, V). ``seen[i]`` are the ids the
    repetition penalty applies to (None when the row's penalty is 1). Modifies nothing
    the caller keeps: penalised rows are rewritten in a copy."""
    B = logits.shape[0]
    pen = [i for i in range(B) if params[i].repetition_penalty != 1.0 and seen[i] is not None]
    if pen:
        logits = logits.clone()
        for i in pen:
            logits[i] = apply_repetition_penalty(logits[i], seen[i], params[i].repetition_penalty)
    out = torch.argmax(logits, dim=-1).tolist()          # greedy rows (and a default)
    rows = [i for i in range(B) if not params[i].greedy]
    if not rows:
        return out
    idx = torch.tensor(rows)
    temps = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32)
    x = logits[idx] / temps.unsqueeze(1)                                   # (R, V)
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    V = x.shape[1]
    rank = torch.arange(V).unsqueeze(0)
    top_k = torch.tensor([params[i].top_k if 0 < params[i].top_k < V else V for i in rows])
    drop = rank >= top_k.unsqueeze(1)
    # Ties with the k-th value survive, as in filter_top_k_top_p.
    kth = sorted_x.gather(1, (top_k - 1).unsqueeze(1))
    drop &= sorted_x < kth
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    probs = sorted_x.softmax(-1)
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float32).unsqueeze(1)
    # Drop a token when the mass *before* it already reaches top_p (the best one stays).
    drop_p = (probs.cumsum(-1) - probs) >= top_p
    probs = probs.masked_fill(drop_p & (top_p < 1.0), 0.0)
    cdf = probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp(max=V - 1)
    # A zero-probability token can only be hit at the clamp: step back to the last kept one.
    kept = probs.gather(1, pick) > 0
    if not bool(kept.all()):
        last = (probs > 0).long().cumsum(-1).argmax(-1, keepdim=True)
        pick = torch.where(kept, pick, last)
    chosen = order.gather(1, pick).squeeze(1).tolist()
    for j, i in enumerate(rows):
        out[i] = chosen[j]
    return out
