"""Data-parallel evaluation: one ``Scorer`` per Ray actor, requests split across them.

The driver keeps tokenization, task logic and metrics (lm-eval); only token ids cross
to the workers and (log-likelihood, greedy) pairs or generated ids come back. Requests
are dealt out in length order, round robin, so every worker gets a similar mix of long
and short ones, and the results are put back in request order. Each actor loads the
checkpoint itself (the weights never travel through the object store).

Ray must be initialised by the caller (``opt_ray.ray_util.init_ray``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from opt_ray.eval.loading import EvalCheckpoint


class _Worker:
    """The actor body: a Scorer over the checkpoint's model."""

    def __init__(self, ckpt: EvalCheckpoint, batch_size: int, dtype: str, device: str | None,
                 threads: int | None):
        from opt_ray.errors import UserError

        # Bad input is kept for ``info`` to raise: an error in an actor's constructor
        # reaches the driver only as the actor's death, as text.
        self.error: UserError | None = None
        try:
            self._load(ckpt, batch_size, dtype, device, threads)
        except UserError as e:
            self.error = e

    def _load(self, ckpt: EvalCheckpoint, batch_size: int, dtype: str, device: str | None,
              threads: int | None) -> None:
        import torch

        from opt_ray.eval.loading import load_model, load_tokenizer
        from opt_ray.eval.scoring import Scorer

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda":
            from opt_ray.devices import local_device
            local_device(device)    # one line if there is no CUDA here
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                       "float16": torch.float16}[dtype]
        model = load_model(ckpt, dtype=torch_dtype, node_cache=True)
        self.scorer = Scorer(model, batch_size=batch_size, device=device,
                             pad_id=model.config.pad_token_id, tokenizer=load_tokenizer(ckpt))

    def info(self) -> tuple[Any, int]:
        if self.error is not None:
            raise self.error
        m = self.scorer.model
        return m.config, sum(p.numel() for p in m.parameters())

    def loglikelihood(self, pairs):
        return self.scorer.loglikelihood(pairs)

    def generate(self, prompts, kwargs):
        return self.scorer.generate(prompts, **kwargs)


class WorkerPool:
    """``workers`` Ray actors with the same interface as ``Scorer``."""

    def __init__(self, ckpt: EvalCheckpoint, *, workers: int, batch_size: int = 16,
                 dtype: str = "float32", device: str | None = None, cpus_per_worker: float = 1,
                 threads: int | None = 1):
        import ray

        from opt_ray.errors import UserError

        # One GPU per worker when scoring on CUDA: Ray picks the node and sets the
        # actor's CUDA_VISIBLE_DEVICES, so "cuda" is that GPU.
        actor = ray.remote(num_cpus=cpus_per_worker,
                           num_gpus=1 if device == "cuda" else 0)(_Worker)
        self.actors = [actor.remote(ckpt, batch_size, dtype, device, threads) for _ in range(workers)]
        # Every actor has loaded the model once this returns (a bad checkpoint fails here).
        try:
            infos = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayTaskError as e:
            for a in self.actors:
                ray.kill(a)
            if isinstance(e.cause, UserError):
                raise e.cause from None       # bad input: one line, exit 2
            raise
        self.model_config, self.num_params = infos[0]

    def _split(self, n: int, key: Callable[[int], Any]) -> list[list[int]]:
        order = sorted(range(n), key=key)
        return [order[w::len(self.actors)] for w in range(len(self.actors))]

    def _gather(self, n: int, parts: list[list[int]], refs: list, progress) -> list:
        import ray

        out: list = [None] * n
        pending = dict(zip(refs, parts))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            idx = pending.pop(done[0])
            for i, r in zip(idx, ray.get(done[0])):
                out[i] = r
            if progress:
                progress(len(idx))
        return out

    def loglikelihood(self, pairs: Sequence, progress: Callable[[int], None] | None = None) -> list:
        parts = self._split(len(pairs), lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        refs = [a.loglikelihood.remote([pairs[i] for i in part]) for a, part in zip(self.actors, parts)]
        return self._gather(len(pairs), parts, refs, progress)

    def generate(self, prompts: Sequence, progress: Callable[[int], None] | None = None, **kwargs) -> list:
        parts = self._split(len(prompts), lambda i: -len(prompts[i]))
        refs = [a.generate.remote([prompts[i] for i in part], kwargs) for a, part in zip(self.actors, parts)]
        return self._gather(len(prompts), parts, refs, progress)
