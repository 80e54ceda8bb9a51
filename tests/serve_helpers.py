"""A tiny random-weight HF-format OPT checkpoint with its own byte-level BPE tokenizer,
shared by the serving tests and the serving bench. Built with ``transformers`` (test
dependency) so that the reference implementation writes the checkpoint we load."""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Open pretrained transformers are decoder-only language models.",
    "Ray Serve runs replicas of a deployment behind an HTTP proxy.",
    "Continuous batching lets requests join and leave at every step.",
    "Zürich, café, naïve: bytes that span more than one token — ünïcödé ✓.",
]


def build_tokenizer(path: Path, vocab_size: int = 400):
    """Byte-level BPE trained on a few sentences; ids 0..3 = <s> <pad> </s> <unk> as OPT's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return tok


def build_checkpoint(path: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     max_positions: int = 256, init_std: float = 0.2, seed: int = 0) -> Path:
    """Write an HF OPT checkpoint (config.json + model.safetensors) + tokenizer.json."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    tok = build_tokenizer(path)
    vocab = ((tok.get_vocab_size() + 7) // 8) * 8
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, ffn_dim=4 * hidden,
                    max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, init_std=init_std,
                    dropout=0.0)
    torch.manual_seed(seed)
    OPTForCausalLM(cfg).save_pretrained(str(path))
    return path
