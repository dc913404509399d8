"""A compact, fully convolutional U-Net for score-based priors.

We write our own instead of using diffusers' ``UNet2DModel`` for three reasons. It has no
attention layers, so its cost is linear in the number of pixels and a prior trained on 64x64
crops applies to any image size. Its layer names are few and stable, which keeps LoRA target
lists short. And it avoids a large dependency for about 150 lines of code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet`; stored in every checkpoint's JSON config."""

    in_channels: int = 1  # image channels
    base_channels: int = 32  # channels at full resolution
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])  # one entry per resolution
    blocks_per_level: int = 2  # residual blocks per resolution on the way down
    embedding_dim: int = 128  # noise-level embedding width
    dropout: float = 0.0
    patch_size: int = 1  # pixel-unshuffle factor before the first convolution (1: none)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name in ("in_channels", "base_channels", "blocks_per_level", "embedding_dim", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.channel_mults, list) or not self.channel_mults or not all(isinstance(m, int) and m >= 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be a non-empty list of positive integers; got {self.channel_mults!r}")
        for mult in self.channel_mults:
            channels = self.base_channels * mult
            if channels % min(8, channels):
                raise ValueError(f"base_channels * channel_mults must be multiples of 8 (group normalization); got {channels}")
        if self.embedding_dim % 2:
            raise ValueError(f"embedding_dim must be even; got {self.embedding_dim}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")

    @property
    def downsampling_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channel_mults) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels, eps=1e-6)


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise conditioning ``c_noise``."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(half) / half))

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise.reshape(-1, 1) * self.freqs * 1e3
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ResBlock(nn.Module):
    """Residual block whose normalization is scaled and shifted by the noise embedding."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float):
        super().__init__()
        self.norm0 = _group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        return self.skip(x) + h


class UNet(nn.Module):
    """U-Net ``F(x, c_noise)``; input height and width must be multiples of ``downsampling_factor``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        emb_dim = config.embedding_dim
        self.embedding = FourierEmbedding(emb_dim)
        self.embedding_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Patches of patch_size x patch_size pixels become channels: the network then runs at a
        # coarser grid, which cuts its cost by patch_size^2 for images much larger than a filament.
        patch_channels = config.in_channels * config.patch_size**2
        self.conv_in = nn.Conv2d(patch_channels, config.base_channels, 3, padding=1)

        # Encoder: blocks per level, strided convolutions between levels.
        self.down = nn.ModuleList()
        skip_channels = [config.base_channels]
        channels = config.base_channels
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.blocks_per_level):
                self.down.append(ResBlock(channels, config.base_channels * mult, emb_dim, config.dropout))
                channels = config.base_channels * mult
                skip_channels.append(channels)
            if level < len(config.channel_mults) - 1:
                self.down.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                skip_channels.append(channels)

        self.mid = nn.ModuleList([ResBlock(channels, channels, emb_dim, config.dropout) for _ in range(2)])

        # Decoder: one more block per level than the encoder, each fed one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for _ in range(config.blocks_per_level + 1):
                out = config.base_channels * mult
                self.up.append(ResBlock(channels + skip_channels.pop(), out, emb_dim, config.dropout))
                channels = out
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, patch_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        emb = self.embedding_mlp(self.embedding(c_noise))
        patch = self.config.patch_size
        h = self.conv_in(F.pixel_unshuffle(x, patch) if patch > 1 else x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, patch) if patch > 1 else out
