"""Vision Transformers on torchvision's `VisionTransformer`, with moco-v3's choices: the ViT family
of selfsup.backbones.

moco-v3 (Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021) trains ViTs with a fixed 2D sin-cos position embedding, a cls token initialised with
std 1e-6, xavier-uniform Linear layers with the query/key/value projections treated as three
matrices, and optionally a frozen random patch projection ("stop-grad conv1", Sec. 4.2), which
it found to stabilise training. Features are the cls token after the final LayerNorm, as its
linear evaluation reads them. torchvision's module keeps the parameter names (`conv_proj`,
`class_token`, `encoder.pos_embedding`, `encoder.layers.encoder_layer_i.*`, `encoder.ln`); the
classifier is `head`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn as nn
import torchvision

# name -> (patch size, width, blocks, heads, default image size). The _p4 variants are for 32-pixel
# images (an 8 x 8 grid of patches, as the ImageNet models' 14 x 14 at 224).
VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    "vit_small": (16, 384, 12, 6, 224),
    "vit_base": (16, 768, 12, 12, 224),
    "vit_small_p4": (4, 384, 12, 6, 32),
    "vit_base_p4": (4, 768, 12, 12, 32),
}
ARCHS = tuple(VARIANTS)
TITLE = "Vision Transformer"
HEAD = "head"
MARKER = "conv_proj.weight"


class VisionTransformer(torchvision.models.VisionTransformer):
    """torchvision's ViT with moco-v3's position embedding, initialisation and stop-grad conv1;
    the classifier is `head` (torchvision's `heads` holds nothing)."""

    def __init__(self, image_size: int, patch_size: int, hidden_dim: int, num_layers: int, num_heads: int,
                 num_classes: int = 1000, stop_grad_conv1: bool = False) -> None:
        super().__init__(image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
                         hidden_dim=hidden_dim, mlp_dim=4 * hidden_dim, num_classes=1,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.heads = nn.Identity()
        self.head = nn.Linear(hidden_dim, num_classes) if num_classes > 0 else nn.Identity()
        grid = image_size // patch_size
        with torch.no_grad():
            self.encoder.pos_embedding.copy_(sincos_position_embedding(grid, hidden_dim))
        self.encoder.pos_embedding.requires_grad = False  # fixed, as moco-v3's
        self._init_weights(stop_grad_conv1)

    def _init_weights(self, stop_grad_conv1: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                # Q, K and V as three D x D matrices: xavier's bound of one of them, not of the 3D x D stack.
                d = module.embed_dim
                bound = math.sqrt(6.0 / (d + d))
                nn.init.uniform_(module.in_proj_weight, -bound, bound)
                nn.init.zeros_(module.in_proj_bias)
        nn.init.normal_(self.class_token, std=1e-6)
        proj = self.conv_proj  # xavier-uniform of the patch projection seen as a Linear
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        bound = math.sqrt(6.0 / (fan_in + proj.out_channels))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)
        if stop_grad_conv1:  # a frozen random patch projection
            proj.weight.requires_grad = False
            proj.bias.requires_grad = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x 3 x H x W -> the cls token after the final LayerNorm, N x D."""
        tokens = self._process_input(x)  # N x S x D
        cls = self.class_token.expand(tokens.shape[0], -1, -1)
        return self.encoder(torch.cat([cls, tokens], dim=1))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """moco-v3's fixed 2D sin-cos embedding for a grid x grid of patches plus the cls slot (zeros):
    1 x (1 + grid^2) x dim. Patch k (row-major) at (a, b) = (k // grid, k % grid) gets
    [sin(a w), cos(a w), sin(b w), cos(b w)] with w_i = temperature^(-i / (dim / 4))."""
    if dim % 4:
        raise ValueError(f"the 2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # dim/4
    a, b = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    out_a, out_b = a.flatten()[:, None] * omega, b.flatten()[:, None] * omega  # grid^2 x dim/4
    patches = torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), patches])[None]


def build(arch: str, num_classes: int, small_stem: bool = False, image_size: int | None = None,
          stop_grad_conv1: bool = False, **kwargs: Any) -> nn.Module:
    """`arch` (VARIANTS) for `image_size` pixels (default the variant's), `num_classes` outputs."""
    if small_stem:
        raise ValueError(f"--small-stem is a ResNet stem; {arch} takes small images through its patch size "
                         "(the _p4 variants for 32 pixels)")
    if kwargs:
        raise TypeError(f"{arch} takes no options {sorted(kwargs)}")
    patch, width, depth, heads, default_size = VARIANTS[arch]
    size = image_size or default_size
    if size % patch:
        raise ValueError(f"{arch}: image size {size} is not a multiple of its patch size {patch}")
    return VisionTransformer(size, patch, width, depth, heads, num_classes, stop_grad_conv1)


def owns(net: nn.Module) -> bool:
    return isinstance(net, VisionTransformer)


def feature_dim(net: nn.Module) -> int:
    return net.hidden_dim


def forward_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_features(x)


def describe(weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The image size and variant the weights were trained for (patch size and grid from their shapes)."""
    width, _, patch, _ = weights[MARKER].shape
    grid = math.isqrt(weights["encoder.pos_embedding"].shape[1] - 1)
    blocks = len({k.split(".")[2] for k in weights if k.startswith("encoder.layers.")})
    arch = next((name for name, (p, w, d, _, _) in VARIANTS.items() if (p, w, d) == (patch, width, blocks)), None)
    return {"small_stem": False, "image_size": grid * patch, "arch": arch}


def rebuild_options(weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The constructor keywords that rebuild the network the weights came from: its image size."""
    return {"image_size": describe(weights)["image_size"]}


def flag_options(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor keywords main_pretrain.py's flags give: image size, stop-grad conv1."""
    return {"image_size": flags.get("image_size"), "stop_grad_conv1": bool(flags.get("stop_grad_conv1"))}


# moco-v3's ViTs are timm's: their parameter names, and the torchvision names they map onto.
_TIMM_TOP = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
             "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias",
             "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias"}
_TIMM_BLOCK = {"norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight",
               "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
               "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
FOREIGN_MARKER = "patch_embed.proj.weight"  # a timm ViT's key


def from_timm_names(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """`state`'s timm ViT (under `prefix`, e.g. moco-v3's 'module.base_encoder.') under this
    family's names; its other keys kept as they are. A key of the ViT that has no counterpart is a
    KeyError naming it, never dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        name = key[len(prefix):]
        if name in _TIMM_TOP:
            new = _TIMM_TOP[name]
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            part = next((t for t in _TIMM_BLOCK if rest == t or rest.startswith(t + ".")), None)
            if part is None:
                raise KeyError(f"{key}: a timm ViT block key with no counterpart in torchvision's ViT")
            new = f"encoder.layers.encoder_layer_{i}.{_TIMM_BLOCK[part]}{rest[len(part):]}"
        elif name.startswith("head."):
            new = name
        else:
            raise KeyError(f"{key}: a timm ViT key with no counterpart in torchvision's ViT")
        out[prefix + new] = value
    return out
