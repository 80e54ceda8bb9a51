"""OPT as a decoder-only transformer, in one readable file.

Names match the HF-format checkpoints (``model.decoder.layers.N.self_attn.q_proj`` ...),
so import/export is a prefix change. The model knows nothing of parallelism: FSDP2 and
tensor parallelism are applied from outside (``opt_ray.model.parallel``). The attention
infers its local head count from the q projection's output width, so it runs unchanged
when that projection is a column-parallel shard.

OPT quirks, all explicit below:
- learned positions with an offset of 2, computed from the attention mask so that left
  padding does not shift them;
- pre-LN everywhere except the released 350m, which is post-LN;
- the 350m's 512-wide token embedding with project_in / project_out around the stack;
- the LM head is tied to the token embedding and has no bias.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from opt_ray.config import ModelConfig

# OPT's position table has two extra rows: ids 0 and 1 were reserved by fairseq
# (padding_idx + 1), so position p is looked up at row p + 2.
POSITION_OFFSET = 2


class Cache(Protocol):
    """What the attention needs from a KV cache: append this step's k/v for a layer and
    get back everything to attend to. The serving engine supplies its own (slots, blocks)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class KVCache:
    """The simplest cache: per layer, keys and values concatenated along time.
    k, v: (B, nh, S, hs)."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d = cfg.hidden_size
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(d, d, bias=cfg.enable_bias)
        self.k_proj = nn.Linear(d, d, bias=cfg.enable_bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.enable_bias)
        self.out_proj = nn.Linear(d, d, bias=cfg.enable_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        # -1 heads: under tensor parallelism this rank holds only its shard of the heads.
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)        # (B, nh, S, hs), S >= T
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            # A mask-free call is a plain causal one: the fast (flash) path on GPU.
            is_causal=mask is None and T > 1,
            dropout_p=self.attention_dropout if self.training else 0.0,
            # OPT scales q (bias included) before QK^T; (s*q).k = s*(q.k), so SDPA's own
            # scale does it without a separate multiply over q.
            scale=self.scaling,
        )                                                    # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)              # (B, T, nh*hs)
        return self.out_proj(y)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, each (B, T, nh*hs). Plain linears are run as one GEMM over the
        concatenated weights (one pass over x, one bigger matmul forward and backward);
        the parameters and checkpoint names stay q/k/v_proj. Tensor-parallel projections
        (fairscale's, which wrap their own communication) are called one by one."""
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        # Without autograd (serving) the concatenation would copy all three weights on
        # every call, which at decode batch sizes costs as much as the matmul itself.
        if not (type(q) is type(k) is type(v) is nn.Linear) or not torch.is_grad_enabled():
            return q(x), k(x), v(x)
        w = torch.cat([q.weight, k.weight, v.weight])
        b = torch.cat([q.bias, k.bias, v.bias]) if q.bias is not None else None
        return F.linear(x, w, b).split([q.out_features, k.out_features, v.out_features], dim=-1)


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d = cfg.hidden_size
        self.pre_ln = cfg.do_layer_norm_before
        self.dropout = cfg.dropout
        self.act = F.relu if cfg.activation_function == "relu" else F.gelu
        affine = cfg.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(cfg, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, d, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        # Attention sub-block. Pre-LN normalises the branch input; post-LN (350m) the sum.
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h = self.self_attn(h, mask, cache)
        x = x + F.dropout(h, self.dropout, self.training)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        # Feed-forward sub-block.
        h = self.final_layer_norm(x) if self.pre_ln else x
        h = self.fc2(self.act(self.fc1(h)))
        x = x + F.dropout(h, self.dropout, self.training)
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x


def _on_meta() -> bool:
    """Inside ``with torch.device("meta")``: a shape-only build, initialised when it is
    materialised (``parallel.init_weights``). Random init there is skipped: ``normal_`` on
    meta runs through ``torch._refs``, whose first call imports dynamo (3 s of CPU per rank
    at every gang start on a small machine) to draw numbers that are never kept."""
    return torch.get_default_device().type == "meta"


def _embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    if _on_meta():  # a given weight: no N(0, 1) draw in the constructor
        return nn.Embedding(num, dim, padding_idx=padding_idx, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim, padding_idx=padding_idx)


class OPTDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, e = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed_tokens = _embedding(cfg.vocab_size, e, padding_idx=cfg.pad_token_id)
        self.embed_positions = _embedding(cfg.max_position_embeddings + POSITION_OFFSET, d)
        # The 350m embeds in 512 dims and projects in and out of the 1024-wide stack.
        self.project_in = nn.Linear(e, d, bias=False) if e != d else None
        self.project_out = nn.Linear(d, e, bias=False) if e != d else None
        # Post-LN stacks end normalised already; pre-LN stacks need a final norm.
        self.final_layer_norm = (nn.LayerNorm(d, elementwise_affine=cfg.layer_norm_elementwise_affine)
                                 if cfg.do_layer_norm_before else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class OPT(nn.Module):
    """OPT causal LM. ``model(input_ids)`` returns logits (B, T, vocab).

    Optional arguments:
      attention_mask: (B, S) with 1 for real tokens and 0 for padding, over every key the
        step attends to (past + current when a cache is used). Left padding is supported.
      position_ids: (B, T) explicit positions (before the offset of 2); by default they
        come from the attention mask, or count on from the cache length.
      cache: a ``Cache`` (``KVCache()`` for plain incremental decoding).
      attn_mask: (B, 1, T, S) boolean, True = may attend, used as is instead of the mask
        built from ``attention_mask``. For callers whose keys are not left-padded, e.g. the
        serving engine's per-slot caches where row r holds keys 0..len_r-1 of a shared
        buffer and the rest is stale.
      targets: (B, T) next-token ids (-100 = ignore). When given, the model returns the
        mean cross-entropy over the non-ignored targets (fp32 scalar) instead of logits,
        computed chunk by chunk so the (B*T, vocab) logits are never held at once.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # HF layout: model.decoder.*, lm_head
        self.model.decoder = OPTDecoder(cfg)
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.model.decoder.embed_tokens.weight  # tied
        # Set by training (a recompute-for-memory trade); off for inference.
        self.activation_checkpointing = False
        if not _on_meta():
            self.reset_parameters()

    @property
    def decoder(self) -> OPTDecoder:
        return self.model.decoder

    def reset_parameters(self) -> None:
        """The paper's init: N(0, 0.006) everywhere, each block's output projections
        (attention out_proj and fc2) scaled down by 1/sqrt(2L), biases 0, LayerNorm 1/0."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                is_out = name.endswith("self_attn.out_proj") or name.endswith(".fc2")
                nn.init.normal_(m.weight, mean=0.0, std=out_std if is_out else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        attn_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache, attn_mask)
        if targets is None:
            return self.lm_head(h)
        if type(self.lm_head) is not nn.Linear:
            # A tensor-parallel head: the same fused loss over this rank's vocabulary shard,
            # the softmax's max, sum and target logit all-reduced across the TP group.
            return vocab_parallel_lm_head_loss(h.reshape(-1, h.shape[-1]), self.lm_head.weight,
                                               targets.reshape(-1))
        return lm_head_loss(h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder's output before the LM head: (B, T, word_embed_proj_dim)."""
        dec = self.decoder
        B, T = input_ids.shape
        past = getattr(cache, "length", 0) if cache is not None else 0
        if position_ids is None:
            position_ids = _positions(attention_mask, B, T, past, input_ids.device)
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + dec.embed_positions(position_ids + POSITION_OFFSET)  # no dropout on embeddings
        mask = attn_mask
        if mask is None and attention_mask is not None:
            mask = _attention_bias(attention_mask, T)
        if mask is None and past > 0 and T > 1:
            # Chunked prefill on top of a cache: causal within the chunk, all of the past.
            mask = _attention_bias(torch.ones(B, past + T, device=x.device), T)
        for layer in dec.layers:
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask, cache)
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        return x


# Target id that contributes no loss (padding), as in torch's cross_entropy and HF labels.
IGNORE_INDEX = -100
# Logit rows are turned into probabilities this many elements at a time, by device: no
# (tokens, vocab) tensor is ever whole except, in a half dtype, the logits' gradient where
# that is the smaller choice (``_whole_logit_grad``). The loss's scratch comes on top of
# every saved activation, at the end of the forward.
# - CPU: 2^24 (fp32 scratch of 64 MiB per tensor; 333 rows at OPT's 50272-entry
#   vocabulary). On the 125m 4 x 512 fp32 step (bench/train_step.py) 2^25 left the step's
#   peak at 3091 MiB, 2^24 at 3029 MiB. In fp32 without TP the softmax is made in place in
#   the logits' buffer, so a chunk there has twice the rows in the same bytes
#   (``_loss_chunk_rows``): the head's matmuls run at 293 rows ~20% below their rate at 512+.
# - CUDA: 2^26 (512 MiB of fp32 scratch). Each chunk adds its part of the head's gradient
#   (V x e) into the fp32 sum, so the chunk count multiplies that traffic: at 2^24 the
#   125m 8 x 2048 bf16 step had 50 chunks and ran 0.86x transformers on an H200.
_LOSS_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}


def _loss_chunk_rows(vocab: int, in_place: bool, device_type: str = "cpu") -> int:
    """Logit rows per chunk of the fused loss over a ``vocab``-wide (TP-local) head on
    ``device_type`` (others, e.g. ``meta``, as the CPU): one chunk's scratch is
    ``_LOSS_CHUNK_ELEMENTS`` x 8 bytes in fp32 either way (logits and softmax, or twice the
    rows with the softmax written over the logits: ``in_place``)."""
    elements = _LOSS_CHUNK_ELEMENTS.get(device_type, _LOSS_CHUNK_ELEMENTS["cpu"])
    return max(1, (elements * (2 if in_place else 1)) // vocab)


@functools.cache
def _fp32_accumulating_gemm(device_type: str) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` adds a half
    dtype product into an fp32 ``acc`` in one GEMM on this device (CUDA in recent torch:
    cuBLAS accumulates in fp32 and writes fp32). Elsewhere the product is made in the half
    dtype, cast and added: three passes over (V, e) per chunk and a rounding per chunk."""
    if device_type != "cuda":
        return False
    try:
        acc = torch.ones(2, 2, device=device_type)
        a = torch.full((2, 3), 0.5, dtype=torch.bfloat16, device=device_type)
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
        return bool((acc == 1.75).all())  # added to, not overwritten
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def lm_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (N,), ignoring
    ``IGNORE_INDEX``, with the gradients w.r.t. ``h`` and ``weight`` computed in the same
    pass (softmax - one-hot), so that backward is just a scale. Matmuls run in the autocast
    dtype when autocast is on, the softmax and the loss in fp32, chunk by chunk: no fp32
    (N, vocab) tensor is ever materialised, unlike ``cross_entropy(logits.float())``."""
    # Gradients are computed in forward only when a backward can follow (grad mode is
    # off inside Function.forward, so decide here).
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LMHeadLoss.apply(h, weight, targets, grad)


def vocab_parallel_lm_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                tp_group=None) -> torch.Tensor:
    """``lm_head_loss`` with the LM head split by vocabulary over the tensor-parallel group
    (fairscale's model-parallel group by default): ``weight`` is this rank's (V/tp, e)
    shard, rows [rank * V/tp, (rank+1) * V/tp) of the vocabulary, and ``h`` is the same on
    every TP rank. Each chunk's logits stay local (n, V/tp); three all-reduces of n values
    (the row max, the sum of exponentials, the target's logit) give the exact loss
    (Megatron's vocab-parallel cross-entropy), so no rank ever holds (N, vocab) logits.
    The gradient w.r.t. ``h`` is this shard's part; fairscale's copy-to-model-parallel
    region all-reduces it in backward, as the column-parallel head did."""
    from fairscale.nn.model_parallel import initialize as mpu
    from fairscale.nn.model_parallel.mappings import copy_to_model_parallel_region
    group = tp_group if tp_group is not None else mpu.get_model_parallel_group()
    rank = torch.distributed.get_rank(group)
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if grad and h.requires_grad:
        h = copy_to_model_parallel_region(h)
    return _LMHeadLoss.apply(h, weight, targets, grad, group, rank * weight.shape[0])


class _LMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                grad: bool, tp_group=None, vocab_start: int = 0) -> torch.Tensor:
        dev = h.device.type
        # Autocast exists for cpu/cuda only; on ``meta`` (shape-only runs) there is none.
        has_autocast = dev in ("cpu", "cuda")
        dtype = torch.get_autocast_dtype(dev) if has_autocast and torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False) if has_autocast else contextlib.nullcontext():
            hc, wc = h.to(dtype), weight.to(dtype)
            N, V = h.shape[0], weight.shape[0]
            valid = targets != IGNORE_INDEX
            # Mean over real targets; an all-ignored batch gives 0 rather than NaN.
            denom = valid.sum().clamp(min=1).to(torch.float32)
            scale = (valid / denom).unsqueeze(1)                     # (N, 1) d(mean)/d(row)
            tgt = targets.clamp(min=0).unsqueeze(1)                  # (N, 1)
            nll_rows = torch.empty(N, dtype=torch.float32, device=h.device)  # each row's loss
            # The gradients are made chunk by chunk from each chunk's d(loss)/d(logits): no
            # (N, V) tensor is held, only the outputs. In a half compute dtype with several
            # chunks the head's gradient sums in fp32 (chunk sums must not round): on CUDA
            # by one GEMM that accumulates into it (``_fp32_accumulating_gemm``), elsewhere
            # through the per-chunk product and its copy, V x e x (8 + c) bytes; when the
            # whole (N, V) gradient of the logits is smaller (N x c < 8 x e), it is held
            # instead and multiplied once (``_whole_logit_grad``).
            # In fp32 (a CPU without native bf16) the logits are written into one buffer that
            # every chunk reuses, and their softmax over them in place: a fresh (n, V) pair per
            # chunk costs the CPU a page fault per 4 KiB, each chunk of each step, and the
            # buffer holds twice the rows of a pair in the same bytes. (A half dtype's softmax
            # upcasts, which has no out= form on the CPU; CUDA's caching allocator reuses
            # blocks itself; TP's softmax all-reduces its pieces first.)
            in_place = dtype == torch.float32 and tp_group is None
            rows = _loss_chunk_rows(V, in_place, dev)
            need_h = grad and ctx.needs_input_grad[0]
            need_w = grad and ctx.needs_input_grad[1]
            whole = grad and _whole_logit_grad(N, rows, h.shape[1], dtype.itemsize)
            acc = torch.float32 if dtype != torch.float32 and N > rows else dtype
            # Chunks of equal size: no small last chunk, whose matmuls run far below the
            # big ones' rate.
            chunks = max(1, -(-N // rows))
            rows = max(1, -(-N // chunks))
            buf = torch.empty(min(rows, N), V, dtype=dtype, device=h.device) if in_place else None
            g = torch.empty(N, V, dtype=dtype, device=h.device) if whole else None
            grad_h = torch.empty(N, h.shape[1], dtype=dtype, device=h.device) if need_h and not whole else None
            grad_w = (torch.zeros(V, h.shape[1], dtype=acc, device=h.device)
                      if need_w and not whole else None)
            if tp_group is not None:
                # This rank's vocabulary rows: targets elsewhere count 0 here.
                local = (tgt >= vocab_start) & (tgt < vocab_start + V)
                tgt = torch.where(local, tgt - vocab_start, 0)
            for s in range(0, N, rows):
                e = min(s + rows, N)
                if buf is None:
                    logits = hc[s:e] @ wc.t()                        # (n, V)
                else:
                    logits = torch.mm(hc[s:e], wc.t(), out=buf[:e - s])
                if tp_group is not None:
                    nll, p = _vocab_parallel_softmax(logits, tgt[s:e], local[s:e], tp_group)
                else:
                    # loss = lse - l[target] = (max l - l[target]) - log(max p): exact even
                    # where p[target] underflows fp32 (max p = 1/sum exp(l - max l) is at
                    # least 1/V), and nothing to check on the host. Max and target logit
                    # are read before the softmax, which may be written over the logits.
                    # (``amax``, not ``max(dim)``: no indices, ~6x faster on a CPU.)
                    gap = (logits.amax(dim=1, keepdim=True).float()
                           - logits.gather(1, tgt[s:e]).float())
                    p = (torch.softmax(logits, dim=1, dtype=torch.float32) if buf is None
                         else torch._softmax(logits, 1, False, out=logits))
                    nll = (gap - p.amax(dim=1, keepdim=True).log()).squeeze(1)
                nll_rows[s:e] = nll
                del logits                                           # p is all the rest needs
                if grad:
                    # softmax - onehot (the one-hot only on the rank that holds the target)
                    one = torch.full_like(p[:, :1], -1.0)
                    if tp_group is not None:
                        one = one * local[s:e]
                    p.scatter_add_(1, tgt[s:e], one)
                    if whole:
                        torch.mul(p, scale[s:e], out=g[s:e])
                        del p
                        continue
                    # (n, V) d(mean)/d(logits), in the compute dtype: one pass over p
                    gc = (p.mul_(scale[s:e]) if dtype == p.dtype else
                          torch.mul(p, scale[s:e], out=torch.empty_like(p, dtype=dtype)))
                    if need_h:
                        torch.mm(gc, wc, out=grad_h[s:e])            # (n, e)
                    if need_w:
                        if grad_w.dtype == dtype:
                            grad_w.addmm_(gc.t(), hc[s:e])           # (V, e)
                        elif _fp32_accumulating_gemm(dev):
                            torch.addmm(grad_w, gc.t(), hc[s:e], out_dtype=torch.float32,
                                        out=grad_w)
                        else:
                            grad_w += (gc.t() @ hc[s:e]).float()
                    del gc
                del p
            loss = (nll_rows * valid).sum()
            if whole:
                grad_h = g @ wc if need_h else None                  # (N, e)
                grad_w = g.t() @ hc if need_w else None              # (V, e)
                del g
        # Held on ctx (not save_for_backward) so that backward can scale them in place and
        # let them go: no (V, e) copy in the loss's backward.
        ctx.grads = (grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss / denom

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the fused LM-head loss supports one backward pass (its gradients "
                               "are made in forward and consumed by the first backward)")
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        h_dtype, w_dtype = ctx.dtypes
        gh = grad_h.mul_(grad_out).to(h_dtype) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def _whole_logit_grad(n: int, rows: int, e: int, c: int) -> bool:
    """Whether the fused loss holds the whole (n, V) gradient of the logits (c bytes per
    element) rather than summing the head's gradient over chunks in fp32: only in a half
    dtype over several chunks, and only when it is the smaller (n x V x c < V x e x 8)."""
    return c != 4 and n > rows and n * c < 8 * e


def _vocab_parallel_softmax(logits: torch.Tensor, tgt: torch.Tensor, local: torch.Tensor,
                            group) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll per row, this shard's softmax in fp32) for logits split by vocabulary over
    ``group``: the global row max, sum of exponentials and target logit are all-reduced."""
    import torch.distributed as dist
    lf = logits.float()
    m = lf.max(dim=1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    p = torch.exp(lf - m.unsqueeze(1))
    total = p.sum(dim=1)
    picked = lf.gather(1, tgt).squeeze(1) * local.squeeze(1)
    both = torch.stack([total, picked])
    dist.all_reduce(both, group=group)
    total, picked = both[0], both[1]
    p.div_(total.unsqueeze(1))
    return torch.log(total) + m - picked, p


def _positions(attention_mask: torch.Tensor | None, B: int, T: int, past: int,
               device: torch.device) -> torch.Tensor:
    """Positions (before the +2 offset). With a mask, position = cumsum(mask) - 1 so left
    padding does not shift real tokens; padded slots get -1 (row 1 of the table, unused)."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)
    m = attention_mask.long()
    pos = torch.cumsum(m, dim=1) * m - 1
    return pos[:, -T:]


def _attention_bias(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, S), True = may attend, from a key-validity mask (B, S): key j
    is visible to query i (the i-th of the last T positions) when j <= S - T + i and key j
    is real. Each query also sees its own key, so rows of left padding (no real key at all)
    stay finite instead of NaN; real tokens are unaffected since their own key is real."""
    B, S = attention_mask.shape
    device = attention_mask.device
    q_pos = torch.arange(S - T, S, device=device).unsqueeze(1)      # (T, 1)
    k_pos = torch.arange(S, device=device).unsqueeze(0)             # (1, S)
    visible = (k_pos <= q_pos).unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # (B, T, S)
    visible = visible | (k_pos == q_pos).unsqueeze(0)
    return visible.unsqueeze(1)
