"""CPU training kernels that compute what the stock ops compute, with less work (installed by build_model).

## Attention over packed rows: each example's causal triangle only

A packed row holds several examples; position_ids restart at 0 at each one. transformers' `sdpa`
path turns that into a (seq x seq) block-diagonal mask, and PyTorch's CPU attention kernel with an
arbitrary mask computes every block of the full square: on the quickstart's 512-token rows of ~3-10
examples that is 4-15x the work attention needs, and it repeats the key/value heads for grouped-query
attention because sdpa's GQA path takes no mask. `packed_sdpa` instead cuts each row at the position
restarts and runs causal sdpa on each example alone (no mask, GQA in the kernel): the same outputs
and gradients, less work.

Each example of up to MATH_MAX_LEN tokens runs as two matrix products and a float32 softmax (as
transformers' eager attention does) rather than through PyTorch's CPU flash kernel: for the short
examples of instruction data its backward is ~3x faster (170 tokens, 9 heads: 1.2 vs 3.7 ms). Where
gradients flow, it keeps heads x n^2 x 6 bytes per example and layer for the backward (9 heads, 256
tokens: 3.5 MiB), which the flash kernel does not; so longer examples keep the flash kernel (at 512
tokens the two are equally fast, and a row of 512-token examples would hold 4x as much).

Installed by `use_packed_attention(model)` as the attention implementation "rayft_packed"; its mask
function skips building the square mask where packed_sdpa does not need one, and everything else
(padding masks, a KV cache, generation) goes to transformers' own sdpa path unchanged.

## LoRA dropout from 15-bit random lanes
torch's CPU dropout draws one Bernoulli sample per element (3.4 ms for a 1024 x 576 bf16 activation,
one core); LoRA applies it to the input of every adapted projection, 84 times per micro-batch on the
quickstart. `Dropout15` fills a quarter as many 64-bit words from the same generator and cuts each into
four 15-bit lanes, keeping an element where its lane is at least round(p * 2^15): 1.1 ms, the same
distribution with p rounded to a multiple of 2^-15 (0.05 -> 0.049988).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAME = "rayft_packed"
# Model types whose attention hands position_ids through to the attention function and whose layers all
# attend causally over the whole sequence (a sliding window would need its own mask); each is checked
# against sdpa by tests/test_cpu_ops.py.
SUPPORTED_TYPES = {"llama", "qwen2", "qwen3", "mistral"}
MATH_MAX_LEN = 256
_CAUSAL: dict[int, torch.Tensor] = {}  # length -> the (n x n) mask of future positions, built once per length


def segments(position_ids) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of its examples: a new one begins wherever a position is not the
    previous one plus 1 (the packer restarts positions at 0 for each example, and collate restarts them for
    the pad tail, which so attends only to itself)."""
    import torch

    pos = position_ids
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    width = pos.shape[1]
    out = []
    for row in starts:
        cuts = row.nonzero().flatten().tolist() + [width]
        out.append(list(zip(cuts[:-1], cuts[1:], strict=True)))
    return out


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query (batch, heads, seq, dim), key/value (batch,
    kv heads, seq, dim); returns (batch, seq, heads, dim) and no weights."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_len = query.shape[2]
    if attention_mask is not None or q_len != key.shape[2] or q_len == 1 or position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    rows = []
    for b, spans in enumerate(segments(position_ids.expand(query.shape[0], -1))):
        parts = []
        for s, e in spans:
            q, k, v = query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e]
            if e - s <= MATH_MAX_LEN:
                parts.append(causal_attention(q, k, v, groups, scaling, dropout))
            else:
                parts.append(
                    F.scaled_dot_product_attention(
                        q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=groups > 1
                    )
                )
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def causal_attention(q, k, v, groups: int, scaling: float | None, dropout: float):
    """softmax(q k^T * scale + causal mask) v for one example, (1, heads, n, dim); key/value heads shared by
    `groups` query heads each."""
    import torch

    n = q.shape[2]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if n > 1:
        future = _CAUSAL.get(n)
        if future is None:
            future = _CAUSAL.setdefault(n, torch.ones(n, n, dtype=torch.bool).triu(1))
        scores = scores.masked_fill(future.to(scores.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v)


def packed_mask(*args, attention_mask=None, q_length: int = 0, kv_length: int = 0, **kwargs):
    """No mask where packed_sdpa cuts rows itself (no padding mask, no cache offset); sdpa's mask elsewhere."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not kwargs.get("q_offset") and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, packed_mask)


def supported(config) -> bool:
    """Whether packed_sdpa computes exactly what sdpa does for this model config."""
    if getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return all(t == "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"]))


def use_packed_attention(model) -> bool:
    """Switch a loaded model from sdpa to packed_sdpa when its type is supported; returns whether it did."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or not supported(config):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


# --------------------------------------------------------------------------- dropout


def _dropout15_module():
    import torch

    class Dropout15(torch.nn.Module):
        """nn.Dropout with each element's keep draw taken from a 15-bit lane of a 64-bit random word."""

        def __init__(self, p: float):
            super().__init__()
            self.p = p
            self.threshold = round(p * 2**15)

        def forward(self, x):
            if not self.training or not self.threshold:
                return x
            n = x.numel()
            # random_() on int64 draws from [0, 2^63): bits 0-62 are uniform, so each 16-bit lane's low 15 bits are.
            words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
            keep = words.view(torch.int16)[:n].bitwise_and(0x7FFF) >= self.threshold
            return torch.where(keep.view(x.shape), x * (1.0 / (1.0 - self.threshold / 2**15)), 0)

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return Dropout15


def use_fast_dropout(model) -> int:
    """Replace the nn.Dropout modules of LoRA adapters (peft's `lora_dropout`) with Dropout15; returns how many."""
    import torch

    dropout15 = _dropout15_module()
    replaced = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, torch.nn.ModuleDict):
            continue
        for name, layer in list(table.items()):
            if type(layer) is torch.nn.Dropout and layer.p > 0:
                table[name] = dropout15(layer.p)
                replaced += 1
    return replaced
