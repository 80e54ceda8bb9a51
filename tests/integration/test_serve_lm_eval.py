"""lm-evaluation-harness's own ``local-completions`` backend against the Ray-free HTTP
front end gives the same per-choice and rolling log-likelihoods as lm-eval's ``hf``
backend on the same random-weight checkpoint written by transformers (fp32, 1e-4), and
the same greedy generations, with and without BOS, at batch sizes 1 and 4 (a batch is one
request with a list of token-id lists). Local tasks only (``dataset_path: json``,
offline)."""

from __future__ import annotations

import json

import pytest

from tests.serve_helpers import LocalServer, build_checkpoint

pytest.importorskip("lm_eval")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# The hf backend rolls windows of max_length tokens, local-completions of max_length - 2
# (one position kept for the generated token, one for the context): these give both the
# same windows, and the rolling texts below need several of them.
HF_MAX_LENGTH = 40
API_MAX_LENGTH = HF_MAX_LENGTH + 2

MC_DOCS = [
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog.", " moon", " café naïve"], "label": 0},
    {"question": "Ray Serve runs replicas of a", "choices": [" deployment", " fox", " Zürich ✓"], "label": 0},
    {"question": "Continuous batching lets requests", "choices": [" join and leave", " sleep", " ünïcödé"], "label": 0},
    {"question": "Open pretrained transformers are", "choices": [" decoder-only", " brown", " language models."], "label": 2},
    {"question": "Zürich, café,", "choices": [" naïve", " bytes", " every step"], "label": 0},
]
GEN_DOCS = [{"question": "The quick brown", "answer": " fox"},
            {"question": "Zürich, café, naïve: bytes that span", "answer": " more"}]
ROLL_DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 4},
    {"text": "Continuous batching lets requests join and leave at every step. Open pretrained "
             "transformers are decoder-only language models. Zürich, café, naïve — ünïcödé ✓."},
    {"text": "Ray Serve runs replicas."},
]


def _write_tasks(d) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in MC_DOCS))
    (d / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in GEN_DOCS))
    (d / "roll.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ROLL_DOCS))
    (d / "optray_mc.yaml").write_text(f"""task: optray_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (d / "optray_gen.yaml").write_text(f"""task: optray_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", ".", ",", ":", ";"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    (d / "optray_roll.yaml").write_text(f"""task: optray_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'roll.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
""")


def _per_request(results) -> dict[str, list]:
    """task -> the result of every request (every choice of every doc), in order: a
    log-likelihood, or the generated text."""
    out = {}
    for task, samples in results["samples"].items():
        got = []
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            for r in s["resps"]:
                x = r[0]
                got.append(x if isinstance(x, str) else float(x[0] if isinstance(x, (list, tuple)) else x))
        out[task] = got
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        root = tmp_path_factory.mktemp("lm-eval")
        ckpt = build_checkpoint(root / "ckpt", opt_bos=True)
        _write_tasks(root / "tasks")
        from lm_eval.tasks import TaskManager
        yield ckpt, TaskManager(include_path=str(root / "tasks"), include_defaults=False)


def _evaluate(model: str, model_args: dict, tm, batch_size: int):
    import lm_eval
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["optray_mc", "optray_roll", "optray_gen"],
                                   task_manager=tm, batch_size=batch_size, log_samples=True,
                                   device="cpu", bootstrap_iters=0)


def test_local_completions_equals_hf_backend(setup):
    ckpt, tm = setup
    ref = {}
    for bos in (True, False):
        res = _evaluate("hf", {"pretrained": str(ckpt), "dtype": "float32", "add_bos_token": bos,
                               "max_length": HF_MAX_LENGTH}, tm, 4)
        ref[bos] = _per_request(res)
    # The reference must see the difference BOS makes, or the comparison proves little.
    assert max(abs(a - b) for a, b in zip(ref[True]["optray_mc"], ref[False]["optray_mc"])) > 1e-3
    assert len(ref[True]["optray_mc"]) == 15 and len(ref[True]["optray_roll"]) == 3

    with LocalServer(ckpt) as srv:
        for bos in (True, False):
            for batch_size in (1, 4):
                res = _evaluate("local-completions", {
                    "model": "opt-tiny", "base_url": srv.base + "/v1/completions",
                    "tokenizer_backend": "huggingface", "tokenizer": str(ckpt), "tokenized_requests": True,
                    "add_bos_token": bos, "max_length": API_MAX_LENGTH, "max_retries": 1,
                }, tm, batch_size)
                got = _per_request(res)
                for task in ("optray_mc", "optray_roll"):
                    assert len(got[task]) == len(ref[bos][task])
                    diff = max(abs(a - b) for a, b in zip(got[task], ref[bos][task]))
                    assert diff < 1e-4, (task, bos, batch_size, got[task], ref[bos][task])
                # Greedy generation with the task's stop strings: the same text.
                assert got["optray_gen"] == ref[bos]["optray_gen"], (bos, batch_size)
