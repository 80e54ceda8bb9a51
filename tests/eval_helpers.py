"""Checkpoints and lm-eval tasks for the evaluation tests and bench/eval.py, all built
locally: a random-weight HF OPT checkpoint written by ``transformers`` with an OPT-style
tokenizer (bos ``</s>`` prepended, as the released OPT tokenizers do), and YAML tasks in
lm-eval's own format over JSON-lines files (``dataset_path: json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Open pretrained transformers are decoder-only language models.",
    "Ray runs actors and tasks on a cluster of machines.",
    "A cat sat on the mat while the dog slept by the door.",
    "Water boils at one hundred degrees and freezes at zero.",
]


def train_opt_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    """A byte-level BPE with OPT's special tokens (ids 0..3) and bos-prepending encoder."""
    from opt_ray.data.tokenizer import train_tokenizer
    return train_tokenizer(list(texts), vocab_size, min_frequency=1)


def save_hf_tokenizer(tok, path: Path) -> None:
    """tokenizer.json + tokenizer_config.json as transformers writes them (what lm-eval's
    ``hf`` backend loads with AutoTokenizer)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>")
    hf.save_pretrained(str(path))


def build_hf_checkpoint(path: Path, *, texts: Sequence[str] = TEXTS, vocab_size: int = 400,
                        model_vocab: int | None = None, hidden: int = 32, layers: int = 2,
                        heads: int = 4, ffn: int | None = None, max_positions: int = 64,
                        init_std: float = 0.1, seed: int = 0) -> Path:
    """Random-weight OPT written by transformers' ``OPTForCausalLM.save_pretrained`` plus
    its tokenizer; returns ``path``."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = train_opt_tokenizer(texts, vocab_size)
    save_hf_tokenizer(tok, path)
    n = tok.get_vocab_size(with_added_tokens=True)
    vocab = model_vocab or ((n + 7) // 8) * 8
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, ffn_dim=ffn or 4 * hidden,
                    max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, init_std=init_std,
                    dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    OPTForCausalLM(cfg).save_pretrained(str(path))
    return path


def write_rows(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_mc_task(task_dir: Path, name: str, rows: Sequence[dict], *, fewshot_rows: Sequence[dict] = ()) -> Path:
    """A multiple-choice task: rows ``{"question", "choices": [...], "label": int}``;
    ``fewshot_rows`` (optional) become its train split for few-shot examples."""
    data = write_rows(task_dir / f"{name}.jsonl", rows)
    files = {"test": str(data)}
    if fewshot_rows:
        files["train"] = str(write_rows(task_dir / f"{name}_train.jsonl", fewshot_rows))
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:"]
    lines += [f"    {split}: {f}" for split, f in files.items()]
    if fewshot_rows:
        lines += ["training_split: train", "fewshot_split: train"]
    lines += ["test_split: test", "output_type: multiple_choice",
              'doc_to_text: "{{question}}"', "doc_to_choice: choices", "doc_to_target: label",
              "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
              "  - metric: acc_norm", "    aggregation: mean", "    higher_is_better: true",
              "metadata:", "  version: 1.0"]
    yaml = task_dir / f"{name}.yaml"
    yaml.write_text("\n".join(lines) + "\n")
    return yaml


def write_rolling_task(task_dir: Path, name: str, texts: Sequence[str]) -> Path:
    """A wikitext-like perplexity task (``loglikelihood_rolling``) over ``{"text"}`` rows."""
    data = write_rows(task_dir / f"{name}.jsonl", [{"text": t} for t in texts])
    yaml = task_dir / f"{name}.yaml"
    yaml.write_text("\n".join([
        f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {data}", "test_split: test", "output_type: loglikelihood_rolling",
        'doc_to_text: ""', 'doc_to_target: "{{text}}"',
        "metric_list:", "  - metric: word_perplexity", "  - metric: byte_perplexity",
        "  - metric: bits_per_byte", "metadata:", "  version: 1.0"]) + "\n")
    return yaml


def mc_rows(n: int, seed: int = 0) -> list[dict]:
    """Questions over TEXTS: which continuation completes the sentence (4 choices)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choice(TEXTS).split()
        k = rng.randint(2, len(words) - 2)
        right = " ".join(words[k:k + 2])
        wrong = [" ".join(rng.choice(TEXTS).split()[1:3]) for _ in range(3)]
        choices = wrong[:]
        label = rng.randrange(4)
        choices.insert(label, right)
        rows.append({"question": " ".join(words[:k]), "choices": choices, "label": label})
    return rows


def write_text_shards(tok, out: Path) -> Path:
    """Token shards (train and valid splits) of rotations of ``TEXTS`` made with ``tok``."""
    from opt_ray.data.shards import write_shards
    texts = [" ".join(TEXTS[i:] + TEXTS[:i]) for i in range(len(TEXTS))] * 4
    return write_shards(({"text": t} for t in texts), tok, out, seq_len=16, valid_fraction=0.3)
