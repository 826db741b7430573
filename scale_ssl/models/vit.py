"""Vision Transformer encoders, built on ``torchvision.models.VisionTransformer``.

Dosovitskiy et al. "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021 (arXiv:2010.11929); the small sizes of Touvron et al. "Training data-efficient image
transformers" (DeiT), ICML 2021 (arXiv:2012.12877), which DINO (Caron et al. 2021,
arXiv:2104.14294) pretrains; stochastic depth from Huang et al. 2016 (arXiv:1603.09382).

    tokens = [cls ; conv_p(x) flattened] + pos        conv_p: p x p patches, stride p
    tokens <- tokens + DropPath(MSA(LN(tokens)))       per block, L blocks
    tokens <- tokens + DropPath(MLP(LN(tokens)))
    h = LN(tokens)[0]              (pool="cls")      or  mean of LN(tokens)[1:]  (pool="mean")

Names: ``vit_<size>_<patch>``, e.g. torchvision's ``vit_b_16``, ``vit_b_32``, ``vit_l_16``,
``vit_l_32``, ``vit_h_14``, DINO's ``vit_s_16`` / ``vit_s_8`` / ``vit_b_8``, DeiT's ``vit_ti_16``,
and ``vit_mini_<p>``, a 6-block width-128 ViT (1.2 M parameters) for CPU tests and 28 px
Fashion-MNIST (``vit_mini_7``: 16 patches of 7 x 7 px). Sizes (width, blocks, heads, MLP width) are in ``VIT_SIZES``; the patch size is the
number after the size.

What differs from torchvision's model, and why:

* the blocks add stochastic depth (``torchvision.ops.StochasticDepth``, rate rising linearly from
  0 at the first block to ``drop_path_rate`` at the last, as DeiT and DINO); it has no weights;
* the input may be any size divisible by the patch: the position embedding, stored for
  ``image_size``, is resized bicubically to the input's patch grid (DINO's multi-crop feeds 96 px
  local crops to a ViT built for 224 px);
* ``in_channels`` sets the patch projection's input channels (1 for grayscale);
* ``heads`` is ``nn.Identity()``: the encoder returns features, not class scores.

Checkpoint compatibility: the module *is* a ``torchvision.models.VisionTransformer`` with the same
parameter names (``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_<i>.*``, ``encoder.ln``), so its ``state_dict()`` loads with
``strict=True`` into torchvision's model built for the same size, patch, image size and channels,
with ``heads`` set to ``nn.Identity()``::

    model = torchvision.models.vit_b_16(weights=None, image_size=224)
    model.heads = nn.Identity()       # or keep the head and load with strict=False
    model.load_state_dict(encoder.state_dict())   # model(x) == encoder(x) with pool="cls"
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.vision_transformer import EncoderBlock
from torchvision.ops import StochasticDepth

# size -> (hidden_dim, num_layers, num_heads, mlp_dim)
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mini": (128, 6, 4, 512),  # CPU-sized: a 28 px DINO step at batch 256 costs ~3 CPU-s (ViT-Ti/4: ~19)
    "ti": (192, 12, 3, 768),  # DeiT-Ti
    "s": (384, 12, 6, 1536),  # DeiT-S, DINO's ViT-S
    "b": (768, 12, 12, 3072),  # torchvision vit_b_*
    "l": (1024, 24, 16, 4096),  # torchvision vit_l_*
    "h": (1280, 32, 16, 5120),  # torchvision vit_h_14
}
TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
"""The names torchvision itself builds (``torchvision.models.<name>``)."""
POOLS = ("cls", "mean")
VIT_OPTIONS = ("image_size", "drop_path_rate", "pool")
_NAME = re.compile(r"^vit_([a-z]+)_(\d+)$")


def is_vit_arch(arch) -> bool:
    """True for names of the form ``vit_<...>`` (valid or not): they are meant as a ViT."""
    return isinstance(arch, str) and arch.startswith("vit_")


def parse_vit_arch(arch: str) -> tuple[str, int]:
    """``"vit_s_16"`` -> ``("s", 16)``; a clear error for anything else."""
    match = _NAME.match(arch) if isinstance(arch, str) else None
    if match is None or match.group(1) not in VIT_SIZES or int(match.group(2)) < 1:
        sizes = ", ".join(VIT_SIZES)
        raise ValueError(
            f"unknown ViT arch {arch!r}: write vit_<size>_<patch> with size one of {sizes} and the patch side in "
            f"pixels, e.g. vit_s_16 (DINO), vit_b_16 (torchvision) or vit_mini_4 (28 px images)"
        )
    return match.group(1), int(match.group(2))


class DropPathEncoderBlock(EncoderBlock):
    """torchvision's ``EncoderBlock`` (same submodules, same weights) with stochastic depth on
    both residual branches: each sample's branch is dropped with probability ``drop_path`` in
    training and the kept ones scaled by 1 / (1 - drop_path)."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, drop_path: float):
        super().__init__(num_heads, hidden_dim, mlp_dim, dropout=0.0, attention_dropout=0.0,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = input + self.drop_path(self.dropout(x))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class ViTEncoder(VisionTransformer):
    """A torchvision ``VisionTransformer`` that returns pooled features of any input size.

    Args:
        image_size: the side the position embedding is stored for (and checkpoints carry);
            other sides divisible by ``patch_size`` are served by resizing it.
        patch_size / num_layers / num_heads / hidden_dim / mlp_dim: the architecture.
        in_channels: image channels (3 RGB, 1 grayscale).
        drop_path_rate: stochastic-depth rate of the last block (0 at the first, linear between).
        pool: ``"cls"`` (the class token, as ViT and DINO) or ``"mean"`` (mean of the patch tokens).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        in_channels: int = 3,
        drop_path_rate: float = 0.0,
        pool: str = "cls",
    ):
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTEncoder: {name} must be a positive int, got {value!r}")
        if image_size % patch_size:
            raise ValueError(
                f"ViTEncoder: image_size={image_size} is not a multiple of the patch size {patch_size}; "
                f"set model.encoder_options.image_size to a multiple of {patch_size}"
            )
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) or not 0 <= drop_path_rate < 1:
            raise ValueError(f"ViTEncoder: drop_path_rate must be in [0, 1) (DINO: 0.1), got {drop_path_rate!r}")
        if pool not in POOLS:
            raise ValueError(f"ViTEncoder: pool={pool!r}; use one of {POOLS}")
        # torchvision builds the patch embedding, class token, position embedding and final norm
        # (with its own initialisation); the blocks are ours, so none are built to be discarded.
        super().__init__(image_size, patch_size, 0, num_heads, hidden_dim, mlp_dim, num_classes=1)
        rates = torch.linspace(0, float(drop_path_rate), num_layers).tolist() if num_layers else []
        self.encoder.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", DropPathEncoderBlock(num_heads, hidden_dim, mlp_dim, rate)) for i, rate in enumerate(rates)
        ))
        if in_channels != 3:
            self.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
            # torchvision's initialisation of the patch projection, for any channel count
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (in_channels * patch_size * patch_size)))
            nn.init.zeros_(self.conv_proj.bias)
        self.heads = nn.Identity()
        self.in_channels = in_channels
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.drop_path_rate = float(drop_path_rate)
        self.pool = pool

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position embedding for a ``grid_h x grid_w`` patch grid, shape (1, 1 + gh*gw, D)."""
        pos = self.encoder.pos_embedding
        side = self.image_size // self.patch_size
        if (grid_h, grid_w) == (side, side):
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm: (N, 1 + patches, hidden_dim), the class token first."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ViTEncoder: expected images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        n, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"ViTEncoder: a {h}x{w} input does not split into {p}x{p} patches; use crop sizes divisible by {p} "
                f"(data.image_size, data.views.size_crops)"
            )
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(h // p, w // p)
        return self.encoder.ln(self.encoder.layers(self.encoder.dropout(tokens)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(x)
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)


def build_vit_encoder(
    arch: str, in_channels: int = 3, image_size: int = 224, drop_path_rate: float = 0.0, pool: str = "cls"
) -> tuple[ViTEncoder, int]:
    """Build a randomly initialised ViT encoder from its name; return ``(encoder, feature_dim)``."""
    size, patch = parse_vit_arch(arch)
    hidden_dim, num_layers, num_heads, mlp_dim = VIT_SIZES[size]
    encoder = ViTEncoder(image_size, patch, num_layers, num_heads, hidden_dim, mlp_dim, in_channels=in_channels,
                         drop_path_rate=drop_path_rate, pool=pool)
    return encoder, hidden_dim


def torchvision_vit(arch: str, in_channels: int = 3, image_size: int = 224) -> VisionTransformer:
    """A plain torchvision ``VisionTransformer`` (random init) of ``arch``, with the patch
    projection built for ``in_channels`` and ``heads = nn.Identity()``: what an exported ViT
    encoder loads into with ``strict=True``. For torchvision's own names and 3 channels this is
    ``torchvision.models.<arch>(weights=None, image_size=image_size)`` with the head removed."""
    import torchvision

    size, patch = parse_vit_arch(arch)
    if arch in TORCHVISION_VITS:
        model = getattr(torchvision.models, arch)(weights=None, image_size=image_size)
    else:
        hidden_dim, num_layers, num_heads, mlp_dim = VIT_SIZES[size]
        model = VisionTransformer(image_size, patch, num_layers, num_heads, hidden_dim, mlp_dim)
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, model.hidden_dim, kernel_size=patch, stride=patch)
    model.heads = nn.Identity()
    return model


def disable_drop_path(module: nn.Module) -> nn.Module:
    """Set every stochastic-depth rate in ``module`` to 0 (an EMA teacher/target runs the whole
    network, as in DINO, whose teacher is built without drop path)."""
    for child in module.modules():
        if isinstance(child, StochasticDepth):
            child.p = 0.0
    return module
