"""Evaluation on Ray actors: one ``Scorer`` per actor, requests split across them; with
tensor parallelism (``--tp``), one ``Scorer`` per group of actors on one node, each
holding 1/tp of the model (a model larger than one GPU: 66b, 175b).

The driver keeps tokenization, task logic and metrics (lm-eval); only token ids cross
to the workers and (log-likelihood, greedy) pairs or generated ids come back. Requests
are dealt out in length order, round robin, so every worker gets a similar mix of long
and short ones, and the results are put back in request order. Each actor loads the
checkpoint itself (the weights never travel through the object store).

Ray must be initialised by the caller (``opt_ray.ray_util.init_ray``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from opt_ray.eval.loading import EvalCheckpoint


class _Worker:
    """The actor body: a Scorer over the checkpoint's model, or over one tensor-parallel
    rank's part of it (``start(..., tp, rank, master)``)."""

    def __init__(self, threads: int | None):
        if threads:
            import torch
            torch.set_num_threads(threads)
        self.scorer = None

    def address(self) -> tuple[str, int]:
        """Where the rank-0 actor of a tensor-parallel group takes the others' rendezvous."""
        from opt_ray.ray_util import rendezvous_address
        return rendezvous_address()

    def start(self, ckpt: EvalCheckpoint, batch_size: int, dtype: str, device: str | None,
              tp: int = 1, rank: int = 0, master: tuple[str, int] | None = None) -> tuple[Any, int, int]:
        """Load the model (a bad checkpoint raises its ``UserError`` here); returns the
        model's config, its parameter count and the count this actor holds."""
        import torch

        from opt_ray.config import num_params
        from opt_ray.eval.loading import load_model, load_tokenizer
        from opt_ray.eval.scoring import Scorer

        if device == "cuda":
            from opt_ray.devices import local_device
            local_device(device)    # one line if there is no CUDA here
        if tp > 1:
            from opt_ray.model.parallel import join_tensor_group
            join_tensor_group(tp, rank, master, device or "cpu")
        model = load_model(ckpt, dtype=getattr(torch, dtype), node_cache=True, sharded=tp > 1)
        self.scorer = Scorer(model, batch_size=batch_size, device=device,
                             pad_id=model.config.pad_token_id, tokenizer=load_tokenizer(ckpt))
        held = sum(p.numel() for p in model.parameters())
        return model.config, num_params(model.config), held

    def loglikelihood(self, pairs):
        return self.scorer.loglikelihood(pairs)

    def perplexity(self, ckpt: EvalCheckpoint, data: str, split: str, batch_size: int,
                   max_rows: int | None) -> dict:
        """``commands.eval.evaluate`` of this actor's model (or its part: the loss is the
        vocabulary-parallel one training computes, the same on every rank)."""
        from opt_ray.commands.eval import evaluate
        from opt_ray.data.shards import ShardDataset
        from opt_ray.eval.loading import load_tokenizer
        ds = ShardDataset(data, split=split, tokenizer=load_tokenizer(ckpt))
        return evaluate(self.scorer.model, ds, batch_size=batch_size, max_rows=max_rows)

    def generate(self, prompts, kwargs):
        return self.scorer.generate(prompts, **kwargs)


class WorkerPool:
    """``workers`` Ray actors with the same interface as ``Scorer``. With ``tp`` > 1 they
    form ``workers // tp`` tensor-parallel groups, each on one node (a STRICT_PACK
    placement group) holding one copy of the model split ``tp`` ways: every rank of a
    group gets the same requests and runs the same forward passes (their all-reduces
    meet), and rank 0's results are the group's (every rank computes the same ones)."""

    def __init__(self, ckpt: EvalCheckpoint, *, workers: int, batch_size: int = 16,
                 dtype: str = "float32", device: str | None = None, cpus_per_worker: float = 1,
                 threads: int | None = 1, tp: int = 1):
        import ray

        if tp < 1 or workers % tp:    # EvalConfig says this to users
            raise ValueError(f"workers {workers} must be a multiple of tp {tp}")
        # One GPU per actor when scoring on CUDA: Ray picks the node and sets the actor's
        # CUDA_VISIBLE_DEVICES, so "cuda" is that GPU.
        opts = {"num_cpus": cpus_per_worker, "num_gpus": 1 if device == "cuda" else 0}
        actor = ray.remote(_Worker)
        self.placement_groups: list = []
        self.groups: list[list] = []
        for _ in range(workers // tp):
            if tp == 1:
                self.groups.append([actor.options(**opts).remote(threads)])
                continue
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if device == "cuda" else {})}
            pg = ray.util.placement_group([bundle] * tp, strategy="STRICT_PACK")
            self.placement_groups.append(pg)
            self.groups.append([actor.options(**opts, scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=r)).remote(threads) for r in range(tp)])
        self.actors = [a for g in self.groups for a in g]
        # Every actor has loaded its model (or its part) once this returns; a bad checkpoint
        # fails here, as soon as any actor fails (its group's others may wait on it).
        masters = [ray.get(g[0].address.remote()) if tp > 1 else None for g in self.groups]
        infos = self._all([[a.start.remote(ckpt, batch_size, dtype, device, tp, r, m)
                            for r, a in enumerate(g)] for g, m in zip(self.groups, masters)])
        # The parameters one actor holds: all of them, or about 1/tp under --tp.
        self.model_config, self.num_params, self.params_per_actor = infos[0]

    def _all(self, refs: list[list]) -> list:
        """Rank 0's result of every group (``refs[g][r]``: group g, rank r), in order."""
        out: list = [None] * len(refs)
        for g, value in self._stream({ref: g for g, rs in enumerate(refs) for ref in rs},
                                     {rs[0] for rs in refs}):
            out[g] = value
        return out

    def _stream(self, key_of: dict, primary: set) -> Iterator[tuple[Any, Any]]:
        """``(key, result)`` of each ``primary`` call as it finishes; the others (ranks > 0
        of a group, which compute the same) are awaited too, so that the first failure of
        any rank raises at once (a bad input as its ``UserError``, one line) and stops
        every actor: a group missing a rank would wait on it for ever."""
        import ray

        from opt_ray.ray_util import user_error
        pending = list(key_of)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                value = ray.get(done[0])
            except ray.exceptions.RayError as e:
                self.close()
                if (bad := user_error(e)) is not None:
                    raise bad from None       # bad input: one line, exit 2
                raise
            if done[0] in primary:
                yield key_of[done[0]], value

    def close(self) -> None:
        """Stop the actors and free their placement groups."""
        import ray
        for a in self.actors:
            ray.kill(a)
        for pg in self.placement_groups:
            ray.util.remove_placement_group(pg)
        self.placement_groups = []

    def _split(self, n: int, key: Callable[[int], Any]) -> list[list[int]]:
        order = sorted(range(n), key=key)
        return [order[w::len(self.groups)] for w in range(len(self.groups))]

    def _gather(self, n: int, parts: list[list[int]], method: str, args, progress) -> list:
        """Each group's part of the requests (every rank of a group gets the same ones),
        put back in request order as each group's rank 0 returns them."""
        out: list = [None] * n
        key_of, primary = {}, set()
        for group, idx in zip(self.groups, parts):
            refs = [getattr(a, method).remote(*args(idx)) for a in group]
            key_of.update(dict.fromkeys(refs, tuple(idx)))
            primary.add(refs[0])
        for idx, values in self._stream(key_of, primary):
            for i, v in zip(idx, values):
                out[i] = v
            if progress:
                progress(len(idx))
        return out

    def perplexity(self, ckpt: EvalCheckpoint, data: str, split: str, batch_size: int,
                   max_rows: int | None) -> dict:
        """Loss and perplexity on token shards by the first copy of the model (all its
        ranks, under ``tp``)."""
        return self._all([[a.perplexity.remote(ckpt, data, split, batch_size, max_rows)
                           for a in self.groups[0]]])[0]

    def loglikelihood(self, pairs: Sequence, progress: Callable[[int], None] | None = None) -> list:
        parts = self._split(len(pairs), lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        return self._gather(len(pairs), parts, "loglikelihood",
                            lambda idx: ([pairs[i] for i in idx],), progress)

    def generate(self, prompts: Sequence, progress: Callable[[int], None] | None = None, **kwargs) -> list:
        parts = self._split(len(prompts), lambda i: -len(prompts[i]))
        return self._gather(len(prompts), parts, "generate",
                            lambda idx: ([prompts[i] for i in idx], kwargs), progress)
