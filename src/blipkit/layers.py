"""Small blocks shared by every tower: attention through SDPA (with an eager path that records the weights), masks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The attention blocks whose probabilities the current call records, and what they recorded (see `recording`). A
# context variable: each thread (and asyncio task) sees only its own, so concurrent calls on one model stay apart.
_RECORDING: ContextVar[dict[nn.Module, Tensor | None] | None] = ContextVar("blipkit_recording", default=None)


def activation(name: str) -> nn.Module:
    """The activation module named in a Hugging Face config (`hidden_act`)."""
    table = {
        "gelu": nn.GELU,
        "gelu_new": lambda: nn.GELU(approximate="tanh"),
        "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
        "relu": nn.ReLU,
        "quick_gelu": QuickGELU,
    }
    if name not in table:
        raise ValueError(f"unsupported activation '{name}' (known: {sorted(table)})")
    return table[name]()


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), as in CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """nn.Embedding, N(0, 1)-initialised as torch does, but built without initialising when on the meta device.

    (Initialising an embedding on the meta device pulls in torch's compiler stack: a second of start-up.)
    """
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        with torch.no_grad():
            weight.normal_()
            if padding_idx is not None:
                weight[padding_idx].zero_()
    return nn.Embedding(num, dim, padding_idx=padding_idx, _weight=weight)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, H) -> (B, nh, T, hs)."""
    B, T, H = x.shape
    return x.view(B, T, heads, H // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, nh, T, hs) -> (B, T, H)."""
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hs)


@contextmanager
def recording(*blocks: nn.Module) -> Iterator[dict[nn.Module, Tensor | None]]:
    """Record the attention probabilities of `blocks` (the modules passed to `attend` as `block`) while inside.

    Yields a dict block -> probabilities (B, nh, Tq, Tk) of the block's last run inside, None if it did not run. The
    recording belongs to this thread (or task) alone: the same model running in other threads records nothing.
    Probabilities keep their autograd graph when gradients flow, so GradCAM can differentiate with respect to them.
    """
    record: dict[nn.Module, Tensor | None] = {**(_RECORDING.get() or {}), **{b: None for b in blocks}}
    token = _RECORDING.set(record)
    try:
        yield record
    finally:
        _RECORDING.reset(token)


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float = 0.0, block: nn.Module | None = None
) -> Tensor:
    """Scaled dot-product attention over (B, nh, T, hs) tensors with an additive float mask.

    Keys/values may have fewer rows than the queries, Bk dividing B: each is shared by a run of B // Bk consecutive
    query rows (one image and its texts), without copies of it. When `block` is being recorded in this thread (see
    `recording`), the eager path runs instead of SDPA and the probabilities (B, nh, Tq, Tk) go into the recording:
    what attention maps and GradCAM read. The numbers are the same either way. Keys/values kept in another dtype
    (an int8 decoder's bfloat16 cross-attention cache) set the dtype of the product; the output has the queries'.
    """
    if k.dtype != q.dtype:
        low = None if mask is None else mask.to(k.dtype)
        return attend(q.to(k.dtype), k, v, low, dropout, block).to(q.dtype)
    B, Bk = q.shape[0], k.shape[0]
    record = _RECORDING.get()
    if record is not None and block is not None and block in record:
        if 1 < Bk < B:
            k, v = k.repeat_interleave(B // Bk, 0), v.repeat_interleave(B // Bk, 0)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, nh, Tq, Tk)
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        record[block] = probs
        return F.dropout(probs, dropout, block.training) @ v
    if Bk < B:  # keys/values shared by runs of G = B // Bk consecutive rows (an image and its texts)
        G = B // Bk
        if mask is None or mask.shape[0] == 1:
            # Fold each run into the query axis: one attention call against the shared keys, no copies of them.
            _, nh, T, hs = q.shape
            folded = q.view(Bk, G, nh, T, hs).transpose(1, 2).reshape(Bk, nh, G * T, hs)  # (Bk, nh, G*T, hs)
            out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, dropout_p=dropout)
            return out.view(Bk, nh, G, T, hs).transpose(1, 2).reshape(B, nh, T, hs)  # (B, nh, T, hs)
        if Bk == 1:
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        else:
            k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def padding_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, Tk) 1/0 mask -> additive (B, 1, 1, Tk) mask; None stays None (attend everywhere)."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_mask(mask: Tensor, past: int, dtype: torch.dtype) -> Tensor:
    """Additive (B, 1, Tq, Tk) mask for Tq new tokens after `past` cached ones; `mask` is (B, Tk) 1/0 over all keys."""
    B, Tk = mask.shape
    Tq = Tk - past
    rows = torch.arange(past, Tk, device=mask.device)[:, None]  # absolute position of each query
    allowed = (torch.arange(Tk, device=mask.device)[None, :] <= rows)[None, None] & mask[:, None, None, :].bool()
    return torch.zeros(B, 1, Tq, Tk, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)
