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

DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021;
facebookresearch/dino vision_transformer.py) builds the same network with other choices, here
`init="dino"`: a learned position embedding and cls token drawn from a normal truncated at +-2
with std .02, every Linear the same with zero bias, LayerNorms 1/0, the patch projection with
PyTorch's default Conv2d initialisation; stochastic depth (`drop_path_rate`, per sample, rising
linearly over the blocks, on both residual branches); inputs of other sizes than the network's
through its bicubic interpolation of the position embedding (its 96-pixel local crops); and for
its linear evaluation the cls tokens of the last blocks and the mean of the patch tokens
(`forward_features(net, x, n_last_blocks, avgpool)`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn as nn
import torchvision

# name -> (patch size, width, blocks, attention heads, default image size). ViT-Small exists in two
# published forms that share every tensor shape and differ only in their head count, which the
# weights cannot tell (so a checkpoint records it, see `record`):
# * moco-v3's (vits.py: vit_small = patch 16, embed_dim 384, depth 12, num_heads=12; vit_base =
#   768, 12, num_heads=12): `vit_small`, `vit_base`;
# * DeiT's, which DINO (vision_transformer.py: vit_small ... num_heads=6) and timm
#   (vit_small_patch16_224) train: `deit_small` (patch 16) and `deit_small_p8` (DINO's ViT-S/8).
# ViT-Base has 12 heads in both (DINO's vit_base: num_heads=12); `vit_base_p8` is DINO's ViT-B/8.
# The _p4 variants are for 32-pixel images (an 8 x 8 grid of patches, as the ImageNet models'
# 14 x 14 at 224).
VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    "vit_small": (16, 384, 12, 12, 224),
    "vit_base": (16, 768, 12, 12, 224),
    "vit_base_p8": (8, 768, 12, 12, 224),
    "deit_small": (16, 384, 12, 6, 224),
    "deit_small_p8": (8, 384, 12, 6, 224),
    "vit_small_p4": (4, 384, 12, 12, 32),
    "vit_base_p4": (4, 768, 12, 12, 32),
    "deit_small_p4": (4, 384, 12, 6, 32),
}
# What this project's checkpoints written before they recorded the head count hold (their vit_small
# then had 6 heads, as deit_small now), and the names those ViTs have now: what a run folder of
# that time resumes as.
LEGACY_RECORD = {"num_heads": 6}
LEGACY_NAMES = {"vit_small": "deit_small", "vit_small_p4": "deit_small_p4"}
# The head count each publisher's ViTs have, by width, for checkpoints that do not record it:
# moco-v3's (12 whatever the width) and timm's names as timm and DINO save them (DeiT's: 64 per head).
# DINO's files (origin 'dino') hold its vision_transformer.py's vit_small (num_heads=6) and vit_base (12).
PUBLISHED_HEADS: dict[str, dict[int, int]] = {"moco-v3": {384: 12, 768: 12}, "timm": {384: 6, 768: 12},
                                              "dino": {384: 6, 768: 12}}
# The initialisations `build` takes (main_pretrain.py's --vit-init): moco-v3's and DINO's.
INITS = ("mocov3", "dino")
# The options of `forward_features` beyond the default features (selfsup.backbones.forward_features).
FEATURE_OPTIONS = ("n_last_blocks", "avgpool")
ARCHS = tuple(VARIANTS)
TITLE = "Vision Transformer"
HEAD = "head"
MARKER = "conv_proj.weight"


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample, DINO's formula (vision_transformer.py drop_path): each sample's
    branch `x` (N x ...) is zeroed with probability `drop_prob` and the others scaled by
    1 / (1 - drop_prob). The draws come from torch's global generator (torch.rand), none when
    `drop_prob` is 0 or not `training`."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # N x 1 x ... x 1: one draw per sample
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()  # 1 with probability keep_prob, else 0
    return x.div(keep_prob) * random_tensor


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """DINO's stochastic depth decay rule: block i of `depth` drops its branches with probability
    i * rate / (depth - 1), from 0 at the first block to `rate` at the last (as float32's linspace
    gives them: `[x.item() for x in torch.linspace(0, drop_path_rate, depth)]`)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"the drop path rate is a probability in [0, 1), got {rate}")
    return [x.item() for x in torch.linspace(0, rate, depth)]


class VisionTransformer(torchvision.models.VisionTransformer):
    """torchvision's ViT with moco-v3's position embedding, initialisation and stop-grad conv1
    (`init="mocov3"`) or DINO's (`init="dino"`), DINO's stochastic depth (`drop_path_rate`) and
    inputs of any size that is a multiple of the patch; the classifier is `head` (torchvision's
    `heads` holds nothing). The blocks are torchvision's `EncoderBlock`s, run by `_block` (their
    forward with a drop path on each residual branch): the state dict is torchvision's."""

    def __init__(self, image_size: int, patch_size: int, hidden_dim: int, num_layers: int, num_heads: int,
                 num_classes: int = 1000, stop_grad_conv1: bool = False, init: str = "mocov3",
                 drop_path_rate: float = 0.0) -> None:
        if init not in INITS:
            raise ValueError(f"unknown ViT initialisation '{init}'; valid: {', '.join(INITS)}")
        super().__init__(image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
                         hidden_dim=hidden_dim, mlp_dim=4 * hidden_dim, num_classes=1,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.heads = nn.Identity()
        self.head = nn.Linear(hidden_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init = init
        if init == "mocov3":
            grid = image_size // patch_size
            with torch.no_grad():
                self.encoder.pos_embedding.copy_(sincos_position_embedding(grid, hidden_dim))
            self.encoder.pos_embedding.requires_grad = False  # fixed, as moco-v3's
            self._init_weights(stop_grad_conv1)
        else:
            self._init_dino_weights(stop_grad_conv1)
        self.drop_path_rates = drop_path_rates(drop_path_rate, num_layers)  # per block
        self.drop_path_rate = drop_path_rate

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

    def _init_dino_weights(self, stop_grad_conv1: bool) -> None:
        """DINO's VisionTransformer.__init__ and _init_weights: trunc_normal_(std=.02) (its utils'
        bounds, -2 and 2, absolute as torch's) for the position embedding, the cls token and every
        Linear - the attention's query/key/value projection is one Linear there, one matrix here -
        with zero biases; LayerNorms 1/0; its PatchEmbed's Conv2d keeps PyTorch's default init."""
        nn.init.trunc_normal_(self.encoder.pos_embedding, std=0.02)
        nn.init.trunc_normal_(self.class_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.trunc_normal_(module.in_proj_weight, std=0.02)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.conv_proj.reset_parameters()  # torchvision's own init replaced by nn.Conv2d's, as DINO's
        if stop_grad_conv1:
            self.conv_proj.weight.requires_grad = False
            self.conv_proj.bias.requires_grad = False

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """The position embedding for an input of height x width pixels: 1 x (1 + h w) x D for its
        h x w patches. DINO's interpolate_pos_encoding: the stored one when the input is square with
        as many patches, else its patch part resized bicubically with scale factors
        (h + 0.1) / grid and (w + 0.1) / grid - the 0.1 against floating point error in the output
        size, facebookresearch/dino#8 - the cls slot unchanged.

        moco-v3's fixed sin-cos embedding is interpolated the same way, not recomputed for the new
        grid: DINO's code interpolates whatever embedding its network holds, so DINO with moco-v3's
        init sees here what it would see there; and a recomputed one would give a 96-pixel crop
        the positions 0..5 of the global crop's top-left corner, where the interpolation spreads
        the global grid's span (0..13) over its 6 x 6 patches."""
        pos = self.encoder.pos_embedding  # 1 x (1 + grid^2) x D
        h, w = height // self.patch_size, width // self.patch_size
        n = pos.shape[1] - 1
        if h * w == n and height == width:
            return pos
        grid, dim = math.sqrt(n), pos.shape[-1]
        patches = pos[:, 1:].reshape(1, int(grid), int(grid), dim).permute(0, 3, 1, 2)  # 1 x D x grid x grid
        patches = nn.functional.interpolate(patches, scale_factor=((h + 0.1) / grid, (w + 0.1) / grid),
                                            mode="bicubic")  # 1 x D x h x w
        if patches.shape[-2:] != (h, w):
            raise ValueError(f"interpolating the position embedding to {h} x {w} patches gave "
                             f"{tuple(patches.shape[-2:])}")
        return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, h * w, dim)], dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x 3 x H x W -> N x (1 + S) x D: cls token and patch tokens (row-major) with their
        position embedding (interpolated for another size than the network's), before the blocks."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"a {height} x {width} input is not a whole number of {self.patch_size}-pixel patches")
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)  # N x S x D
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.encoder.dropout(tokens + self.interpolate_pos_encoding(height, width))

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i: torchvision's EncoderBlock.forward with a drop path on each residual branch
        (DINO's Block.forward: the attention's, then the MLP's, each its own draw)."""
        block, p = self.encoder.layers[i], self.drop_path_rates[i]
        y = block.ln_1(x)
        y, _ = block.self_attention(y, y, y, need_weights=False)
        x = x + drop_path(block.dropout(y), p, self.training)
        return x + drop_path(block.mlp(block.ln_2(x)), p, self.training)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The tokens after each of the last `n` blocks, each through the final LayerNorm (DINO's
        get_intermediate_layers): n tensors of N x (1 + S) x D, the last block's last."""
        depth = len(self.encoder.layers)
        if not 1 <= n <= depth:
            raise ValueError(f"n_last_blocks must be between 1 and the network's {depth} blocks, got {n}")
        x, out = self.prepare_tokens(x), []
        for i in range(depth):
            x = self._block(i, x)
            if depth - i <= n:
                out.append(self.encoder.ln(x))
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x 3 x H x W -> the cls token after the final LayerNorm, N x D."""
        x = self.prepare_tokens(x)
        for i in range(len(self.encoder.layers)):
            x = self._block(i, x)
        return self.encoder.ln(x)[:, 0]

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
          stop_grad_conv1: bool = False, init: str = "mocov3", drop_path_rate: float = 0.0,
          **kwargs: Any) -> nn.Module:
    """`arch` (VARIANTS) for `image_size` pixels (default the variant's), `num_classes` outputs;
    `init` moco-v3's ("mocov3": fixed sin-cos position embedding, xavier) or DINO's ("dino":
    learned position embedding, trunc_normal .02); `drop_path_rate` DINO's stochastic depth at the
    last block (0: none)."""
    if small_stem:
        raise ValueError(f"--small-stem is a ResNet stem; {arch} takes small images through its patch size "
                         "(the _p4 variants for 32 pixels)")
    if kwargs:
        raise TypeError(f"{arch} takes no options {sorted(kwargs)}")
    patch, width, depth, heads, default_size = VARIANTS[arch]
    size = image_size or default_size
    if size % patch:
        lower, upper = size // patch * patch, (size // patch + 1) * patch
        sizes = f"{lower} or {upper}" if lower else str(upper)
        raise ValueError(f"{arch}: image size {size} is not a multiple of its patch size {patch}; use --image-size "
                         f"{sizes}" + (" (or a _p4 variant for small images)" if patch > 4 else ""))
    return VisionTransformer(size, patch, width, depth, heads, num_classes, stop_grad_conv1, init, drop_path_rate)


def owns(net: nn.Module) -> bool:
    return isinstance(net, VisionTransformer)


def _check_feature_options(net: nn.Module, n_last_blocks: int, avgpool: bool) -> None:
    depth = len(net.encoder.layers)
    if not isinstance(n_last_blocks, int) or not 1 <= n_last_blocks <= depth:
        raise ValueError(f"n_last_blocks must be an integer between 1 and the network's {depth} blocks, "
                         f"got {n_last_blocks!r}")
    if avgpool and n_last_blocks != 1:  # eval_linear.py's concatenation fails on these shapes too
        raise ValueError(f"avgpool pairs the last block's cls token with its mean patch token (DINO's "
                         f"--avgpool_patchtokens, with --n_last_blocks 1), not with {n_last_blocks} blocks")


def feature_dim(net: nn.Module, n_last_blocks: int = 1, avgpool: bool = False) -> int:
    """The width of `forward_features(net, x, n_last_blocks, avgpool)`: D x (n_last_blocks + avgpool),
    eval_linear.py's embed_dim."""
    _check_feature_options(net, n_last_blocks, avgpool)
    return net.hidden_dim * (n_last_blocks + int(avgpool))


def forward_features(net: nn.Module, x: torch.Tensor, n_last_blocks: int = 1, avgpool: bool = False) -> torch.Tensor:
    """x: N x 3 x H x W -> N x feature_dim. By default the cls token after the final LayerNorm (what
    moco-v3's linear evaluation and DINO's kNN, `model(inp)`, read). DINO's linear evaluation
    (eval_linear.py): the cls tokens of the last `n_last_blocks` blocks, each after the final
    norm, concatenated (its ViT-S: 4); with `avgpool` (its ViT-B, with 1 block) the cls token and
    the mean of the patch tokens interleaved feature by feature - [cls_0, mean_0, cls_1, mean_1,
    ...], as its torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(N, -1) lays
    them out, so that its trained classifiers read them."""
    _check_feature_options(net, n_last_blocks, avgpool)
    if n_last_blocks == 1 and not avgpool:
        return net.forward_features(x)
    blocks = net.get_intermediate_layers(x, n_last_blocks)  # n_last_blocks x (N x (1 + S) x D)
    out = torch.cat([tokens[:, 0] for tokens in blocks], dim=-1)  # N x (n_last_blocks D)
    if avgpool:
        mean = blocks[-1][:, 1:].mean(dim=1)  # N x D
        out = torch.stack([out, mean], dim=-1).reshape(out.shape[0], -1)  # N x 2D, interleaved
    return out


def set_drop_path(net: nn.Module, rate: float) -> None:
    """Set the stochastic depth of a built ViT to DINO's rule for `rate` (`drop_path_rates`; 0:
    none) - DINO's teacher, a copy of the student built without it."""
    net.drop_path_rates = drop_path_rates(rate, len(net.encoder.layers))
    net.drop_path_rate = rate


def describe(weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the weights say about the network: the image size it was trained for (patch size and
    grid from their shapes), its patch size, width and depth - not its head count, which no
    tensor shape holds (`identify`)."""
    width, _, patch, _ = weights[MARKER].shape
    grid = math.isqrt(weights["encoder.pos_embedding"].shape[1] - 1)
    blocks = len({k.split(".")[2] for k in weights if k.startswith("encoder.layers.")})
    return {"small_stem": False, "image_size": grid * patch, "patch": patch, "width": width, "depth": blocks}


def record(net: nn.Module) -> dict[str, Any]:
    """What a checkpoint must record beside the weights to rebuild `net`: its head count."""
    return {"num_heads": net.encoder.layers[0].self_attention.num_heads}


def identify(weights: Mapping[str, torch.Tensor], arch: str | None, recorded: Mapping[str, Any] | None,
             origin: str | None) -> str:
    """The variant (a VARIANTS name) the weights belong to. The shapes give patch, width and depth;
    the head count comes from the checkpoint's record (`record`, this project's checkpoints), else
    from who published it (`origin`: 'moco-v3' or 'timm', PUBLISHED_HEADS), else from the shapes
    when every variant with them has one count (ViT-Base). `arch` (a name the checkpoint or the
    user gives) must fit the shapes and the known count; without a count it decides. A ViT-S whose
    count nothing tells is a ValueError naming the choices - never a guess."""
    d = describe(weights)
    fitting = {name: spec[3] for name, spec in VARIANTS.items() if spec[:3] == (d["patch"], d["width"], d["depth"])}
    shape = f"a ViT with patch {d['patch']}, width {d['width']} and {d['depth']} blocks"
    if not fitting:
        raise ValueError(f"the checkpoint holds {shape}, which no variant here has ({', '.join(VARIANTS)})")
    heads = (recorded or {}).get("num_heads")
    if heads is None and origin in PUBLISHED_HEADS:
        heads = PUBLISHED_HEADS[origin].get(d["width"])
    if heads is None and len(set(fitting.values())) == 1:
        heads = next(iter(fitting.values()))
    choices = ", ".join(f"-a {name} ({h} heads)" for name, h in fitting.items())
    if arch is not None:
        if arch not in fitting:
            raise ValueError(f"the checkpoint holds {shape}, not a {arch}: {choices}")
        if heads is not None and fitting[arch] != heads:
            raise ValueError(f"the checkpoint's ViT has {heads} attention heads, {arch} has {fitting[arch]}: {choices}")
        return arch
    if heads is None:
        raise ValueError(
            f"the checkpoint holds {shape} but does not say how many attention heads it has, which its weights "
            f"cannot tell (moco-v3's ViT-S has 12, DeiT/DINO/timm's 6; this project's checkpoints record it, those "
            f"written before it did held 6): name the network with {' or '.join(c.split(' (')[0] for c in choices.split(', '))}")
    named = [name for name, h in fitting.items() if h == heads]
    if not named:
        raise ValueError(f"the checkpoint holds {shape} with {heads} attention heads, which no variant here has: {choices}")
    return named[0]


def rebuild_options(weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The constructor keywords that rebuild the network the weights came from: its image size."""
    return {"image_size": describe(weights)["image_size"]}


def flag_options(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor keywords main_pretrain.py's flags give: image size, stop-grad conv1, the
    initialisation (--vit-init: `init`) and the stochastic depth (--drop-path-rate: `drop_path_rate`)."""
    return {"image_size": flags.get("image_size"), "stop_grad_conv1": bool(flags.get("stop_grad_conv1")),
            "init": flags.get("vit_init") or "mocov3", "drop_path_rate": float(flags.get("drop_path_rate") or 0.0)}


# moco-v3's ViTs are timm's: their parameter names, and the torchvision names they map onto.
_TIMM_TOP = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
             "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias",
             "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias"}
_TIMM_BLOCK = {"norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight",
               "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
               "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
FOREIGN_MARKER = "patch_embed.proj.weight"  # a timm ViT's key


def foreign_origin(state: Mapping[str, torch.Tensor], prefix: str) -> str:
    """Who published a ViT saved under timm's names at `prefix`: 'moco-v3' when its position
    embedding is moco-v3's fixed 2D sin-cos one (its convert_to_deit.py writes its ViTs so), else
    'timm' - timm's, DeiT's and DINO's ViTs learn their position embedding."""
    pos = state[f"{prefix}pos_embed"].float()
    grid, dim = math.isqrt(pos.shape[1] - 1), pos.shape[2]
    if grid * grid + 1 != pos.shape[1] or dim % 4:
        return "timm"
    gap = (pos - sincos_position_embedding(grid, dim)).abs().max().item()
    if gap <= 1e-6:
        return "moco-v3"
    # Close but not equal: moco-v3's embedding stored in half precision (2e-3 in bf16), or one
    # learned from it - which publisher, the weights no longer say.
    return "timm" if gap > 1e-2 else "unknown"


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
