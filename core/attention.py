"""Attention in the form LRP explains (CP-LRP, Ali et al. 2022; AttnLRP's uniform rule, Achtibat et al. 2024).

The attention weights are held constant: the softmax's output is detached, so no relevance reaches the queries and
keys, and all of it flows through the values (``softmax(q kᵀ) v`` is then linear in ``v``). The two matrix products
are :class:`BilinearProduct` modules, whose rule (:class:`unhans.core.attribution.UniformProduct`) splits relevance
evenly between the factors that carry it, the epsilon rule within each: the scores' product gets none (its output
feeds only the held softmax), the values' product gives all of it to the values.

Attention layers whose forward ``torch.fx`` cannot trace are replaced by one of the modules here before the trace
(:data:`unhans.core.canonize.SUBSTITUTES`), built from the original's weights and computing the same output:
``nn.MultiheadAttention`` (its fast path is a fused kernel) by :class:`ValueAttention`, whose forward traces into
ordinary operations; torchvision's Swin ``ShiftedWindowAttention`` (a ``torch.fx.wrap``-ed function with shape-driven
control flow) by :class:`WindowAttention`, kept as one call and run eagerly, its projections and products hooked as
any layer is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError


class BilinearProduct(nn.Module):
    """``function(a, b)`` of two tensors, bilinear in them (a matrix product, an element-wise product): the layer
    AttnLRP's uniform rule is registered on. A factor that carries no gradient (held constant) gets no relevance."""

    def __init__(self, function=torch.matmul):
        super().__init__()
        self.function = function

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.function(a, b)


class HeldSoftmax(nn.Module):
    """A softmax whose output is held constant for relevance (detached): attention weights under CP-LRP."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=self.dim).detach()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class ValueAttention(nn.Module):
    """``nn.MultiheadAttention`` (no masks, no added key/value biases) as traceable operations: query, key and value
    projections as linear layers, the attention weights held constant, relevance through the values. It answers
    ``(output, None)``: the attention weights are not returned (torchvision's ViT asks for none)."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        if attention.bias_k is not None or attention.add_zero_attn:
            raise InputError("model", "nn.MultiheadAttention with add_bias_kv or add_zero_attn has no LRP rule here",
                             "build it without them")
        e = attention.embed_dim
        if attention.in_proj_weight is not None:
            weights = attention.in_proj_weight.detach().split(e)
        else:
            weights = (attention.q_proj_weight.detach(), attention.k_proj_weight.detach(), attention.v_proj_weight.detach())
        biases = attention.in_proj_bias.detach().split(e) if attention.in_proj_bias is not None else (None,) * 3
        self.query, self.key, self.value = (_linear(w, b) for w, b in zip(weights, biases))
        self.out_proj = attention.out_proj
        self.heads, self.head_dim, self.batch_first = attention.num_heads, attention.head_dim, attention.batch_first
        self.scores, self.weights, self.mix = BilinearProduct(), HeldSoftmax(-1), BilinearProduct()

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise InputError("model", "nn.MultiheadAttention called with a mask has no LRP rule here", "call it without masks")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._split(self.query(query)), self._split(self.key(key)), self._split(self.value(value))
        weights = self.weights(self.scores(q, k.transpose(-2, -1)) * self.head_dim ** -0.5)
        out = self.mix(weights, v).transpose(1, 2)
        out = self.out_proj(out.reshape(out.shape[0], out.shape[1], self.heads * self.head_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _windows(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B·windows, size_h·size_w, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // size[0], size[0], w // size[1], size[1], c).transpose(2, 3)
    return x.reshape(-1, size[0] * size[1], c)


def _unwindows(x: torch.Tensor, size: tuple[int, int], b: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`_windows`."""
    x = x.reshape(b, h // size[0], w // size[1], size[0], size[1], -1).transpose(2, 3)
    return x.reshape(b, h, w, -1)


def _shift_mask(h: int, w: int, size: tuple[int, int], shift: tuple[int, int], device) -> torch.Tensor:
    """(windows, tokens, tokens): 0 where two tokens of a window came from the same region before the cyclic shift,
    -100 where the shift brought them together (Swin's mask)."""
    def regions(length, window, offset):
        ids = torch.zeros(length, device=device)
        ids[length - window:] = 1
        ids[length - offset:] = 2
        return ids

    region = regions(h, size[0], shift[0])[:, None] * 3 + regions(w, size[1], shift[1])[None, :]
    region = _windows(region[None, :, :, None], size)[..., 0]  # (windows, tokens)
    return (region[:, None, :] != region[:, :, None]).float() * -100.0


class WindowAttention(nn.Module):
    """torchvision's Swin ``ShiftedWindowAttention`` (v1) with its weights: the input padded to whole windows,
    cyclically shifted, split into windows, attended with the relative position bias (and the shift's mask), merged
    and shifted back; padding, shifts and window splits move relevance unchanged, the products carry the rule."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.qkv, self.proj = attention.qkv, attention.proj
        self.window, self.shift = tuple(attention.window_size), tuple(attention.shift_size)
        self.heads = attention.num_heads
        with torch.no_grad():
            self.register_buffer("position_bias", attention.get_relative_position_bias().detach().clone())
        self.scores, self.weights, self.mix = BilinearProduct(), HeldSoftmax(-1), BilinearProduct()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        size = self.window
        padded = F.pad(x, (0, 0, 0, (-w) % size[1], 0, (-h) % size[0]))
        ph, pw = padded.shape[1:3]
        shift = tuple(0 if s >= p else t for s, p, t in zip(size, (ph, pw), self.shift))
        if any(shift):
            padded = torch.roll(padded, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        tokens = _windows(padded, size)
        qkv = self.qkv(tokens).reshape(tokens.shape[0], tokens.shape[1], 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = self.scores(q * (c // self.heads) ** -0.5, k.transpose(-2, -1)) + self.position_bias
        if any(shift):
            mask = _shift_mask(ph, pw, size, shift, x.device).to(scores.dtype)
            scores = (scores.reshape(b, -1, self.heads, tokens.shape[1], tokens.shape[1]) + mask[None, :, None]).reshape(scores.shape)
        out = self.mix(self.weights(scores), v).transpose(1, 2).reshape(tokens.shape[0], tokens.shape[1], c)
        out = _unwindows(self.proj(out), size, b, ph, pw)
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        return out[:, :h, :w, :].contiguous()
