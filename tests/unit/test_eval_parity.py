"""`opt-ray eval`'s lm-eval adapter against lm-eval's own `hf` backend (HFLM over
transformers) on the same random-weight checkpoint written by transformers, fp32:
every per-choice log-likelihood of a multiple-choice task and every document's rolling
log-likelihood (several windows per document) within 1e-4, with the tokenizer's BOS and
without; and greedy generate_until gives the same text."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from tests.eval_helpers import (TEXTS, build_hf_checkpoint, mc_rows, write_mc_task,  # noqa: E402
                                write_rolling_task)

MAX_POS = 32   # small context, so rolling documents span several windows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    ckpt = build_hf_checkpoint(root / "ckpt", max_positions=MAX_POS)
    write_mc_task(root / "tasks", "mc_parity", mc_rows(10), fewshot_rows=mc_rows(4, seed=9))
    docs = [" ".join(TEXTS[i:] + TEXTS[:i]) for i in range(3)]
    write_rolling_task(root / "tasks", "rolling_parity", docs)
    return {"ckpt": ckpt, "tasks": root / "tasks", "docs": docs}


def _hf_results(setup, add_bos_token, num_fewshot):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    kw = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    hf = HFLM(pretrained=str(setup["ckpt"]), device="cpu", dtype="float32", batch_size=4, **kw)
    tm = TaskManager(include_path=str(setup["tasks"]), include_defaults=False)
    return simple_evaluate(model=hf, tasks=["mc_parity", "rolling_parity"], task_manager=tm,
                           num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0), hf


def _scores(results, task):
    """Per document, every response's log-likelihood (per choice for MC)."""
    out = []
    for s in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        out.append([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in s["resps"]])
    return out


@pytest.mark.parametrize("add_bos_token", [None, False], ids=["tokenizer-bos", "no-bos"])
def test_loglikelihoods_equal_lm_eval_hf_backend(setup, add_bos_token):
    from opt_ray.commands.eval import evaluate_tasks

    num_fewshot = 2 if add_bos_token is None else 0
    ref, hf = _hf_results(setup, add_bos_token, num_fewshot)
    ours = evaluate_tasks(setup["ckpt"], tasks=["mc_parity", "rolling_parity"],
                          include_path=str(setup["tasks"]), num_fewshot=num_fewshot, batch_size=3,
                          bos={None: "auto", False: "false"}[add_bos_token], log_samples=True)
    # The rolling documents really are longer than one window.
    assert all(len(hf.tok_encode(d)) > 2 * MAX_POS for d in setup["docs"])
    for task, per_doc in (("mc_parity", 4), ("rolling_parity", 1)):
        a, b = _scores(ref, task), _scores(ours, task)
        assert len(a) == len(b) > 0 and all(len(x) == per_doc for x in a)
        for x, y in zip(a, b):
            assert y == pytest.approx(x, abs=1e-4, rel=0)
    assert ours["results"]["mc_parity"]["acc,none"] == ref["results"]["mc_parity"]["acc,none"]
    # The prompts lm-eval built for both backends are the same (few-shot included).
    assert ([s["arguments"] for s in ref["samples"]["mc_parity"]]
            == [s["arguments"] for s in ours["samples"]["mc_parity"]])


def test_bos_choice_changes_the_scores(setup):
    """The two parity cases above are different computations (BOS really is added)."""
    from opt_ray.eval.lm import OptLM

    with_bos = OptLM.from_checkpoint(setup["ckpt"])
    without = OptLM.from_checkpoint(setup["ckpt"], add_bos_token=False)
    assert with_bos.tok_encode("hello")[0] == 2 and without.tok_encode("hello")[0] != 2
    assert with_bos.tok_encode("</s>hello") == with_bos.tok_encode("hello")  # no second bos


def test_generate_until_equals_hf_backend(setup):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from opt_ray.eval.lm import OptLM

    prompts = ["The quick brown", "Paris is the capital of", "Ray runs actors and",
               "Water boils at one hundred degrees and freezes"]
    reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(p, {"until": ["."], "max_gen_toks": 12, "do_sample": False}))
            for p in prompts]
    hf = HFLM(pretrained=str(setup["ckpt"]), device="cpu", dtype="float32", batch_size=4)
    ours = OptLM.from_checkpoint(setup["ckpt"], batch_size=3)
    expected = hf.generate_until(reqs, disable_tqdm=True)
    got = ours.generate_until(reqs, disable_tqdm=True)
    assert got == expected
    assert any(len(t) > 0 for t in got)
