"""Correspondence-aware attention (CAA) and its attachment to a diffusers Stable Diffusion UNet.

MVDiffusion keeps the pretrained SD UNet frozen and adds one CAA block after every down block, after the first
resnet of the mid block and after every up block (each before the block's down/upsampler; the down path's skip
connections keep the pre-CAA features). A CAA block lets every pixel of a view attend to the ``3 x 3`` neighbourhoods
around its corresponding pixels in the neighbouring views (one query token, ``neighbours * 9`` key tokens, each key
carrying a positional encoding of its offset from the query) and adds the result to the view's features: a
transformer block whose output projections start at zero, so an untrained block is the identity.

Parameter names follow the official release (``cp_blocks_encoder.<i>``, ``cp_blocks_mid``, ``cp_blocks_decoder.<i>``;
inside, ``transformer.attn1.to_q`` ... ``pe.freq_bands``) so its checkpoint maps by prefix (see :mod:`.loading`).
The blocks run through forward pre-hooks on the UNet's own modules, so the UNet itself, its forward and its weights
stay diffusers' and a block with zero output projections leaves the UNet's output bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .correspondence import Camera, Neighbourhood, homography, neighbourhood


class PositionalEncoding(nn.Module):
    """``(x, y) -> [sin(x f), sin(y f), cos(x f), cos(y f)]`` over ``channels // 4`` frequencies ``f`` (powers of 2
    up to 80 frequencies, a slower geometric series beyond, as the official release); output has ``channels``.

    The frequencies reach 2**79: they are computed in float32 on every call (float16 would overflow to inf). The
    ``freq_bands`` buffer only keeps the official state-dict layout."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % 4:
            raise ValueError(f"correspondence attention needs channels divisible by 4, got {channels}")
        self.register_buffer("freq_bands", self.frequencies(channels // 4)[None, None])

    @staticmethod
    def frequencies(n: int) -> torch.Tensor:
        base = 2.0 if n <= 80 else 5000 ** (1 / (n / 2.5))
        return base ** torch.linspace(0, n - 1, n)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        freqs = self.frequencies(self.freq_bands.shape[-1]).to(xy.device)
        angles = xy.float()[..., :, None] * freqs  # [..., 2, n]
        return torch.cat([angles.sin(), angles.cos()], dim=-2).flatten(-2).to(xy.dtype)


class Attention(nn.Module):
    """Multi-head attention of query tokens over key tokens (no bias on q, k, v)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        nn.init.zeros_(self.to_out.weight)  # zero output: a new block starts as the identity (official init)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def split(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        if q.shape[2] == 1:  # one query over a few keys (CAA): two memory-bound passes beat a fused kernel's tiles
            weights = ((q * k).sum(-1, keepdim=True) * q.shape[-1] ** -0.5).softmax(dim=2)
            out = (weights * v).sum(2, keepdim=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(-2))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CorrespondenceTransformer(nn.Module):
    """Pre-norm attention from the query to its keys (one shared LayerNorm), then a GEGLU feed-forward; residuals."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x + query_pe), self.norm1(context)) + x
        return self.ff(self.norm2(x)) + x


@dataclass
class ViewGroup:
    """Rows of the UNet batch that are views of one request denoised jointly (one CFG branch): ``rows[i]``'s
    neighbours are the rows ``neighbours[i]``; ``forward``/``backward`` the homographies ``[m, n, 3, 3]`` from view i
    to its neighbours and back; ``image_hw`` the views' size in image pixels."""

    rows: torch.Tensor  # [m]
    neighbours: torch.Tensor  # [m, n] rows of the batch
    forward: torch.Tensor
    backward: torch.Tensor
    image_hw: tuple[int, int]
    _levels: dict[Any, Any] = field(default_factory=dict)  # per-level geometry, shareable between groups

    def level(self, hw: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Neighbourhood:
        """The neighbourhoods at one feature size, on ``device``: the ``grid_sample`` grid ``[m*n, k*h, w, 2]`` (in
        ``dtype``) as ``position``, ``valid`` and float32 ``offset``. Cached: computed once per size and device."""
        key = (hw, str(device), dtype)
        if key not in self._levels:
            nb = neighbourhood(self.forward.flatten(0, 1), self.backward.flatten(0, 1), hw, self.image_hw)
            h, w = hw
            size = torch.tensor([max(w - 1, 1), max(h - 1, 1)], dtype=nb.position.dtype)
            grid = (nb.position / size * 2 - 1).flatten(1, 2)  # align_corners=True normalisation
            self._levels[key] = Neighbourhood(grid.to(device, dtype), nb.valid.to(device),
                                              nb.offset.to(device, torch.float32))
        return self._levels[key]

    def encoding(self, hw: tuple[int, int], device: torch.device, dtype: torch.dtype,
                 pe: "PositionalEncoding") -> tuple[torch.Tensor, torch.Tensor]:
        """In the key tokens' layout ``[m, h, w, n*k, c]``: their positional encodings, zero where a sample is
        invalid, and the validity ``[m, h, w, n*k, 1]``. They depend on the geometry alone, so they are cached per
        level and channel count (and shared by groups of equal cameras)."""
        key = ("pe", hw, str(device), dtype, pe.freq_bands.shape[-1])
        if key not in self._levels:
            nb = self.level(hw, device, dtype)
            m, n = self.neighbours.shape
            valid = nb.valid.to(dtype).unflatten(0, (m, n)).permute(0, 3, 4, 1, 2).flatten(3)[..., None]
            enc = pe(nb.offset).to(dtype).unflatten(0, (m, n)).permute(0, 3, 4, 1, 2, 5).flatten(3, 4)
            self._levels[key] = ((enc * valid).contiguous(), valid.contiguous())
        return self._levels[key]


def view_group(rows: list[int], cameras: list[Camera], neighbors: str = "ring",
               cache: dict | None = None) -> ViewGroup:
    """The group of batch ``rows`` (views with ``cameras``, all one size): ``ring`` pairs each view with the previous
    and next view in the list, cyclic (the official model; two views see each other twice, which attention cannot
    tell from once), ``all`` with every other view. ``cache``: a level cache to share with a group of the same
    cameras and neighbours (the other CFG branch)."""
    m = len(rows)
    if neighbors == "ring":
        slots = [[(i - 1) % m, (i + 1) % m] for i in range(m)]
    else:
        slots = [[j for j in range(m) if j != i] for i in range(m)]
    fwd = torch.stack([torch.stack([homography(cameras[i], cameras[j]) for j in s]) for i, s in enumerate(slots)])
    bwd = torch.stack([torch.stack([homography(cameras[j], cameras[i]) for j in s]) for i, s in enumerate(slots)])
    rows_t = torch.tensor(rows)
    return ViewGroup(rows_t, rows_t[torch.tensor(slots)], fwd, bwd, (cameras[0].height, cameras[0].width),
                     cache if cache is not None else {})


@dataclass
class Plan:
    """What the CAA blocks need for one UNet call: the batch size and its view groups."""

    batch: int
    groups: list[ViewGroup]


class CorrespondenceAttention(nn.Module):
    """One CAA block (the official ``CPAttn``): ``dim // 32`` heads of 32 channels (one head of ``dim`` channels
    below 32 channels, for tiny test models)."""

    def __init__(self, dim: int, head_dim: int = 32):
        super().__init__()
        heads = max(1, dim // head_dim)
        self.transformer = CorrespondenceTransformer(dim, heads, dim // heads)
        self.pe = PositionalEncoding(dim)

    def forward(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        out = x
        for group in plan.groups:
            out = out.index_copy(0, group.rows.to(x.device), self._group(x, group))
        return out

    def _group(self, x: torch.Tensor, group: ViewGroup) -> torch.Tensor:
        m, n = group.neighbours.shape
        _, c, h, w = x.shape
        nb = group.level((h, w), x.device, x.dtype)
        k = nb.valid.shape[1]
        keys = x.index_select(0, group.neighbours.flatten().to(x.device))
        samples = F.grid_sample(keys, nb.position, mode="bilinear", padding_mode="zeros", align_corners=True)
        samples = samples.view(m, n, c, k, h, w).permute(0, 4, 5, 1, 3, 2).reshape(m, h, w, n * k, c)
        encoding, valid = group.encoding((h, w), x.device, x.dtype, self.pe)
        tokens = torch.addcmul(encoding, samples, valid).reshape(m * h * w, n * k, c)  # invalid samples: zero tokens
        query = x.index_select(0, group.rows.to(x.device)).permute(0, 2, 3, 1).reshape(m * h * w, 1, c)
        query_pe = self.pe(torch.zeros(2, dtype=x.dtype, device=x.device))
        out = self.transformer(query, tokens, query_pe)
        return out.reshape(m, h, w, c).permute(0, 3, 1, 2)


class CorrespondenceBlocks(nn.Module):
    """The CAA blocks of one UNet, hooked into it with :meth:`attach`. Set :attr:`plan` before each UNet call; with
    no plan (or a plan without groups) the UNet runs unchanged. The plan stays set after the call so that gradient
    checkpointing recomputes the same forward in the backward pass."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.cp_blocks_encoder = nn.ModuleList(CorrespondenceAttention(b.resnets[-1].out_channels)
                                               for b in unet.down_blocks)
        self.cp_blocks_mid = CorrespondenceAttention(unet.mid_block.resnets[-1].out_channels)
        self.cp_blocks_decoder = nn.ModuleList(CorrespondenceAttention(b.resnets[-1].out_channels)
                                               for b in unet.up_blocks)
        self.plan: Plan | None = None
        self.calls: dict[str, int] = {}  # hook name -> times it ran with a plan (for tests and stats)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @staticmethod
    def sites(unet: nn.Module) -> list[tuple[str, nn.Module]]:
        """(block name, the UNet module whose input it transforms), in UNet order."""
        out = []
        for i, block in enumerate(unet.down_blocks):
            nxt = block.downsamplers[0] if block.downsamplers else unet.mid_block
            out.append((f"cp_blocks_encoder.{i}", nxt))
        out.append(("cp_blocks_mid", unet.mid_block.attentions[0]))
        for i, block in enumerate(unet.up_blocks):
            nxt = block.upsamplers[0] if block.upsamplers else unet.conv_norm_out
            out.append((f"cp_blocks_decoder.{i}", nxt))
        return out

    def attach(self, unet: nn.Module) -> None:
        if self._handles:
            raise RuntimeError("correspondence blocks are already attached to a UNet")
        for name, module in self.sites(unet):
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        block = self.get_submodule(name)

        def pre_hook(module, args, kwargs):
            plan = self.plan
            if plan is None or not plan.groups:
                return None
            if args:
                x, rest = args[0], args[1:]
            else:
                x, rest = kwargs.pop("hidden_states"), ()
            if x.shape[0] != plan.batch:
                raise RuntimeError(f"{name}: UNet batch of {x.shape[0]} rows, but the view plan has {plan.batch}")
            self.calls[name] = self.calls.get(name, 0) + 1
            y = block(x, plan)
            if args:
                return (y, *rest), kwargs
            kwargs["hidden_states"] = y
            return args, kwargs

        return pre_hook
