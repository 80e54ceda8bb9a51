"""The model-side work of evaluation, torch only: continuation log-likelihoods and
greedy (or sampled) generation, batched by length.

Log-likelihoods. A request is token ids ``(context, continuation)``; the model reads
``(context + continuation)[:-1]`` (left-truncated to the model's context, as lm-eval's
``hf`` backend does) and the continuation's tokens are scored at the last
``len(continuation)`` positions. Requests are sorted by length (longest first) and
batched with right padding: in a causal model padding after a sequence cannot change
its positions or what it attends to, so no mask is needed and the fast causal attention
path runs. Only the scored positions go through the LM head, and their log-softmax is
taken in fp32 (``log_softmax(logits.float())``), so the (B, T, vocab) logits of the
whole batch are never built.

Generation. Prompts are sorted by length and left-padded with an attention mask (the
model derives positions from the mask, so padding shifts nothing), then decoded one
token per step on a KV cache. A row stops at eos, at a stop string, or after
``max_new_tokens``; the batch stops when every row has.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# A log-likelihood request: (context ids, continuation ids); its result: (sum of the
# continuation's log-probabilities, whether greedy decoding would produce it).
Pair = tuple[Sequence[int], Sequence[int]]
Result = tuple[float, bool]


class Scorer:
    """Batched scoring and generation over an ``opt_ray.model.opt.OPT``.

    ``batch_size``: sequences per forward pass. ``max_length``: the longest input
    (default: the model's ``max_position_embeddings``). ``pad_id``: the id written into
    padding slots (never attended to, never scored). ``tokenizer``: decodes generated
    text for stop strings (generation with stop strings needs it).
    """

    def __init__(self, model, *, batch_size: int = 16, max_length: int | None = None,
                 pad_id: int = 1, device: str | torch.device | None = None, tokenizer=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.model.to(self.device)
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        self.pad_id = pad_id
        self.tokenizer = tokenizer

    # ---------------------------------------------------------------- log-likelihood
    @torch.no_grad()
    def loglikelihood(self, pairs: Sequence[Pair],
                      progress: Callable[[int], None] | None = None) -> list[Result]:
        """``(logprob, is_greedy)`` per pair, in the order given."""
        inputs, conts = [], []
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise ValueError("a log-likelihood request needs a non-empty context and continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's "
                                 f"context of {self.max_length}")
            toks = (list(ctx) + list(cont))[-(self.max_length + 1):]
            inputs.append(toks[:-1])
            conts.append(list(cont))
        # Identical requests (a shared prompt scored twice) are computed once.
        keys = [(tuple(i), tuple(c)) for i, c in zip(inputs, conts)]
        unique = sorted(set(keys), key=lambda k: (-len(k[0]), k))
        out: dict[tuple, Result] = {}
        for s in range(0, len(unique), self.batch_size):
            chunk = unique[s:s + self.batch_size]
            for key, res in zip(chunk, self._score_batch(chunk)):
                out[key] = res
            if progress:
                progress(len(chunk))
        return [out[k] for k in keys]

    def _score_batch(self, chunk: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[Result]:
        T = max(len(inp) for inp, _ in chunk)
        x = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
        rows, cols, targets, sizes = [], [], [], []
        for b, (inp, cont) in enumerate(chunk):
            L, c = len(inp), len(cont)
            x[b, :L] = torch.tensor(inp)
            rows += [b] * c
            cols += range(L - c, L)   # the position that predicts each continuation token
            targets += cont
            sizes.append(c)
        h = self.model.hidden_states(x.to(self.device))           # (B, T, E)
        h = h[torch.tensor(rows), torch.tensor(cols)]             # (N, E) scored positions only
        logp = F.log_softmax(self.model.lm_head(h).float(), dim=-1)  # (N, V) fp32
        tgt = torch.tensor(targets, device=logp.device)
        picked = logp.gather(1, tgt.unsqueeze(1)).squeeze(1)
        greedy = logp.argmax(dim=-1) == tgt
        res = []
        for lp, g in zip(picked.split(sizes), greedy.split(sizes)):
            res.append((float(lp.double().sum()), bool(g.all())))
        return res

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_id: int | None = None, stop_strings: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 progress: Callable[[int], None] | None = None) -> list[list[int]]:
        """The generated ids of each prompt (eos excluded), in the order given.

        A row also stops once its decoded text (special tokens skipped) contains one of
        ``stop_strings``; the caller cuts the text there. ``temperature`` 0 is greedy; otherwise tokens
        are sampled (nucleus ``top_p``) from a generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        stop_strings = [s for s in stop_strings if s]
        stop = None
        if stop_strings:
            if self.tokenizer is None:
                raise ValueError("generation with stop strings needs the Scorer's tokenizer")

            def stop(ids: list[int]) -> bool:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                return any(s in text for s in stop_strings)
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        out: list[list[int] | None] = [None] * len(prompts)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            batch = self._generate_batch([list(prompts[i]) for i in idx], max_new_tokens,
                                         eos_id, stop, temperature, top_p, gen)
            for i, ids in zip(idx, batch):
                out[i] = ids
            if progress:
                progress(len(idx))
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], max_new: int, eos_id: int | None,
                        stop: Callable[[list[int]], bool] | None, temperature: float,
                        top_p: float, gen: torch.Generator) -> list[list[int]]:
        B = len(prompts)
        S = max(len(p) for p in prompts)
        if S + max_new > self.max_length:
            raise ValueError(f"prompt of {S} tokens + {max_new} new tokens exceeds the model's "
                             f"context of {self.max_length}")
        x = torch.full((B, S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, S), dtype=torch.long)
        for b, p in enumerate(prompts):   # left padding
            x[b, S - len(p):] = torch.tensor(p)
            mask[b, S - len(p):] = 1
        x, mask = x.to(self.device), mask.to(self.device)
        cache = self.model.new_cache()
        logits = self.model(x, attention_mask=mask, cache=cache)[:, -1]
        outs: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for _ in range(max_new):
            nxt = _pick(logits.float(), temperature, top_p, gen)
            for b in range(B):
                if done[b]:
                    continue
                t = int(nxt[b])
                if eos_id is not None and t == eos_id:
                    done[b] = True
                    continue
                outs[b].append(t)
                if stop is not None and stop(outs[b]):
                    done[b] = True
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            logits = self.model(nxt.view(B, 1).to(self.device), attention_mask=mask, cache=cache)[:, -1]
        return outs


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0.0:
        return logits.argmax(dim=-1).cpu()
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p          # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(1, si, sp * keep)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)
