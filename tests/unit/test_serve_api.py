"""The OpenAI-compatible request schema without Ray: every bad-input case is an
``ApiError`` (400, naming the field) before any engine sees it; responses and stream
chunks have the OpenAI shapes; gRPC messages go through the same validation."""

from __future__ import annotations

import pytest

from opt_ray.serve import api
from opt_ray.serve.api import ApiError
from opt_ray.serve.engine import CompletionOutput, RequestOutput, TokenLogprob
from tests.serve_helpers import build_tokenizer

CTX, VOCAB = 64, 512


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def parse(tok, **body):
    return api.parse_completion({"model": "m", "prompt": "The quick brown fox", **body},
                                model_name="m", tokenizer=tok, max_model_len=CTX, vocab_size=VOCAB)


def test_defaults_and_extensions(tok):
    r = parse(tok)
    assert r.params.max_tokens == 16 and r.params.temperature == 1.0 and r.params.n == 1
    assert r.prompt_token_ids == tok.encode("The quick brown fox").ids and not r.stream
    r = parse(tok, temperature=0, top_k=-1, stop="\n", seed=3, min_tokens=2, repetition_penalty=1.2,
              stop_token_ids=[2], logprobs=2, echo=True, stream=True, stream_options={"include_usage": True})
    p = r.params
    assert p.greedy and p.top_k == 0 and p.stop == ["\n"] and p.seed == 3 and p.logprobs == 2
    assert r.stream and r.include_usage
    assert parse(tok, prompt=[5, 6, 7]).prompt_token_ids == [5, 6, 7]
    assert parse(tok, prompt=["one prompt"]).prompt_text == "one prompt"
    # The four prompt shapes of OpenAI / vLLM.
    r = parse(tok, prompt=["one", "two three"])
    assert [p.token_ids for p in r.prompts] == [tok.encode("one").ids, tok.encode("two three").ids]
    r = parse(tok, prompt=[[5, 6], [7]], echo=True)
    assert [p.token_ids for p in r.prompts] == [[5, 6], [7]] and r.prompts[1].text == tok.decode([7])
    assert len({r.sub_request_id(0), r.sub_request_id(1)}) == 2
    # lm-eval's scoring request: echo the prompt, generate nothing (the engine runs one step).
    r = parse(tok, prompt=[5, 6, 7], max_tokens=0, echo=True, logprobs=1)
    assert r.echo_only and r.params.max_tokens == 1
    assert parse(tok, model=None).model == "m"


@pytest.mark.parametrize("body, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 60}, "max_tokens"),          # prompt + 60 > 64
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"unknown_knob": 1}, "unknown_knob"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", [1, 2]]}, "prompt"),        # strings and id lists mixed
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [[1, True]]}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": [1] * 65}, "prompt"),             # more ids than the context
    ({"prompt": "x" * 100_000}, "prompt"),        # cannot fit, refused before tokenising
    ({"prompt": ["a"] * 300}, "prompt"),          # more prompts than max_prompts
    ({"max_tokens": 0, "echo": False}, "max_tokens"),
    ({"max_tokens": 0, "echo": True, "prompt": [1] * 64}, "prompt"),  # no position left to score
    ({"prompt": [1, 10_000]}, "prompt"),
    ({"model": "opt-175b"}, "model"),
    ({"n": 0}, "n"),
    ({"top_k": -5}, "top_k"),
    ({"logprobs": 50}, "logprobs"),
    ({"min_tokens": 30}, "min_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [99999]}, "stop_token_ids"),
    ({"seed": "x"}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"best_of": 3}, "best_of"),
])
def test_bad_input_names_the_field(tok, body, field):
    with pytest.raises(ApiError) as e:
        parse(tok, **body)
    assert e.value.status == 400 and e.value.param == field and field in e.value.message
    assert e.value.grpc_code == "INVALID_ARGUMENT"
    assert e.value.body()["error"]["param"] == field


def test_non_object_body(tok):
    with pytest.raises(ApiError):
        api.parse_completion([1], model_name="m", tokenizer=tok, max_model_len=CTX, vocab_size=VOCAB)


def test_queue_full_is_429_with_retry_after():
    e = api.queue_full()
    assert e.status == 429 and e.grpc_code == "RESOURCE_EXHAUSTED"
    assert e.headers() == {"Retry-After": "1"}


def _outputs():
    lp = [TokenLogprob(5, -0.5, [(5, -0.5), (6, -1.5)]), TokenLogprob(6, -1.0, [(6, -1.0), (5, -2.0)])]
    first = RequestOutput("r", [CompletionOutput(0, "ab", [5], lp[:1])], False, 3,
                          prompt_logprobs=[None, TokenLogprob(8, -2.0, []), TokenLogprob(9, -3.0, [])])
    last = RequestOutput("r", [CompletionOutput(0, "c", [6], lp[1:], "length")], True, 3)
    return first, last


def test_completion_response_echo_logprobs_usage(tok):
    req = parse(tok, prompt=[7, 8, 9], max_tokens=2, logprobs=1, echo=True)
    acc = api.Accumulator(req)
    for o in _outputs():
        acc.add(o)
    resp = api.completion_response(acc, tok)
    ch = resp["choices"][0]
    assert resp["object"] == "text_completion" and ch["finish_reason"] == "length"
    assert ch["text"] == req.prompt_text + "abc"
    # Echo: prompt tokens first (the first has a null logprob), then the completion's.
    assert ch["logprobs"]["token_logprobs"] == [None, -2.0, -3.0, -0.5, -1.0]
    assert len(ch["logprobs"]["tokens"]) == 5 and len(ch["logprobs"]["top_logprobs"]) == 5
    assert resp["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_stream_chunks_concatenate_to_the_full_text(tok):
    req = parse(tok, max_tokens=2)
    first, last = _outputs()
    chunks = api.stream_chunks(req, first, tok, first=True) + api.stream_chunks(req, last, tok, first=False)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abc"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_grpc_request_goes_through_the_same_validation(tok):
    from opt_ray.v1 import generate_pb2 as pb
    body = api.body_from_grpc(pb.GenerateRequest(prompt="hi there", max_tokens=4, top_p=0.9, seed=2**40,
                                                 stop=["\n"]))
    assert body["top_p"] == 0.9 and body["seed"] == 2**40 and "temperature" not in body
    r = api.parse_completion(body, model_name="m", tokenizer=tok, max_model_len=CTX, vocab_size=VOCAB)
    assert r.params.max_tokens == 4 and r.params.stop == ["\n"]
    with pytest.raises(ApiError, match="temperature"):
        api.parse_completion(api.body_from_grpc(pb.GenerateRequest(prompt="x", temperature=-1)),
                             model_name="m", tokenizer=tok, max_model_len=CTX, vocab_size=VOCAB)
    resp = api.grpc_response(r, [CompletionOutput(0, "ab", [5, 6], [TokenLogprob(5, -0.1, [(5, -0.1)])], "stop")],
                             tok, {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4})
    assert resp.choices[0].text == "ab" and resp.choices[0].finish_reason == "stop"
    assert resp.usage.total_tokens == 4 and resp.choices[0].logprobs[0].top[0].token_id == 5


def test_prompt_char_limit_is_exact_for_byte_level_bpe(tok):
    """A string longer than the bound cannot fit: it encodes to more tokens than the context."""
    bound = api.max_prompt_chars(tok, CTX)
    longest = max(tok.get_vocab(), key=len)
    assert len(tok.encode(longest * CTX + longest[0], add_special_tokens=False).ids) > CTX
    assert bound >= CTX * len(longest)


def _batch_outputs():
    """Engine outputs of a 2-prompt, n=2, echo + logprobs=1 request (prompt ids [7, 8], [9])."""
    def lp(t, v, alt):
        return TokenLogprob(t, v, [(alt, -0.1)])
    outs = {0: [RequestOutput("r-0", [CompletionOutput(0, "a", [5], [lp(5, -0.5, 6)]),
                                      CompletionOutput(1, "b", [6], [lp(6, float("-inf"), 6)], "length")],
                              False, 2, prompt_logprobs=[None, lp(8, -2.0, 8)]),
                RequestOutput("r-0", [CompletionOutput(0, "", [], [], "stop")], True, 2)],
            1: [RequestOutput("r-1", [CompletionOutput(0, "c", [5], [lp(5, -1.5, 6)], "length"),
                                      CompletionOutput(1, "d", [6], [lp(6, -2.5, 6)], "length")],
                              True, 1, prompt_logprobs=[None])]}
    return outs


def test_batch_choices_are_prompt_major_with_vllm_logprobs(tok):
    req = parse(tok, prompt=[[7, 8], [9]], n=2, max_tokens=1, echo=True, logprobs=1)
    accs = [api.Accumulator(req, p) for p in range(2)]
    for p, outs in _batch_outputs().items():
        for o in outs:
            accs[p].add(o)
    resp = api.completion_response(accs, tok)
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2, 3]
    c0, c1, c2, c3 = resp["choices"]
    t = [api.token_str(tok, i) for i in range(10)]
    assert c0["text"] == tok.decode([7, 8]) + "a" and c2["text"] == tok.decode([9]) + "c"
    assert c0["finish_reason"] == "stop" and c1["finish_reason"] == "length"
    lp0 = c0["logprobs"]
    assert lp0["tokens"] == [t[7], t[8], t[5]]
    assert lp0["token_logprobs"] == [None, -2.0, -0.5]
    # The top dict holds the top-k and the token itself; the first prompt token's is null.
    assert lp0["top_logprobs"] == [None, {t[8]: -0.1}, {t[6]: -0.1, t[5]: -0.5}]
    assert lp0["text_offset"] == [0, len(t[7]), len(t[7]) + len(t[8])]
    assert c1["logprobs"]["token_logprobs"][-1] == -9999.0     # -inf is not JSON
    assert c3["logprobs"]["tokens"] == [t[9], t[6]]
    # Usage: each prompt once, every choice's tokens.
    assert resp["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_echo_only_leaves_the_generated_token_out(tok):
    req = parse(tok, prompt=[[7, 8]], max_tokens=0, echo=True, logprobs=0)
    acc = api.Accumulator(req)
    acc.add(RequestOutput("r", [CompletionOutput(0, "zz", [5], [TokenLogprob(5, -0.5, [])], "length")], True, 2,
                          prompt_logprobs=[None, TokenLogprob(8, -2.0, [])]))
    (c,) = api.completion_response(acc, tok)["choices"]
    assert c["text"] == tok.decode([7, 8])
    assert c["logprobs"]["token_logprobs"] == [None, -2.0]
    assert c["logprobs"]["top_logprobs"] == [None, {api.token_str(tok, 8): -2.0}]
    assert api.completion_response(acc, tok)["usage"]["completion_tokens"] == 0
    chunks = api.stream_chunks(req, acc_out := RequestOutput(
        "r", [CompletionOutput(0, "zz", [5], [TokenLogprob(5, -0.5, [])], "length")], True, 2,
        prompt_logprobs=[None, TokenLogprob(8, -2.0, [])]), tok, first=True)
    assert "".join(ch["text"] for ch in chunks[0]["choices"]) == tok.decode([7, 8])
    assert acc_out.finished and chunks[0]["choices"][-1]["finish_reason"] == "length"
