"""ViT image encoder: BLIP's ViT-B/16 and ViT-L/16, and BLIP-2's EVA ViT-g (q/v biases without a k bias)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VisionConfig
from .layers import activation, attend, merge_heads


class VisionEmbeddings(nn.Module):
    """Patch embedding, class token and learned positions (bicubically resized for other image sizes)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, cfg.hidden_size))

    def positions(self, gh: int, gw: int) -> Tensor:
        """Position embeddings (1, 1 + gh*gw, H) for a gh x gw patch grid."""
        pos = self.position_embedding
        n = pos.shape[1] - 1
        if gh * gw == n and gh == gw:
            return pos
        side = int(round(n**0.5))
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, H, side, side)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def forward(self, pixels: Tensor) -> Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixels.to(dtype))  # (B, H, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, H)
        cls = self.class_embedding.to(dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.positions(gh, gw).to(dtype)


class VisionAttention(nn.Module):
    """Fused-qkv self-attention (EVA's checkpoints store its q / v biases fused, with a zero k third)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        return self.projection(merge_heads(attend(q, k, v, None, block=self)))


class VisionMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """The stack of blocks (`encoder.layers.{i}` in checkpoints)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class VisionModel(nn.Module):
    """Pixels (B, 3, H, W) -> patch features (B, 1 + P, hidden) after the final LayerNorm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))
