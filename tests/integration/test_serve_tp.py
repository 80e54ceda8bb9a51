"""`opt-ray serve --tensor-parallel-size N`: a replica split over N processes (one GPU
each on GPUs; here CPUs and gloo), as training's tensor parallelism splits the model,
answers as the whole model does: greedy completions through the official ``openai``
client equal ``transformers``' greedy generation, with several choices per request
(their KV copied on every rank) and requests batched together; the replica's KV cache
per process is 1/N of the whole model's. Binds 127.0.0.1 on free ports."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from tests.conftest import free_port
from tests.integration.test_serve_ray import PROMPTS, _hf_greedy_texts, _wait_ready
from tests.serve_helpers import actor_pids, build_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_a_replica_split_two_ways_answers_as_the_whole_model(ray_local, tmp_path):
    from openai import OpenAI
    from ray import serve

    from actors.serve import build_app, start
    from opt_ray.serve.engine import EngineConfig, engine_from_checkpoint

    ckpt = build_checkpoint(tmp_path / "ckpt")
    cfg = EngineConfig(max_num_seqs=4, device="cpu")
    whole_kv = engine_from_checkpoint(ckpt, cfg).stats().kv_cache_bytes
    port = free_port()
    start(build_app(ckpt, model_name="opt-tp", replicas=1, grpc_port=None,
                    engine_config=EngineConfig(max_num_seqs=4, device="cpu", tensor_parallel_size=2)),
          host="127.0.0.1", http_port=port)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, timeout=120)
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        want = _hf_greedy_texts(ckpt, PROMPTS, 12)
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:     # batched in one replica
            got = list(pool.map(lambda p: client.completions.create(
                model="opt-tp", prompt=p, max_tokens=12, temperature=0).choices[0].text, PROMPTS))
        assert got == want
        two = client.completions.create(model="opt-tp", prompt=PROMPTS[1], max_tokens=12,
                                        temperature=0, n=2)
        assert [c.text for c in two.choices] == [want[1]] * 2
        import httpx
        stats = httpx.get(f"{base}/v1/stats", timeout=10).json()
        assert stats["kv_cache_bytes"] * 2 == whole_kv, (stats, whole_kv)
        assert stats["num_slots"] == 4 and stats["forwards"] > 0

        # A rank's process dies: the replica's health check fails at once (not when a
        # collective times out), Serve replaces the replica with its ranks, and it answers
        # as before.
        import os
        import signal
        import time

        def rank_pids() -> set[int]:
            return actor_pids("_EngineRank")

        (old,) = rank_pids()
        os.kill(old, signal.SIGKILL)
        deadline, text = time.monotonic() + 150, None
        while time.monotonic() < deadline:
            try:
                text = client.completions.create(model="opt-tp", prompt=PROMPTS[2], max_tokens=12,
                                                 temperature=0, timeout=20).choices[0].text
                if rank_pids() - {old}:
                    break
            except Exception:
                pass
            time.sleep(1)
        assert text == want[2] and len(rank_pids() - {old}) == 1, (text, rank_pids())
    finally:
        serve.shutdown()
    import ray
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
