"""``OptLM``: lm-evaluation-harness's ``LM`` interface over the project's model.

Everything that decides which tokens are scored follows lm-eval's ``hf`` backend
(``lm_eval.models.huggingface.HFLM``), so scores are comparable with published ones:

- Encoding. With ``add_bos_token=None`` (the default) a string is encoded as the
  tokenizer does by default; an OPT tokenizer prepends bos ``</s>``, as HF's does. A
  string that already starts with the bos text is encoded without special tokens.
  ``add_bos_token=False`` never adds special tokens; ``True`` always starts with bos.
- Context/continuation split (``TemplateLM._encode_pair``): trailing spaces of the
  context move to the continuation, the pair is encoded whole and split at the
  context's length. An empty context becomes the prefix token (bos).
- Rolling log-likelihood: lm-eval's own disjoint windows of ``max_length`` tokens,
  prefixed with bos, over ``tok_encode(text)``.
- Generation: stop sequences plus the eos text, ``max_gen_toks`` default 256, prompts
  left-truncated to leave room for the generated tokens, output cut at the first stop.

The model-side work is a ``Scorer`` (``opt_ray.eval.scoring``) or a pool of them on Ray
workers (``actors.eval``): anything with ``loglikelihood(pairs)`` and
``generate(prompts, ...)``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm


class OptLM(TemplateLM):
    """lm-eval ``LM`` for an opt-ray checkpoint. Build it with ``OptLM.from_checkpoint``.

    ``engine``: a ``Scorer`` or ``WorkerPool``. ``tokenizer``: a ``tokenizers.Tokenizer``
    (the checkpoint's). ``max_length``: the model's context. ``seed``: for sampled
    generation (greedy needs none)."""

    def __init__(self, engine: Any, tokenizer: Any, *, max_length: int, add_bos_token: bool | None = None,
                 max_gen_toks: int = 256, seed: int = 0, info: dict[str, Any] | None = None):
        super().__init__()
        from opt_ray.data.tokenizer import special_ids

        self.engine = engine
        self.tok = tokenizer
        ids = special_ids(tokenizer)
        self._eos, self._bos = ids["eos"], ids["bos"]
        self._bos_text = tokenizer.decode([self._bos], skip_special_tokens=False)
        self.add_bos_token = add_bos_token
        self._max_length = max_length
        self._max_gen_toks = max_gen_toks
        self.seed = seed
        self.info = info or {}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, batch_size: int = 16, workers: int = 1,
                        add_bos_token: bool | None = None, dtype: str = "float32", seed: int = 0,
                        device: str | None = None, max_gen_toks: int = 256,
                        actors: bool = False, tp: int = 1) -> "OptLM":
        """Load ``path`` (HF dir, run dir or checkpoint) and its tokenizer. ``workers`` > 1
        (or ``actors``, or ``tp`` > 1) runs the model on that many Ray actors, each with a
        GPU when ``device`` is cuda, in groups of ``tp`` that each hold one copy of the
        model split ``tp`` ways (Ray must be initialised by the caller)."""
        import torch

        from opt_ray.eval.loading import load_model, load_tokenizer, locate
        from opt_ray.eval.scoring import Scorer

        ckpt = locate(path)
        pooled = workers > 1 or actors or tp > 1
        if pooled:
            from actors.eval import WorkerPool

            tok = load_tokenizer(ckpt)
            engine = WorkerPool(ckpt, workers=workers, batch_size=batch_size, dtype=dtype, device=device,
                                tp=tp)
            cfg = engine.model_config
            nparams = engine.num_params
        else:
            model = load_model(ckpt, dtype=getattr(torch, dtype))
            cfg = model.config
            tok = load_tokenizer(ckpt, cfg.vocab_size)
            engine = Scorer(model, batch_size=batch_size, device=device, pad_id=cfg.pad_token_id,
                            tokenizer=tok)
            nparams = sum(p.numel() for p in model.parameters())
        if pooled and tok.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
            load_tokenizer(ckpt, cfg.vocab_size)  # raises the vocabulary error
        info = {**ckpt.describe(), "model_num_parameters": nparams, "model_dtype": dtype,
                "workers": workers, "tp": tp, "device": device or "cpu", "add_bos_token": add_bos_token}
        return cls(engine, tok, max_length=cfg.max_position_embeddings, add_bos_token=add_bos_token,
                   max_gen_toks=max_gen_toks, seed=seed, info=info)

    # ---------------------------------------------------------------- lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        from opt_ray.data.tokenizer import tokenizer_hash
        return "opt-ray-" + tokenizer_hash(self.tok)[:16]

    def get_model_info(self) -> dict[str, Any]:
        return dict(self.info)

    # ---------------------------------------------------------------- tokenization
    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            # HFLM: add_bos_token decides when given; text already starting with bos
            # gets no second one.
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
            if self._bos_text and string.startswith(self._bos_text):
                add_special_tokens = False
        ids = self._encode(string, add_special_tokens)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def _encode(self, string: str, special: bool) -> list[int]:
        if self.add_bos_token is False:
            special = False   # HF rebuilds the post-processor without bos
        ids = self.tok.encode(string, add_special_tokens=special).ids
        if special and self.add_bos_token and (not ids or ids[0] != self._bos):
            ids = [self._bos] + ids   # HF with add_bos_token=True: bos + text
        return ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tok.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="loglikelihood requests") as bar:
            res = self.engine.loglikelihood(pairs, progress=bar.update)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[None, list[int], list[int]]] = []
        counts = []
        for (string,) in (req.args for req in requests):
            ws = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(None, ctx, cont) for ctx, cont in ws]
            counts.append(len(ws))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out, at = [], 0
        for req, n in zip(requests, counts):
            total = sum(s for s, _ in scores[at:at + n])
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in the "
                                 f"model's context of {self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx) for i in idx]
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0

            outs = self.engine.generate(
                prompts, max_new_tokens=max_new, eos_id=self.eot_token_id, stop_strings=until,
                temperature=float(kwargs.get("temperature") or 0.0) if sample else 0.0,
                top_p=float(kwargs.get("top_p") or 1.0), seed=self.seed, progress=bar.update)
            for i, ids in zip(idx, outs):
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.close()
        return results  # type: ignore[return-value]
