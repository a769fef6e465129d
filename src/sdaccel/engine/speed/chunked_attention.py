"""bf16 attention on the CPU as oneDNN matrix products over chunks of queries.

PyTorch's fused CPU attention kernel runs bf16 no faster than fp32 on a CPU without AMX: on a
Zen 4 EPYC, SD 1.5's 4096-token self-attention (head size 40) took 305 ms per call, while the
same attention computed per batch row and head, 512 queries at a time (two bf16 matrix products
and a softmax whose scores stay in cache) took 140 ms; the VAE's single-head attention 183 ms
against 53 ms (examples/cpu_attention.py). With short keys (cross-attention's 77 text tokens)
and in fp32 the fused kernel is faster, so those stay with it. On a CPU with AMX the fused kernel
computes bf16 on AMX tiles and is the faster one everywhere (a Xeon: 1.8x per 4096-token
self-attention, 2.9x at 256 tokens), so there nothing is taken over (`pays_off`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

QUERY_CHUNK = 512  # fastest of 128/256/512 for 1024- and 4096-token attention (measured)
MIN_KEYS = 256  # shorter keys: the fused kernel is faster (cross-attention's 77 tokens)


# What inspect-config says where `pays_off` is false.
NOT_HERE = "this CPU has AMX, where PyTorch's fused attention kernel is the faster one"


def pays_off() -> bool:
    """Whether this CPU runs chunked bf16 attention faster than PyTorch's fused kernel: yes
    without AMX (measured on a Zen 4), no with it (measured on a Xeon)."""
    return not torch.cpu._is_amx_tile_supported()


def chunked_attention(query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V for (batch, heads, tokens, d) tensors, without a mask."""
    query = query * query.shape[-1] ** -0.5
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    keys_t = key.transpose(-1, -2)
    for b in range(query.shape[0]):
        for h in range(query.shape[1]):
            for start in range(0, query.shape[2], QUERY_CHUNK):
                rows = slice(start, start + QUERY_CHUNK)
                scores = torch.mm(query[b, h, rows], keys_t[b, h])
                torch.mm(torch.softmax(scores, -1), value[b, h], out=out[b, h, rows])
    return out


def _chunkable(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
               scale=None, enable_gqa=False) -> bool:
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and query.dim() == 4
            and key.shape[-2] >= MIN_KEYS and key.shape[:2] == query.shape[:2]
            and attn_mask is None and dropout_p == 0.0 and not is_causal and scale is None
            and type(query) is torch.Tensor)


class ChunkedAttention(TorchFunctionMode):
    """Within this context, scaled_dot_product_attention calls that fit (CPU, bf16, no mask,
    keys >= MIN_KEYS) run as `chunked_attention`; every other call is unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.scaled_dot_product_attention and len(args) == 3  # as diffusers calls it
                and _chunkable(*args, **kwargs)):
            return chunked_attention(*args)
        return func(*args, **kwargs)
