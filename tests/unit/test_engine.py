"""The serving engine without Ray: parity with transformers greedy generation, batching
behaviour, sampling options, stops, detokenization, cancellation and the bounded queue."""

from __future__ import annotations

import asyncio

import pytest
import torch

from opt_ray.serve.engine import (EngineConfig, EngineLoop, EngineRequest, IncrementalDetokenizer,
                                  QueueFullError, RequestError, engine_from_checkpoint,
                                  load_model_and_tokenizer)
from opt_ray.serve.sampling import SamplingParams, filter_top_k_top_p
from tests.serve_helpers import build_checkpoint

PROMPTS = ["The", "The quick brown fox", "Ray Serve runs replicas of a deployment behind",
           "Continuous batching lets requests join and leave at every step. Open pretrained"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("opt-tiny"))


@pytest.fixture()
def engine(ckpt):
    return engine_from_checkpoint(ckpt, EngineConfig(max_num_seqs=4, max_waiting=4))


def _hf_greedy(ckpt, ids: list[int], max_new: int) -> list[int]:
    from transformers import OPTForCausalLM
    hf = OPTForCausalLM.from_pretrained(str(ckpt)).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=max_new, pad_token_id=1)
    return out[0, len(ids):].tolist()


def _drain(engine, ids: set[str]) -> dict[str, dict[int, list[int]]]:
    """Step until the given requests finish; token ids per request per choice index."""
    toks: dict[str, dict[int, list[int]]] = {r: {} for r in ids}
    done: set[str] = set()
    while done != ids:
        for out in engine.step():
            for c in out.outputs:
                toks[out.request_id].setdefault(c.index, []).extend(c.token_ids)
            if out.finished:
                done.add(out.request_id)
    return toks


def test_greedy_matches_transformers_with_ragged_concurrent_batch(ckpt, engine):
    tok = engine.tokenizer
    prompts = {f"r{i}": tok.encode(p).ids for i, p in enumerate(PROMPTS)}
    for rid, ids in prompts.items():
        engine.add_request(EngineRequest(rid, ids, SamplingParams(max_tokens=12, temperature=0)))
    got = _drain(engine, set(prompts))
    for rid, ids in prompts.items():
        ref = _hf_greedy(ckpt, ids, 12)
        if ref and ref[-1] == engine.eos_token_id:
            ref = ref[:-1]                      # the engine does not return the EOS token
        assert got[rid][0] == ref, rid


def test_new_request_joins_while_others_decode(engine):
    tok = engine.tokenizer
    p = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine.add_request(EngineRequest("a", tok.encode(PROMPTS[1]).ids, p))
    engine.add_request(EngineRequest("b", tok.encode(PROMPTS[2]).ids, p))
    for _ in range(5):
        engine.step()
    assert engine.stats().running_requests == 2
    engine.add_request(EngineRequest("c", tok.encode(PROMPTS[0]).ids, p))
    outs = {o.request_id: o for o in engine.step()}
    # c got its first token in the same step in which a and b each got one more.
    assert set(outs) == {"a", "b", "c"} and not outs["a"].finished
    st = engine.stats()
    assert st.running_requests == 3 and st.free_slots == st.num_slots - 3
    # c decodes alongside a and b, and leaves later than they do (it started later).
    finished_order = []
    while engine.has_work():
        finished_order += [o.request_id for o in engine.step() if o.finished]
    assert finished_order[-1] == "c"
    assert engine.stats().free_slots == engine.stats().num_slots


def test_batched_output_equals_alone(ckpt, engine):
    """A request's greedy output does not depend on what shares its batch."""
    tok = engine.tokenizer
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ids = tok.encode(PROMPTS[3]).ids
    alone = engine.generate(ids, p)[0].token_ids
    engine.add_request(EngineRequest("x", tok.encode(PROMPTS[1]).ids, p))
    engine.step(); engine.step()
    engine.add_request(EngineRequest("y", ids, p))
    assert _drain(engine, {"x", "y"})["y"][0] == alone


def test_seeded_sampling_is_reproducible_and_seed_matters(engine):
    ids = engine.tokenizer.encode(PROMPTS[1]).ids
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = engine.generate(ids, p)[0].token_ids
    b = engine.generate(ids, p)[0].token_ids
    c = engine.generate(ids, SamplingParams(**{**p.__dict__, "seed": 99}))[0].token_ids
    assert a == b and a != c


def test_n_choices_distinct_and_logprobs(engine):
    ids = engine.tokenizer.encode(PROMPTS[1]).ids
    outs = engine.generate(ids, SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=7,
                                               logprobs=2, ignore_eos=True))
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) > 1
    for o in outs:
        assert len(o.logprobs) == len(o.token_ids) == 8
        for lp, t in zip(o.logprobs, o.token_ids):
            # The top 2, plus the chosen token when it is not among them (OpenAI/vLLM).
            assert lp.token_id == t and lp.logprob <= 0 and len(lp.top) == (2 if t in dict(lp.top[:2]) else 3)
            assert lp.top[0][1] >= lp.top[1][1] and dict(lp.top)[t] == lp.logprob


def test_echo_prompt_logprobs_match_a_full_forward(engine):
    ids = engine.tokenizer.encode(PROMPTS[2]).ids
    engine.add_request(EngineRequest("e", ids, SamplingParams(max_tokens=1, temperature=0,
                                                              echo=True, logprobs=0)))
    first = engine.step()[0]
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == len(ids)
    with torch.no_grad():
        ref = torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), -1)
    for i in range(1, len(ids)):
        assert first.prompt_logprobs[i].logprob == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)


def test_stop_strings_min_tokens_and_stop_ids(engine):
    ids = engine.tokenizer.encode(PROMPTS[1]).ids
    base = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = engine.generate(ids, base)[0]
    # Stop on a piece of text the greedy continuation contains: output ends right before it.
    stop = full.text[5:8]
    cut = engine.generate(ids, SamplingParams(**{**base.__dict__, "stop": [stop]}))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    # A stop token id ends generation without being returned...
    tid = full.token_ids[3]
    s = engine.generate(ids, SamplingParams(**{**base.__dict__, "stop_token_ids": [tid]}))[0]
    assert s.finish_reason == "stop" and s.token_ids == full.token_ids[: full.token_ids.index(tid)]
    # ...unless min_tokens forbids stopping yet (then the id is masked out until then).
    m = engine.generate(ids, SamplingParams(**{**base.__dict__, "stop_token_ids": [tid], "min_tokens": 10}))[0]
    assert len(m.token_ids) >= 10 and tid not in m.token_ids[:10]


def test_repetition_penalty_changes_greedy_output(engine):
    ids = engine.tokenizer.encode(PROMPTS[0]).ids
    plain = engine.generate(ids, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    pen = engine.generate(ids, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                              repetition_penalty=5.0))[0]
    assert len(set(pen.token_ids)) > len(set(plain.token_ids))


def test_top_k_top_p_filter():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [False, False, True, True]
    # p = (0.64, 0.24, 0.09, 0.03): top_p 0.5 keeps the best, 0.85 the first two.
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.5)).sum() == 1
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.85)).sum() == 2


def test_incremental_detokenizer_streams_valid_utf8(engine):
    tok = engine.tokenizer
    text = "Zürich, café — ünïcödé ✓ and 日本語"
    ids = tok.encode(text).ids
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_bad_requests_are_request_errors(engine):
    ids = engine.tokenizer.encode("The").ids
    with pytest.raises(RequestError, match="max_tokens"):
        engine.add_request(EngineRequest("long", ids, SamplingParams(max_tokens=10_000)))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request(EngineRequest("empty", [], SamplingParams()))
    with pytest.raises(Exception, match="temperature"):
        engine.add_request(EngineRequest("t", ids, SamplingParams(temperature=-1)))
    assert not engine.has_work()


def test_bounded_queue(engine):
    """Free slots take requests at the next step; beyond them max_waiting may wait."""
    ids = engine.tokenizer.encode("The").ids
    for i in range(engine.stats().num_slots + engine.config.max_waiting):
        engine.add_request(EngineRequest(f"q{i}", ids, SamplingParams(max_tokens=2)))
    with pytest.raises(QueueFullError):
        engine.add_request(EngineRequest("one-too-many", ids, SamplingParams(max_tokens=2)))


def test_kv_budget_sets_slot_count(ckpt):
    model, tok, eos = load_model_and_tokenizer(ckpt)
    from opt_ray.serve.engine import Engine, SlotKVCache
    per_slot = SlotKVCache.bytes_per_slot(2, 64, 128, torch.float32)
    e = Engine(model, tok, EngineConfig(max_num_seqs=16, max_model_len=128,
                                        kv_cache_bytes=3 * per_slot + 1), eos_token_id=eos)
    assert e.stats().num_slots == 3 and e.stats().kv_cache_bytes == 3 * per_slot


def test_default_dtype_and_device_are_resolved_where_the_engine_runs(ckpt):
    # --dtype auto / --device auto: float32 on this CPU, bf16 on a GPU (a replica used to
    # default to fp32 there: twice the weights' memory and bytes per decode step).
    from opt_ray.devices import auto_dtype
    from opt_ray.serve.engine import engine_from_checkpoint
    assert (auto_dtype("auto", "cuda"), auto_dtype("auto", "cpu")) == ("bfloat16", "float32")
    assert auto_dtype("float16", "cuda") == "float16"
    e = engine_from_checkpoint(ckpt, EngineConfig(max_num_seqs=2))
    assert (e.config.dtype, e.config.device) == ("float32", "cpu")
    assert {p.dtype for p in e.model.parameters()} == {torch.float32}
    e = engine_from_checkpoint(ckpt, EngineConfig(max_num_seqs=2, dtype="bfloat16", device="cpu"))
    assert e.config.dtype == "bfloat16" and e.dtype == torch.bfloat16


def test_cancel_mid_stream_frees_slot_and_kv(engine):
    async def main():
        loop = EngineLoop(engine)
        try:
            ids = engine.tokenizer.encode(PROMPTS[1]).ids
            req = EngineRequest("c1", ids, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
            gen = loop.generate(req)
            await gen.__anext__()
            await gen.__anext__()
            st = engine.stats()
            assert st.running_requests == 1 and st.kv_tokens_used > 0
            await gen.aclose()                  # the client went away
            for _ in range(100):
                st = engine.stats()
                if st.running_requests == 0:
                    break
                await asyncio.sleep(0.02)
            assert st.running_requests == 0 and st.free_slots == st.num_slots and st.kv_tokens_used == 0
            assert st.output_tokens < 200 and st.aborted_requests == 1
        finally:
            loop.stop()
    asyncio.run(main())


def test_engine_loop_concurrent_streams_equal_one_shot(engine):
    p = SamplingParams(max_tokens=12, temperature=0)
    prompts = [engine.tokenizer.encode(t).ids for t in PROMPTS]
    expected = [engine.generate(ids, p)[0].text for ids in prompts]

    async def one(loop, i, ids):
        text = ""
        async for out in loop.generate(EngineRequest(f"s{i}", ids, p)):
            text += "".join(c.text for c in out.outputs)
        return text

    async def main():
        loop = EngineLoop(engine)
        try:
            return await asyncio.gather(*(one(loop, i, ids) for i, ids in enumerate(prompts)))
        finally:
            loop.stop()
    assert asyncio.run(main()) == expected
