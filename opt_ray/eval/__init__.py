"""Evaluation of a checkpoint: zero-/few-shot tasks through lm-evaluation-harness, and
perplexity on token shards.

- ``loading``: a checkpoint (HF-format dir, training run dir, or one of its checkpoints)
  and the tokenizer that ships with it; one clear error when there is none.
- ``scoring``: the model-side work, torch only: batched log-likelihoods of token
  continuations (fp32 log-softmax of the model's logits) and batched greedy generation
  with a KV cache over left-padded prompts. No lm-eval import, so Ray workers and the
  driver share it.
- ``lm``: ``OptLM``, an lm-eval ``LM`` (``TemplateLM``) over a scorer: tokenization and
  BOS handling as lm-eval's ``hf`` backend does, rolling windows, stop sequences.
- ``workers``: the same scorer on N Ray actors, requests split across them and the
  results gathered in request order.
- ``tasks``: lm-eval's task registry (``TaskManager``) with fix-it errors: unknown task
  names with close matches, malformed rows of local data files, datasets that need a
  download where there is no network.

lm-eval is an optional extra (``pip install 'opt-ray[eval]'``); ``lm`` and ``tasks``
import it, the rest does not.
"""
