"""`opt-ray eval --tp N`: a model split across N Ray actors (tensor parallelism, as the
training gang splits it) scores as the whole model in one process does, while each actor
reads and holds only its part of the weights. On this CPU machine the ranks all-reduce
over gloo; on GPUs over NCCL, one GPU each. Scores agree to float rounding, not bit for
bit: a row-parallel layer sums its halves in another order (~1e-6)."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("lm_eval")

from tests.eval_helpers import (TEXTS, build_hf_checkpoint, mc_rows, write_mc_task,  # noqa: E402
                                write_text_shards)


def _sharded_copy(src, dst):
    """The checkpoint as large models ship: safetensors split in several files + index."""
    from transformers import OPTForCausalLM

    OPTForCausalLM.from_pretrained(str(src)).save_pretrained(str(dst), max_shard_size="40KB")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special")):
            shutil.copy(f, dst / f.name)
    assert len(list(dst.glob("model-*.safetensors"))) > 1
    return dst


@pytest.mark.slow
def test_tensor_parallel_workers_score_as_one_process(ray_local, tmp_path, capsys):
    from lm_eval.api.instance import Instance

    from opt_ray.cli import main
    from opt_ray.config import num_params
    from opt_ray.eval.lm import OptLM

    ckpt = _sharded_copy(build_hf_checkpoint(tmp_path / "ckpt", max_positions=32, heads=4),
                         tmp_path / "sharded")
    local = OptLM.from_checkpoint(ckpt, batch_size=2)
    split = OptLM.from_checkpoint(ckpt, batch_size=2, workers=2, tp=2)
    pool = split.engine
    try:
        assert len(pool.groups) == 1 and len(pool.actors) == 2
        # Each rank holds its half of every split tensor, plus the replicated ones.
        total = num_params(local.engine.model.config)
        assert pool.num_params == total == sum(p.numel() for p in local.engine.model.parameters())
        assert 0.5 * total < pool.params_per_actor < 0.6 * total, (pool.params_per_actor, total)

        def ll(req):
            return Instance(request_type="loglikelihood", doc={}, idx=0, arguments=req)

        pairs = [(" ".join(TEXTS[i:i + 2]), " " + TEXTS[(i + 3) % len(TEXTS)]) for i in range(6)]
        a = local.loglikelihood([ll(p) for p in pairs], disable_tqdm=True)
        b = split.loglikelihood([ll(p) for p in pairs], disable_tqdm=True)
        assert [x[0] for x in b] == pytest.approx([x[0] for x in a], abs=1e-4, rel=0)
        assert [x[1] for x in b] == [x[1] for x in a]
        rolling = [Instance(request_type="loglikelihood_rolling", doc={}, idx=0,
                            arguments=(" ".join(TEXTS[i:] + TEXTS[:i]),)) for i in range(2)]
        assert split.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
            local.loglikelihood_rolling(rolling, disable_tqdm=True), abs=1e-4, rel=0)
        gen = [Instance(request_type="generate_until", doc={}, idx=0,
                        arguments=(p, {"until": ["."], "max_gen_toks": 6}))
               for p in ("The quick brown", "Paris is", "Ray runs actors")]
        assert split.generate_until(gen, disable_tqdm=True) == local.generate_until(gen, disable_tqdm=True)
    finally:
        pool.close()

    # The CLI, as users run it: the same accuracy as one process; the placement groups
    # are gone afterwards.
    write_mc_task(tmp_path / "tasks", "mc_tp", mc_rows(6))
    outs = {}
    for name, extra in (("one", []), ("tp", ["--workers", "2", "--tp", "2"])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(ckpt), "--tasks", "mc_tp", "--include-path", str(tmp_path / "tasks"),
                     "--batch-size", "2", "--output", str(out), *extra]) == 0
        outs[name] = json.loads(out.read_text())
    acc = {k: v["results"]["mc_tp"]["acc,none"] for k, v in outs.items()}
    assert acc["tp"] == acc["one"], acc
    import ray
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())

    # Perplexity on token shards (--data) by one copy split two ways: the loss training's
    # vocabulary-parallel loss computes equals the whole model's.
    from opt_ray.data.tokenizer import load_tokenizer
    shards = write_text_shards(load_tokenizer(ckpt), tmp_path / "shards")
    ppl = []
    for extra in ([], ["--tp", "2"]):
        capsys.readouterr()
        assert main(["eval", str(ckpt), "--data", str(shards), "--max-rows", "6", *extra]) == 0
        ppl.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert ppl[1]["rows"] == ppl[0]["rows"] == 6
    assert ppl[1]["loss"] == pytest.approx(ppl[0]["loss"], abs=1e-5), ppl
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())

    # A degree that does not divide the model's 4 heads: one line, exit 2.
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--tasks", "mc_tp", "--include-path", str(tmp_path / "tasks"),
                 "--workers", "3", "--tp", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    own = [ln for ln in err if "pid=" not in ln]
    assert len(own) == 1 and "tensor-parallel size 3 must divide model.num_attention_heads (4)" in own[0], err
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_tp_flags_are_checked_before_anything_starts(capsys):
    from opt_ray.cli import main

    for flags, said in ((["--tasks", "x", "--workers", "3", "--tp", "2"],
                         "--workers 3 is not a multiple of --tp 2"),
                        (["--tasks", "x", "--tp", "0"], "--tp must be >= 1"),
                        (["--data", "/nonexistent", "--tp", "2", "--workers", "2"],
                         "--workers 2 applies to --tasks"),
                        (["--data", "/nonexistent", "--tp", "0"], "--tp must be >= 1")):
        assert main(["eval", "/nonexistent", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
