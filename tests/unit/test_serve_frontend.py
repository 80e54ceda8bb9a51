"""The Ray-free front end (``opt_ray.serve.frontend`` + ``http`` + ``grpc_service``) over an
in-process engine on a tiny random-weight checkpoint written by transformers, served by
uvicorn and grpc.aio on 127.0.0.1 free ports: the official ``openai`` client against
transformers, batches of prompts, streaming, echo logprobs against transformers'
log-softmax, bad input, size limits (a 30 MB prompt refused at once while a small request
completes), back-pressure, cancellation over HTTP and gRPC."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import threading
import time

import pytest
import torch

from tests.serve_helpers import LocalServer, build_checkpoint

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["The", "The quick brown fox", "Ray Serve runs replicas of a deployment behind",
           "Continuous batching lets requests join and leave at every step. Open pretrained"]
MAX_NUM_SEQS, MAX_WAITING = 4, 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from opt_ray.serve.engine import EngineConfig
    ckpt = build_checkpoint(tmp_path_factory.mktemp("opt-fe"))
    with LocalServer(ckpt, grpc=True,
                     engine_config=EngineConfig(max_num_seqs=MAX_NUM_SEQS, max_waiting=MAX_WAITING)) as srv:
        srv.ckpt = ckpt
        yield srv


@pytest.fixture(scope="module")
def hf(server):
    from tokenizers import Tokenizer
    from transformers import OPTForCausalLM
    return (Tokenizer.from_file(str(server.ckpt / "tokenizer.json")),
            OPTForCausalLM.from_pretrained(str(server.ckpt)).eval())


def _client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)


def _post(server, body, **kw):
    import httpx
    return httpx.post(server.base + "/v1/completions", json={"model": "opt-tiny", **body}, timeout=60, **kw)


def _hf_greedy(hf, prompt: str, max_new: int) -> str:
    tok, model = hf
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new, pad_token_id=1)
    return tok.decode([t for t in out[0, len(ids):].tolist() if t != 2])


def test_greedy_batch_via_openai_client_matches_transformers(server, hf):
    client = _client(server)
    # One request with a list of prompts, n=2: choices prompt-major, each equal to HF.
    resp = client.completions.create(model="opt-tiny", prompt=PROMPTS, max_tokens=10, temperature=0, n=2)
    want = [_hf_greedy(hf, p, 10) for p in PROMPTS]
    assert [c.index for c in resp.choices] == list(range(2 * len(PROMPTS)))
    assert [c.text for c in resp.choices] == [w for w in want for _ in range(2)]
    assert resp.usage.prompt_tokens == sum(len(hf[0].encode(p).ids) for p in PROMPTS)
    # Token-id lists are the same prompts.
    ids = [hf[0].encode(p).ids for p in PROMPTS]
    by_ids = client.completions.create(model="opt-tiny", prompt=ids, max_tokens=10, temperature=0)
    assert [c.text for c in by_ids.choices] == want
    assert client.models.list().data[0].id == "opt-tiny"


def test_streaming_equals_non_streaming(server):
    client = _client(server)
    for kw in ({"temperature": 0}, {"temperature": 1.0, "top_p": 0.9, "seed": 42}):
        full = client.completions.create(model="opt-tiny", prompt=PROMPTS[1:3], max_tokens=16, n=2, **kw)
        texts = {}
        for chunk in client.completions.create(model="opt-tiny", prompt=PROMPTS[1:3], max_tokens=16, n=2,
                                               stream=True, stream_options={"include_usage": True}, **kw):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
            if chunk.usage:
                assert chunk.usage.completion_tokens == full.usage.completion_tokens
        assert [texts[i] for i in range(4)] == [c.text for c in full.choices]


def test_echo_logprobs_are_transformers_log_softmax(server, hf):
    tok, model = hf
    ids = [[2] + tok.encode(p).ids for p in PROMPTS[1:3]]
    r = _post(server, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    for prompt, choice in zip(ids, body["choices"]):
        lp = choice["logprobs"]
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        want = [float(ref[i - 1, t]) for i, t in enumerate(prompt) if i > 0]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["token_logprobs"]) == len(prompt)          # the prompt only: max_tokens 0
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], want)) < 1e-4
        top2 = torch.topk(ref[0], 2).values.tolist()
        assert sorted(lp["top_logprobs"][1].values(), reverse=True)[:2] == pytest.approx(top2, abs=1e-4)
        assert choice["text"] == tok.decode(prompt)
    assert body["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("body, field", [
    ({"temperature": -0.5}, "temperature"),
    ({"max_tokens": 250}, "max_tokens"),           # prompt + 250 > the 256-token context
    ({"prompt": ""}, "prompt"),
    ({"prompt": [[1, 2], "x"]}, "prompt"),
    ({"prompt": "x" * 200_000}, "prompt"),          # cannot fit: refused before tokenising
    ({"model": "gpt-4"}, "model"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_bad_input_is_400_naming_the_field(server, body, field):
    r = _post(server, {"prompt": PROMPTS[3], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]


def test_invalid_json_is_400(server):
    import httpx
    r = httpx.post(server.base + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def _raw_post_refusal_s(server, size: int, send: int) -> tuple[float, bytes]:
    """Declare a ``size``-byte body, send only its first ``send`` bytes, and time the reply."""
    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        t0 = time.monotonic()
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {size}\r\n\r\n".encode() + b'{"prompt": "' + b"x" * (send - 12))
        reply = s.recv(4096)
        return time.monotonic() - t0, reply


def test_30mb_prompt_is_refused_at_once_while_a_small_request_completes(server):
    small: dict = {}

    def run_small():
        t0 = time.monotonic()
        r = _post(server, {"prompt": PROMPTS[1], "max_tokens": 48, "temperature": 0, "ignore_eos": True})
        small.update(status=r.status_code, tokens=r.json()["usage"]["completion_tokens"],
                     s=time.monotonic() - t0)

    th = threading.Thread(target=run_small)
    th.start()
    # Declared too large: 413 before the body is read (1 MB of 30 sent).
    refusal_s, reply = _raw_post_refusal_s(server, 30_000_000, 1_000_000)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert refusal_s < 1.0, refusal_s
    # The whole 30 MB through a client that sends it all first.
    t0 = time.monotonic()
    r = _post(server, {"prompt": "x" * 30_000_000, "max_tokens": 4})
    full_s = time.monotonic() - t0
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    th.join(60)
    assert small["status"] == 200 and small["tokens"] == 48, small
    print(f"\n30 MB prompt: 413 after {refusal_s:.3f}s (headers + 1 MB), {full_s:.3f}s (whole body); "
          f"concurrent small request 200 in {small['s']:.2f}s")


def test_body_limit_applies_to_chunked_bodies_and_prompt_limit_to_allowed_ones(server):
    import httpx
    body = json.dumps({"model": "opt-tiny", "prompt": "x" * 9_000_000}).encode()

    def chunks():
        for i in range(0, len(body), 1 << 20):
            yield body[i:i + (1 << 20)]
    r = httpx.post(server.base + "/v1/completions", content=chunks(), timeout=60)   # no Content-Length
    assert r.status_code == 413
    # Under a raised body limit the same prompt is refused by its length, never tokenised.
    old = server.frontend.config.max_body_bytes
    server.frontend.config.max_body_bytes = 16 << 20
    try:
        r = httpx.post(server.base + "/v1/completions", content=body, timeout=60)
    finally:
        server.frontend.config.max_body_bytes = old
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "characters" in r.json()["error"]["message"]


def _stats(server) -> dict:
    import httpx
    return httpx.get(server.base + "/v1/stats", timeout=10).json()


def _wait_all_free(server, aborted_before: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = _stats(server)
        if s["aborted_requests"] > aborted_before and s["running_requests"] == 0 and \
                s["waiting_requests"] == 0 and s["free_slots"] == s["num_slots"]:
            return
        time.sleep(0.1)
    pytest.fail(f"request not aborted / slots not freed: {s}")


def test_cancel_mid_stream_aborts_every_prompt(server):
    import httpx
    before = _stats(server)["aborted_requests"]
    body = {"model": "opt-tiny", "prompt": PROMPTS[:2], "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert any(ln.startswith("data: ") for ln in (next(lines) for _ in range(6)))
    _wait_all_free(server, before + 1)


def test_full_queue_is_429_and_frees_what_was_admitted(server):
    before = _stats(server)
    r = _post(server, {"prompt": ["The"] * 16, "max_tokens": 64, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    s = _stats(server)
    deadline = time.monotonic() + 20
    while (s["running_requests"] or s["waiting_requests"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        s = _stats(server)
    assert s["free_slots"] == s["num_slots"] and s["output_tokens"] - before["output_tokens"] < 16 * 64


def test_grpc_unary_stream_invalid_argument_and_cancel(server):
    import grpc

    from opt_ray.v1 import generate_pb2 as pb
    from opt_ray.v1 import generate_pb2_grpc
    ref = _client(server).completions.create(model="opt-tiny", prompt=PROMPTS[2], max_tokens=10, temperature=0)
    with grpc.insecure_channel(server.grpc_address) as ch:
        stub = generate_pb2_grpc.GenerationServiceStub(ch)
        req = pb.GenerateRequest(prompt=PROMPTS[2], max_tokens=10, temperature=0)
        unary = stub.Generate(req, timeout=30)
        assert unary.choices[0].text == ref.choices[0].text
        assert unary.usage.completion_tokens == len(unary.choices[0].token_ids)
        assert "".join(c.text for m in stub.GenerateStream(req, timeout=30) for c in m.choices) == ref.choices[0].text
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(prompt="x", temperature=-1), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.details()
        scored = stub.Generate(pb.GenerateRequest(prompt_token_ids=[2, 5, 6], max_tokens=0, echo=True), timeout=30)
        assert scored.choices[0].text == ref_tok_decode(server, [2, 5, 6]) and not scored.choices[0].token_ids
        assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == 3
        before = _stats(server)["aborted_requests"]
        call = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[2], max_tokens=200, temperature=0,
                                                      ignore_eos=True), timeout=60)
        next(call), next(call)
        call.cancel()
    _wait_all_free(server, before)


def ref_tok_decode(server, ids):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(server.ckpt / "tokenizer.json")).decode(ids)


def test_concurrent_requests_share_the_engine(server, hf):
    client = _client(server)
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: client.completions.create(
            model="opt-tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text, PROMPTS))
    assert got == [_hf_greedy(hf, p, 8) for p in PROMPTS]
