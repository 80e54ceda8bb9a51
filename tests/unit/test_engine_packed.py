"""The packed engine step (issue 15): prefill chunks and decode rows in one forward, each
row attending over its own length, chunked prefill, batched sampling, logprobs, the byte
table detokenizer. References: transformers (greedy ids, log-softmax) and the tokenizer's
own decode."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from opt_ray.serve.engine import (EngineConfig, EngineLoop, EngineRequest, IncrementalDetokenizer,
                                  engine_from_checkpoint)
from opt_ray.serve.sampling import SamplingParams, filter_top_k_top_p, make_generator, sample_batch
from tests.serve_helpers import build_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("opt-tiny-packed"))


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import OPTForCausalLM
    return OPTForCausalLM.from_pretrained(str(ckpt)).eval()


def _engine(ckpt, **kw):
    kw.setdefault("max_num_seqs", 8)
    kw.setdefault("max_waiting", 16)
    return engine_from_checkpoint(ckpt, EngineConfig(**kw))


def _prompts(n: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 400) for _ in range(L)] for L in lengths[:n]]


def _hf_greedy(hf, ids: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=1)
    return out[0, len(ids):].tolist()


def _hf_logsoftmax(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def _drain(engine, rids: set[str]):
    toks: dict[str, list[int]] = {r: [] for r in rids}
    lps: dict[str, list] = {r: [] for r in rids}
    prompt_lps: dict[str, list] = {}
    done: set[str] = set()
    while done != rids:
        for out in engine.step():
            if out.prompt_logprobs is not None:
                prompt_lps[out.request_id] = out.prompt_logprobs
            for c in out.outputs:
                toks[out.request_id] += c.token_ids
                lps[out.request_id] += c.logprobs or []
            if out.finished:
                done.add(out.request_id)
    return toks, lps, prompt_lps


LENGTHS = [1, 3, 17, 90, 200, 40]


def _assert_greedy_together_equals_hf(engine, hf, prompts: list[list[int]], max_new: int) -> None:
    """All prompts submitted at once and run to the end: each one's greedy ids equal
    transformers' for that prompt alone."""
    p = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", ids, p))
    got, _, _ = _drain(engine, {f"r{i}" for i in range(len(prompts))})
    for i, ids in enumerate(prompts):
        assert got[f"r{i}"] == _hf_greedy(hf, ids, max_new), (i, len(ids))


@pytest.mark.parametrize("budget", [512, 7])
def test_greedy_equals_transformers_very_different_lengths(ckpt, hf, budget):
    """Prompts of 1..200 tokens together (chunked under a 7-token budget or not): greedy
    ids equal transformers' for every request."""
    engine = _engine(ckpt, max_prefill_tokens=budget)
    prompts = _prompts(6, LENGTHS)
    _assert_greedy_together_equals_hf(engine, hf, prompts, 10)
    # Every prompt token went through the model exactly once.
    assert engine.stats().prefill_tokens == sum(map(len, prompts))


def test_chunked_prefill_same_tokens_and_chunk_count(ckpt):
    prompt = _prompts(1, [50], seed=3)[0]
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    whole = _engine(ckpt).generate(prompt, p)[0].token_ids
    engine = _engine(ckpt, max_prefill_tokens=8)
    engine.add_request(EngineRequest("c", prompt, p))
    first_token_step = None
    while engine.has_work():
        outs = engine.step()
        if first_token_step is None and any(c.token_ids for o in outs for c in o.outputs):
            first_token_step = engine.steps
            assert engine.stats().last_step_prefill_tokens == 50 - 6 * 8
    assert first_token_step == 7                           # ceil(50 / 8) chunks
    assert _engine(ckpt, max_prefill_tokens=8).generate(prompt, p)[0].token_ids == whole


def test_prefill_and_decode_share_one_forward(ckpt, hf):
    """A newcomer's prompt is computed in the same forward as the running decodes: one
    forward per step, its rows = the decoders + the newcomer's chunk."""
    engine = _engine(ckpt)
    a, b, c = _prompts(3, [30, 12, 70], seed=5)
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request(EngineRequest("a", a, p))
    engine.add_request(EngineRequest("b", b, p))
    engine.step()                                            # both prompts: one forward
    st = engine.stats()
    assert (st.forwards, st.last_step_rows, st.last_step_prefill_tokens, st.last_step_decode_rows) == (1, 2, 42, 0)
    engine.step()
    engine.add_request(EngineRequest("c", c, p))
    outs = {o.request_id: o for o in engine.step()}
    st = engine.stats()
    assert (st.forwards, st.last_step_rows, st.last_step_prefill_tokens, st.last_step_decode_rows) == (3, 3, 70, 2)
    assert set(outs) == {"a", "b", "c"} and all(len(o.outputs[0].token_ids) == 1 for o in outs.values())
    got, _, _ = _drain(engine, {"a", "b", "c"})
    assert engine.stats().forwards == engine.steps
    # And the packed tokens are the right ones.
    firsts = {"a": 2, "b": 2, "c": 0}
    for rid, ids in zip("abc", (a, b, c)):
        assert got[rid] == _hf_greedy(hf, ids, 8)[firsts[rid] + 1:], rid


def test_logprobs_equal_transformers_prompt_and_generated(ckpt, hf):
    """echo + logprobs: every prompt token's log-prob (first None) and every generated
    token's raw log-prob (before temperature) equal transformers' log_softmax over the
    full sequence; the top-N are the true top-N; the chosen token is always present."""
    engine = _engine(ckpt, max_prefill_tokens=16)          # prompt logprobs across chunks
    prompts = _prompts(3, [37, 5, 120], seed=7)
    k = 2
    params = [SamplingParams(max_tokens=9, temperature=0, echo=True, logprobs=k, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=3.0, seed=1, echo=True, logprobs=1, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0, logprobs=0, ignore_eos=True)]
    for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.add_request(EngineRequest(f"l{i}", ids, p))
    toks, lps, plps = _drain(engine, {"l0", "l1", "l2"})
    outside = 0
    for i, (ids, p) in enumerate(zip(prompts, params)):
        rid = f"l{i}"
        full = ids + toks[rid]
        ref = _hf_logsoftmax(hf, full)                      # (len, V)
        entries = ([] if not p.echo else plps[rid][1:]) + lps[rid]
        start = 1 if p.echo else len(ids)
        if p.echo:
            assert plps[rid][0] is None and len(plps[rid]) == len(ids)
        else:
            assert plps.get(rid) is None
        assert len(entries) == len(full) - start
        for j, e in zip(range(start, len(full)), entries):
            assert e.token_id == full[j]
            assert e.logprob == pytest.approx(float(ref[j - 1, full[j]]), abs=1e-4)
            top_ref = torch.topk(ref[j - 1], p.logprobs).indices.tolist() if p.logprobs else []
            assert [t for t, _ in e.top[:p.logprobs]] == top_ref
            assert dict(e.top)[full[j]] == e.logprob       # chosen present whatever it is
            outside += full[j] not in top_ref
    assert outside > 0                                     # the case was exercised


def test_stream_equals_non_stream_with_logprobs(ckpt):
    engine = _engine(ckpt, max_prefill_tokens=10)
    prompts = _prompts(4, [3, 60, 25, 9], seed=11)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=5,
                            logprobs=3, echo=True, ignore_eos=True)
    expected = [engine.generate(ids, params)[0] for ids in prompts]

    async def one(loop, i, ids):
        toks, text, lps = [], "", []
        async for out in loop.generate(EngineRequest(f"s{i}", ids, params)):
            for c in out.outputs:
                toks += c.token_ids
                text += c.text
                lps += c.logprobs or []
        return toks, text, lps

    async def main():
        loop = EngineLoop(engine)
        try:
            return await asyncio.gather(*(one(loop, i, ids) for i, ids in enumerate(prompts)))
        finally:
            loop.stop()
    for (toks, text, lps), e in zip(asyncio.run(main()), expected):
        assert toks == e.token_ids and text == e.text
        # Same tokens and alternatives; values equal up to GEMM rounding (other batch shapes).
        assert [(x.token_id, [t for t, _ in x.top]) for x in lps] == \
            [(x.token_id, [t for t, _ in x.top]) for x in e.logprobs]
        assert [x.logprob for x in lps] == pytest.approx([x.logprob for x in e.logprobs], abs=1e-4)


def test_byte_table_detokenizer_equals_decode(ckpt):
    engine = _engine(ckpt)
    tok = engine.tokenizer
    assert engine._byte_table is not None                  # the O(1) path is in use
    rng = random.Random(0)
    V = tok.get_vocab_size()
    for trial in range(30):
        ids = [rng.randrange(0, V) for _ in range(rng.randint(1, 40))]
        fast, slow = IncrementalDetokenizer(tok), IncrementalDetokenizer(tok, table=None)
        a = "".join(fast.push(t) for t in ids) + fast.flush()
        b = "".join(slow.push(t) for t in ids) + slow.flush()
        assert a == b == tok.decode(ids, skip_special_tokens=True), ids


def test_sample_batch_rows_independent_and_filtered():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    ps = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=3, seed=1),
          SamplingParams(temperature=0.7, top_p=0.5, seed=2), SamplingParams(temperature=2.0, seed=3),
          SamplingParams(temperature=1.0, top_k=5, top_p=0.8, seed=4),
          SamplingParams(temperature=0, repetition_penalty=100.0)]
    seen = [None] * 5 + [torch.tensor([int(logits[5].argmax())])]
    gens = [None if p.greedy else make_generator(p.seed) for p in ps]
    batch = sample_batch(logits, ps, seen, gens)
    # Each row alone, with a fresh generator of the same seed, gives the same token.
    for i, p in enumerate(ps):
        g = None if p.greedy else make_generator(p.seed)
        assert sample_batch(logits[i:i + 1], [p], [seen[i]], [g]) == [batch[i]]
    assert batch[0] == int(logits[0].argmax())
    assert batch[5] != int(logits[5].argmax())             # the penalty moved it
    # Draws only from the tokens filter_top_k_top_p keeps.
    for i in (1, 2, 4):
        allowed = torch.isfinite(filter_top_k_top_p(logits[i] / ps[i].temperature, ps[i].top_k, ps[i].top_p))
        rows = logits[i].expand(200, -1)
        g = make_generator(9)
        picks = sample_batch(rows, [ps[i]] * 200, [None] * 200, [g] * 200)
        assert all(bool(allowed[t]) for t in picks) and len(set(picks)) > 1


def test_float16_and_threads_config(ckpt):
    engine = _engine(ckpt, dtype="float16", threads=1)
    assert torch.get_num_threads() == 1
    out = engine.generate(_prompts(1, [20])[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 5
    torch.set_num_threads(2)


def test_prefix_cache_reuses_a_freed_slot_and_equals_transformers(ckpt, hf):
    """A prompt repeated, and one extending an earlier prompt, compute only what the freed
    slot does not hold (the last prompt token always: its logits are the first sample);
    greedy ids still equal transformers'."""
    engine = _engine(ckpt, max_num_seqs=2)
    base = _prompts(1, [40], seed=11)[0]
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first = engine.generate(base, p)[0].token_ids
    assert first == _hf_greedy(hf, base, 6)
    st = engine.stats()
    assert (st.prefill_tokens, st.prefix_cached_tokens) == (40, 0)
    assert engine.generate(base, p)[0].token_ids == first             # the same prompt again
    st = engine.stats()
    assert (st.prefill_tokens, st.prefix_cached_tokens) == (41, 39)
    # The slot now holds base + 5 generated tokens: a prompt continuing the generated text
    # reuses 45 columns.
    longer = base + first[:5] + _prompts(1, [7], seed=12)[0]
    assert engine.generate(longer, p)[0].token_ids == _hf_greedy(hf, longer, 6)
    st = engine.stats()
    assert (st.prefill_tokens, st.prefix_cached_tokens) == (41 + 7, 39 + 45)


def test_prefix_cache_never_reuses_overwritten_or_when_off(ckpt, hf):
    engine = _engine(ckpt, max_num_seqs=1)
    a, b = _prompts(2, [30, 30], seed=13)
    b = a[:10] + b[10:]                                              # shares 10 tokens with a
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.generate(a, p)
    engine.generate(b, p)                                            # overwrites a's slot from column 10
    st = engine.stats()
    assert st.prefix_cached_tokens == 10
    assert engine.generate(a, p)[0].token_ids == _hf_greedy(hf, a, 4)
    assert engine.stats().prefix_cached_tokens == 20                 # only the 10 still held
    off = _engine(ckpt, max_num_seqs=1, prefix_caching=False)
    off.generate(a, p)
    assert off.generate(a, p)[0].token_ids == _hf_greedy(hf, a, 4)
    assert (off.stats().prefill_tokens, off.stats().prefix_cached_tokens) == (60, 0)


def test_prefix_cache_skipped_for_prompt_logprobs(ckpt, hf):
    """echo + logprobs needs every prompt position's logits: such a request recomputes."""
    engine = _engine(ckpt, max_num_seqs=1)
    ids = _prompts(1, [25], seed=14)[0]
    engine.generate(ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    rid = "echo"
    engine.add_request(EngineRequest(rid, ids, SamplingParams(max_tokens=1, temperature=0, echo=True,
                                                              logprobs=0, ignore_eos=True)))
    _, _, prompt_lps = _drain(engine, {rid})
    ref = _hf_logsoftmax(hf, ids)
    assert engine.stats().prefix_cached_tokens == 0
    assert len(prompt_lps[rid]) == 25 and prompt_lps[rid][0] is None
    for i in range(1, 25):
        assert abs(prompt_lps[rid][i].logprob - ref[i - 1, ids[i]].item()) < 1e-4


@pytest.mark.parametrize("min_fill", [0.0, 2.0], ids=["grouped", "per-row"])
def test_decode_attention_grouped_or_per_row_equals_transformers(ckpt, hf, monkeypatch, min_fill):
    """Both ways decode rows attend (one masked SDPA over the slots, or one SDPA per row
    over exactly its keys) give transformers' greedy ids, lengths 1..200 together."""
    from opt_ray.serve import runner
    monkeypatch.setattr(runner, "GROUP_MIN_FILL", min_fill)
    engine = _engine(ckpt, max_prefill_tokens=64)
    _assert_greedy_together_equals_hf(engine, hf, _prompts(6, LENGTHS, seed=15), 8)


def test_prepacked_linears_on_cpu_fp32_equal_the_model_weights(ckpt):
    """On CPU in fp32 small steps run on oneDNN-prepacked weights: the hidden states and
    logits equal those from the model's own weights to float rounding."""
    from opt_ray.serve.runner import Row
    engine = _engine(ckpt)
    runner = engine.runner
    assert runner.packed is not None and runner.packed.head is not None
    ids = _prompts(1, [33], seed=16)[0]
    rows = [Row(0, len(ids), 0, 0)]
    args = (ids, list(range(len(ids))), [0] * len(ids), rows, list(range(len(ids))))
    with torch.inference_mode():
        h_packed = runner.forward(*args)
        logits_packed = runner.lm_head(h_packed)
        packed, runner.packed = runner.packed, None
        try:
            h_dense = runner.forward(*args)
            logits_dense = runner.lm_head(h_dense)
        finally:
            runner.packed = packed
    torch.testing.assert_close(h_packed, h_dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_packed, logits_dense, rtol=1e-4, atol=1e-4)


def test_bf16_lone_row_runs_bf16_linears_close_to_fp32_over_rounded_weights(ckpt):
    """--dtype bfloat16 on a CPU without native bf16: a step of one row runs its linears
    and head in bf16 over bf16 copies of the weights; its logits stay within bf16 rounding
    of fp32 over the same rounded weights (a wrong weight or a dropped bias/ReLU is far off),
    and two rows take the fp32 path exactly as with the copies off."""
    from opt_ray.serve.engine import compute_dtype
    from opt_ray.serve.runner import HALF_MAX_ROWS, Row

    from opt_ray.serve.runner import ModelRunner

    engine = _engine(ckpt, dtype="bfloat16")
    if compute_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16:
        pytest.skip("this CPU computes bf16 natively: no lone-row bf16 path")
    with torch.no_grad():  # the checkpoint's biases are zeros: give them values to carry
        g = torch.Generator().manual_seed(0)
        for name, p in engine.model.named_parameters():
            if name.endswith("bias"):
                p.copy_((torch.randn(p.shape, generator=g) * 0.5).bfloat16().float())
    runner = engine.runner = ModelRunner(engine.model, engine.kv, half=torch.bfloat16)
    assert runner.packed is not None and runner.packed.half is not None and HALF_MAX_ROWS == 1
    ids = _prompts(1, [12], seed=18)[0]
    rows = [Row(0, len(ids), 0, 0)]
    with torch.inference_mode():
        runner.forward(ids, list(range(len(ids))), [0] * len(ids), rows, [len(ids) - 1])

        def step(n_rows: int) -> torch.Tensor:   # the next token of n identical sequences
            for s in range(1, n_rows):
                engine.kv.copy_slot(0, s, len(ids))
            rws = [Row(j, 1, j, len(ids)) for j in range(n_rows)]
            h = runner.forward([ids[-1]] * n_rows, [len(ids)] * n_rows, list(range(n_rows)), rws,
                               list(range(n_rows)))
            return runner.lm_head(h)

        lone, pair = step(1)[0], step(2)
        half, runner.packed.half, runner.packed.half_head = (
            (runner.packed.half, runner.packed.half_head), None, None)
        try:
            ref, ref_pair = step(1)[0], step(2)
        finally:
            runner.packed.half, runner.packed.half_head = half
    assert not torch.equal(lone, ref)                     # the bf16 path did run
    err = (lone - ref).abs().max() / ref.abs().max()
    assert err < 0.03, err
    assert torch.equal(pair, ref_pair)                    # two rows: fp32, untouched


def test_prepack_off_keeps_one_copy_and_same_greedy(ckpt, hf):
    engine = _engine(ckpt, prepack_weights=False)
    assert engine.runner.packed is None
    ids = _prompts(1, [21], seed=17)[0]
    out = engine.generate(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert out[0].token_ids == _hf_greedy(hf, ids, 6)
