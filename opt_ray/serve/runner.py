"""The engine's forward pass: one packed, unpadded pass over every row of a step.

A step's rows are prefill chunks (T >= 1 prompt tokens starting at position ``past``) and
decode rows (T = 1). Their tokens are concatenated into one (N, d) activation, so every
linear layer is one GEMM over exactly the real tokens: no padding to the longest prompt,
no separate prefill and decode forwards. Attention goes over each row's own length:
a prompt chunk's queries attend to its slot's keys 0..past+T-1 with SDPA (causal within
the chunk); the single-token (decode) rows of a step share one SDPA per layer over a view
of the slots, masked per row to its own length (``_DecodeGroup`` says why not per row).

The model's parameters are the source of truth; the runner reads the modules' weights
at call time. The one derived layout: q/k/v weights are packed into one (3d, d) tensor
so the three projections are one GEMM, and the model's q/k/v parameters are re-pointed
at views of it (no second copy; the model keeps working unchanged).

On CPU in fp32 the linear layers of small steps (decode and short chunks, up to
``PACKED_MAX_TOKENS`` tokens) run on weights prepacked for oneDNN (``_PackedLinears``),
with a ReLU fused into fc1; bigger steps (prefill) use the model's own weights.

On CPU with a bf16 model the cache is fp32: CPU SDPA in bf16 was ~3x slower than fp32
(16.5 vs 5.2 ms per layer above), while the GEMMs gain from bf16.

A bf16 model on a CPU without native bf16 computes in fp32 over the bf16-rounded weights
(``engine.compute_dtype``: emulated bf16 GEMMs of 4+ rows are slower than fp32 there),
except a step of ``HALF_MAX_ROWS`` token: it runs its linears in bf16 over bf16 copies of
the weights (half the bytes to stream; activations rounded to bf16, fp32 accumulation), as
a native-bf16 machine would run every step. A lone sequence's numerics are then those of
bf16, a batched one's those of fp32 over bf16 weights: in bf16 on such a CPU the greedy
text of a request may depend on what runs beside it (fp32 is batch-invariant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opt_ray.model.opt import OPT, POSITION_OFFSET


class SlotKVCache:
    """Preallocated keys/values: per layer (num_slots, heads, max_len, head_dim). A
    sequence owns a slot; its token at position p lives in column p."""

    def __init__(self, num_layers: int, num_slots: int, num_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_slots, num_heads, max_len, head_dim)
        # zeros (not empty): the memory is committed up front, not on first touch mid-serve.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_len, self.dtype = num_slots, max_len, dtype

    @staticmethod
    def bytes_per_slot(num_layers: int, hidden: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * hidden * max_len * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Duplicate a prefilled prompt into another slot (the n > 1 choices)."""
        for buf in self.k + self.v:
            buf[dst, :, :length] = buf[src, :, :length]


def local_heads(model: OPT) -> int:
    """The attention heads this process computes: all, or its tensor-parallel shard."""
    return model.decoder.layers[0].self_attn.q_proj.weight.shape[0] // model.config.head_dim


def cache_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: the model's, except fp32 for half types on CPU (see above)."""
    if device.type == "cpu" and model_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return model_dtype


@dataclass
class Row:
    """One row of a step: ``length`` tokens of the sequence in ``slot``, at positions
    past..past+length-1, stored at [start, start+length) of the packed batch."""
    start: int
    length: int
    slot: int
    past: int


# The decode rows share one SDPA only when it reads mostly real keys: their keys must fill
# at least this share of the (n slots x L columns) block it covers.
GROUP_MIN_FILL = 0.75


class _DecodeGroup:
    """The step's single-token rows, attended in one SDPA per layer over slot rows
    0..n-1 of the cache (n = highest such slot + 1) and columns 0..L-1, with a mask
    giving each row exactly its own keys; slots not in the group see column 0 only (their
    output is discarded; it only keeps their softmax finite). The kernel still reads and
    scores the whole block, masked or not. So the group is used only when the rows' own
    keys fill ``GROUP_MIN_FILL`` of it; else each row gets its own SDPA over exactly its
    keys. On the quiet dev VM (2-core AVX2), 32 mixed requests (prompts 8-200, outputs
    8-128): decode steps took 9.0 s grouped vs 6.7 s per row; 8 requests of similar
    lengths: 2.18-2.22 s grouped vs 2.27 per row (one op per layer instead of one per
    row). On an oversubscribed machine one op per layer wins by more (each parallel
    region waits for descheduled threads)."""

    def __init__(self, starts, slots, n, L, mask):
        self.starts, self.slots, self.n, self.L, self.mask = starts, slots, n, L, mask

    @staticmethod
    def build(rows: list[Row], dev) -> "_DecodeGroup | None":
        ones = [r for r in rows if r.length == 1]
        if len(ones) < 2:
            return None
        n = max(r.slot for r in ones) + 1
        L = max(r.past for r in ones) + 1
        if sum(r.past + 1 for r in ones) < GROUP_MIN_FILL * n * L:
            return None
        last = torch.zeros(n, dtype=torch.long)                  # last visible column per slot
        for r in ones:
            last[r.slot] = r.past
        mask = (torch.arange(L).unsqueeze(0) <= last.unsqueeze(1))[:, None, None, :]  # (n,1,1,L)
        return _DecodeGroup(torch.tensor([r.start for r in ones], device=dev),
                            torch.tensor([r.slot for r in ones], device=dev), n, L, mask.to(dev))


class ModelRunner:
    """Runs packed steps over an ``OPT`` model and a ``SlotKVCache``."""

    def __init__(self, model: OPT, kv: SlotKVCache, *, prepack: bool = True,
                 half: torch.dtype | None = None):
        """``half``: the dtype the fp32 model's weights were rounded to (bf16 on a CPU that
        computes it in fp32); lone-row steps then run their linears in it (see above)."""
        self.model, self.kv = model, kv
        cfg = model.config
        self.head_dim = cfg.head_dim
        # This process's heads: all of them, or its shard under tensor parallelism.
        self.num_heads = local_heads(model)
        self.scaling = self.head_dim ** -0.5
        self.qkv: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for layer in model.decoder.layers:
            self.qkv.append(_pack_qkv(layer.self_attn))
        self.forwards = 0
        # Single-token rows batched in one masked SDPA per layer (see _DecodeGroup).
        self.batch_decode = True
        # Tensor-parallel layers communicate in their own forward (out_proj and fc2 all-
        # reduce before their bias), so they run as modules, never prepacked.
        tensor_parallel = self.num_heads != cfg.num_attention_heads
        self.packed = (_PackedLinears.build(model, self.qkv, half=half)
                       if prepack and not tensor_parallel else None)

    def forward(self, tokens: list[int], positions: list[int], slots: list[int],
                rows: list[Row], select: list[int]) -> torch.Tensor:
        """Write every token's key/value into its slot and return the final hidden states
        (before the LM head) of the packed positions in ``select``: (len(select), e)."""
        m, kv = self.model, self.kv
        decoder = m.decoder
        dev = kv.k[0].device
        tok = torch.tensor(tokens, device=dev)
        pos = torch.tensor(positions, device=dev)
        slot_idx = torch.tensor(slots, device=dev)
        N = tok.shape[0]
        x = decoder.embed_tokens(tok)
        if decoder.project_in is not None:
            x = decoder.project_in(x)
        x = x + decoder.embed_positions(pos + POSITION_OFFSET)                      # (N, d)
        masks = {}
        for r in rows:       # causal within a chunk that continues an earlier one
            if r.length > 1 and r.past > 0 and (r.past, r.length) not in masks:
                q_pos = torch.arange(r.past, r.past + r.length, device=dev).unsqueeze(1)
                masks[(r.past, r.length)] = torch.arange(r.past + r.length, device=dev) <= q_pos
        group = _DecodeGroup.build(rows, dev) if self.batch_decode else None
        packed = self.packed if self.packed is not None and N <= PACKED_MAX_TOKENS else None
        for i, layer in enumerate(decoder.layers):
            h = layer.self_attn_layer_norm(x) if layer.pre_ln else x
            if packed is not None:
                qkv = packed.linear(h, i, "qkv")
            else:
                w, b = self.qkv[i]
                qkv = F.linear(h, w, b)
            qkv = qkv.view(N, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.unbind(1)                                               # (N, nh, hs)
            kc, vc = kv.k[i], kv.v[i]
            kc[slot_idx, :, pos] = k.to(kc.dtype)
            vc[slot_idx, :, pos] = v.to(vc.dtype)
            y = self._attention(q.to(kc.dtype), kc, vc, rows, masks, group).to(x.dtype)  # (N, d)
            x = x + (packed.linear(y, i, "out_proj") if packed is not None else layer.self_attn.out_proj(y))
            if not layer.pre_ln:
                x = layer.self_attn_layer_norm(x)
            h = layer.final_layer_norm(x) if layer.pre_ln else x
            if packed is not None:
                x = x + packed.linear(packed.fc1_act(h, i, layer.act), i, "fc2")
            else:
                x = x + layer.fc2(layer.act(layer.fc1(h)))
            if not layer.pre_ln:
                x = layer.final_layer_norm(x)
        x = x[torch.tensor(select, dtype=torch.long, device=dev)]   # norms are per token: select first
        if decoder.final_layer_norm is not None:
            x = decoder.final_layer_norm(x)
        if decoder.project_out is not None:
            x = decoder.project_out(x)
        self.forwards += 1
        return x

    def _attention(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                   rows: list[Row], masks: dict, dec: "_DecodeGroup | None") -> torch.Tensor:
        out = torch.empty_like(q)                                                 # (N, nh, hs)
        if dec is not None:
            # All single-token rows in one SDPA over the slot rows 0..n-1 (a view, no
            # gather), each row masked to its own length.
            qd = q.new_zeros(dec.n, q.shape[1], 1, q.shape[2])
            qd[dec.slots, :, 0] = q[dec.starts]
            o = F.scaled_dot_product_attention(qd, kc[:dec.n, :, :dec.L], vc[:dec.n, :, :dec.L],
                                               attn_mask=dec.mask, scale=self.scaling)
            out[dec.starts] = o[dec.slots, :, 0]
        for r in rows:
            if dec is not None and r.length == 1:
                continue
            end = r.past + r.length
            qr = q[r.start:r.start + r.length].transpose(0, 1).unsqueeze(0)      # (1, nh, T, hs)
            kr, vr = kc[r.slot, :, :end].unsqueeze(0), vc[r.slot, :, :end].unsqueeze(0)
            mask = masks.get((r.past, r.length)) if r.past > 0 else None
            o = F.scaled_dot_product_attention(
                qr, kr, vr, attn_mask=mask,
                # From position 0 the chunk is square: plain causal (no mask tensor).
                is_causal=r.past == 0 and r.length > 1, scale=self.scaling)
            out[r.start:r.start + r.length] = o[0].transpose(0, 1)
        return out.reshape(q.shape[0], -1)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits (rows, vocab) from selected hidden states."""
        if self.packed is not None and self.packed.head is not None:
            return self.packed.head_logits(h)
        return self.model.lm_head(h).float()


# Steps of up to this many tokens use the prepacked weights; larger ones (prefill chunks)
# the model's own. On the dev VM (2-core AVX2 EPYC; 125m shape, 12 layers' distinct weights,
# so they stream from memory as in serving) the packed GEMMs took 15.4 / 23.0 / 46.1 / 147
# ms for 1 / 8 / 32 / 128 rows against F.linear's 25.2 / 48.0 / 71.3 / 163, and 556 vs 532
# ms at 512 rows. The LM head (50272 x 768): 7.3 / 10.9 / 20.2 ms vs 10.8 / 30.3 / 43.2.
PACKED_MAX_TOKENS = 256
# oneDNN picks the blocked layout for a batch size; 32 was the best across 1-32 rows above.
_PACK_BATCH = 32
# Steps of at most this many tokens run bf16 linears over bf16 weights when the model was
# rounded to bf16 on a CPU without native bf16 (see the module docstring). On the dev VM
# (2-core AVX2 EPYC, 125m), a lone request decoded at 44 tok/s with them against 27 with the
# fp32 packed weights; from 4 rows on the emulated bf16 GEMMs are slower (36 vs ~20 ms at 4
# rows for 12 layers).
HALF_MAX_ROWS = 1


class _PackedLinears:
    """Every linear layer's weight (q/k/v as one) and the LM head's, reordered once into
    oneDNN's blocked layout, on CPU in fp32, run with ``torch.ops.mkldnn._linear_pointwise``
    (the op Inductor's freezing pass emits) on dense activations.

    Why: a small step reads every weight once, so decode is bound by streaming weights from
    memory, and MKL's sgemm on nn.Linear's (out, in) layout streams them at about half the
    speed of the blocked layout (vLLM's CPU backend prepacks for oneDNN as well). fc1's
    ReLU runs as a fused post-op. Cost: a second copy of the weights (the model keeps its
    own for large steps and for ``engine.model``). Results differ from F.linear's by float
    rounding only (another accumulation order)."""

    def __init__(self, layers: list[dict[str, tuple]], head: torch.Tensor | None,
                 half: list[dict[str, tuple]] | None = None, half_head: torch.Tensor | None = None):
        self.layers, self.head = layers, head
        self.half, self.half_head = half, half_head   # bf16 copies for lone rows, or None

    @staticmethod
    def build(model: OPT, qkv: list[tuple[torch.Tensor, torch.Tensor | None]],
              half: torch.dtype | None = None) -> "_PackedLinears | None":
        """``qkv``: each layer's packed (3d, d) q/k/v weight and bias (``_pack_qkv``);
        ``half``: also keep copies in this dtype (bf16 only) for lone-row steps."""
        w = model.lm_head.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return None
        try:
            probe = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(4, 4), _PACK_BATCH)
            torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 4), probe, None, "relu", [], "")
        except (RuntimeError, AttributeError):     # a torch without the op: plain F.linear
            return None

        def pack(weight: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH)

        def detached(b: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            # Detached: a bias that requires grad sends the op down a path ~100x slower
            # for one row whenever it runs outside inference mode.
            return b.detach().to(dtype) if b is not None else None

        layers, halves = [], []
        for layer, (qkv_w, qkv_b) in zip(model.decoder.layers, qkv):
            a = layer.self_attn
            dense = {"qkv": (qkv_w, qkv_b), "out_proj": (a.out_proj.weight, a.out_proj.bias),
                     "fc1": (layer.fc1.weight, layer.fc1.bias), "fc2": (layer.fc2.weight, layer.fc2.bias)}
            layers.append({k: (pack(wt), detached(b)) for k, (wt, b) in dense.items()})
            if half is torch.bfloat16:
                halves.append({k: (detached(wt, half), detached(b, half)) for k, (wt, b) in dense.items()})
        has_head = model.lm_head.bias is None
        return _PackedLinears(layers, pack(w) if has_head else None, halves or None,
                              w.detach().to(torch.bfloat16) if halves and has_head else None)

    def linear(self, x: torch.Tensor, layer: int, name: str, post: str = "none") -> torch.Tensor:
        if self.half is not None and x.shape[0] <= HALF_MAX_ROWS:
            w, b = self.half[layer][name]
            y = F.linear(x.to(w.dtype), w, b)
            return (F.relu(y) if post == "relu" else y).float()
        w, b = self.layers[layer][name]
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, post, [], "")

    def fc1_act(self, h: torch.Tensor, layer: int, act) -> torch.Tensor:
        """act(fc1(h)), the ReLU fused into the GEMM."""
        if act is F.relu:
            return self.linear(h, layer, "fc1", "relu")
        return act(self.linear(h, layer, "fc1"))

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.half_head is not None and h.shape[0] <= HALF_MAX_ROWS:
            return F.linear(h.to(self.half_head.dtype), self.half_head).float()
        return torch.ops.mkldnn._linear_pointwise(h.contiguous(), self.head, None, "none", [], "")


def _pack_qkv(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (3d, d) weight (and bias) for q, k, v; the module's own parameters become views
    of it, so the model and the runner share one copy."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    with torch.no_grad():
        w = torch.cat([q.weight, k.weight, v.weight]).contiguous()
        b = torch.cat([q.bias, k.bias, v.bias]).contiguous() if q.bias is not None else None
        d = q.weight.shape[0]          # this rank's rows under tensor parallelism
        for j, lin in enumerate((q, k, v)):
            lin.weight = nn.Parameter(w[j * d:(j + 1) * d], requires_grad=False)
            if b is not None:
                lin.bias = nn.Parameter(b[j * d:(j + 1) * d], requires_grad=False)
    return w, b
