"""The resumable sampler: every row once per epoch for any world size, resume across
world sizes, order a pure function of (seed, epoch), skips that stay skipped."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from opt_ray.data.sampler import ResumableSampler, epoch_permutation


def _run(sampler: ResumableSampler, steps: int, global_batch: int, world: int) -> list[int]:
    """Drive one sampler instance per rank in lockstep, as a data-parallel gang does, and
    return every row handed out, in global order."""
    state = sampler.state_dict()
    ranks = []
    for r in range(world):
        s = ResumableSampler(sampler.num_rows, seed=sampler.seed)
        s.load_state_dict(state)
        ranks.append(s)
    seen: list[int] = []
    for _ in range(steps):
        per_rank = [s.next_batch(global_batch, r, world) for r, s in enumerate(ranks)]
        assert len({len(b) for b in per_rank}) == 1
        for b in per_rank:
            seen.extend(b)
    states = {json.dumps(s.state_dict()) for s in ranks}
    assert len(states) == 1, "ranks must stay in lockstep"
    sampler.load_state_dict(ranks[0].state_dict())
    return seen


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_row_once_per_epoch(world):
    num_rows, gb = 60, 6  # gb divides num_rows: 10 steps are exactly one epoch
    s = ResumableSampler(num_rows, seed=3)
    seen = _run(s, num_rows // gb, gb, world)
    assert sorted(seen) == list(range(num_rows))
    assert s.epoch == 1 and s.position == 0
    # world size does not change which rows a global batch holds
    assert seen == epoch_permutation(num_rows, 3, 0).tolist()


@pytest.mark.parametrize("first,second", [(1, 3), (3, 2), (2, 1), (2, 3)])
def test_resume_with_different_world_size(first, second):
    num_rows, gb = 97, 6  # 6 does not divide 97: batches straddle epoch boundaries
    s = ResumableSampler(num_rows, seed=11)
    a = _run(s, 7, gb, first)                      # stop at an arbitrary point
    resumed = ResumableSampler(num_rows, seed=0)   # seed comes from the state
    resumed.load_state_dict(json.loads(json.dumps(s.state_dict())))
    b = _run(resumed, 40, gb, second)
    stream = a + b
    # epoch e is exactly positions [e*num_rows, (e+1)*num_rows) of the global stream
    for e in range(len(stream) // num_rows):
        epoch_rows = stream[e * num_rows:(e + 1) * num_rows]
        assert sorted(epoch_rows) == list(range(num_rows)), f"epoch {e}"
        assert epoch_rows == epoch_permutation(num_rows, 11, e).tolist()
    # and it is the same stream an uninterrupted single-worker run produces
    ref = _run(ResumableSampler(num_rows, seed=11), 47, gb, 1)
    assert stream == ref


def test_order_is_pure_function_of_seed_and_epoch():
    a = epoch_permutation(1000, 5, 2)
    assert np.array_equal(a, epoch_permutation(1000, 5, 2))
    assert not np.array_equal(a, epoch_permutation(1000, 5, 3))
    assert not np.array_equal(a, epoch_permutation(1000, 6, 2))
    # jumping straight to epoch 2 gives the same rows as walking there
    s = ResumableSampler(1000, seed=5, consumed=2000)
    assert s.next_batch(1000) == a.tolist()
    walked = ResumableSampler(1000, seed=5)
    walked.next_global_batch(2000)
    assert walked.next_batch(1000) == a.tolist()


def test_straddling_batch_semantics():
    s = ResumableSampler(10, seed=0, consumed=8)
    rows = s.next_batch(4)
    assert rows == epoch_permutation(10, 0, 0)[8:].tolist() + epoch_permutation(10, 0, 1)[:2].tolist()
    assert (s.consumed, s.epoch, s.position) == (12, 1, 2)


def test_skip_and_skip_range_stay_skipped():
    n, gb = 50, 5
    s = ResumableSampler(n, seed=1)
    s.next_batch(gb)
    start, end = s.skip(gb)                       # skip the next (bad) batch
    assert (start, end) == (5, 10)
    after = s.next_batch(gb)
    assert after == epoch_permutation(n, 1, 0)[10:15].tolist()

    # roll back to an earlier checkpoint: the recorded skip travels with the new state
    old = ResumableSampler(n, seed=1)
    old.next_batch(gb)
    ckpt = old.state_dict()
    rolled = ResumableSampler(n, seed=1)
    rolled.load_state_dict(ckpt)
    rolled.skip_range(start, end)
    assert rolled.next_batch(gb) == after
    assert rolled.state_dict()["skipped"] == [[5, 10]]
    # a skip range in the middle of a batch is jumped over, the batch stays full
    t = ResumableSampler(n, seed=1)
    t.skip_range(2, 4)
    rows = t.next_batch(gb)
    perm = epoch_permutation(n, 1, 0)
    assert rows == perm[[0, 1, 4, 5, 6]].tolist() and t.consumed == 7
    # skipped rows are skipped in that epoch only
    t.load_state_dict({**t.state_dict(), "consumed": 0})
    one_epoch = t.next_global_batch(n - 2)
    assert Counter(one_epoch.tolist()) == Counter(np.delete(perm, [2, 3]).tolist())


def test_peek_is_the_next_batch_without_taking_it():
    """What the trainer's reader fetches ahead: the next call's rows, across an epoch
    boundary too; a skip in between makes the next batch another one."""
    s = ResumableSampler(10, seed=3, consumed=6)
    ahead = s.peek_batch(8, rank=1, world_size=2)
    assert s.consumed == 6 and s.peek_batch(8, 1, 2) == ahead
    twin = ResumableSampler(10, seed=3, consumed=6)
    assert s.next_batch(8, 1, 2) == ahead == twin.next_batch(8, 1, 2) and s.consumed == 14
    ahead = s.peek_batch(4)
    s.skip(2)
    assert s.next_batch(4) != ahead


def test_bad_arguments():
    s = ResumableSampler(10, seed=0)
    with pytest.raises(ValueError, match="divisible"):
        s.next_batch(5, 0, 2)
    with pytest.raises(ValueError, match="rows"):
        s.load_state_dict({"consumed": 0, "seed": 0, "num_rows": 11})
    with pytest.raises(ValueError):
        ResumableSampler(0, seed=0)
