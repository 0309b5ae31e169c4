"""Reconstruction units of diffusers denoisers, and the channel splits of UNet up blocks.

A *unit* is the piece of the denoiser that block reconstruction (BRECQ) optimises at once:

  * each resnet block (``ResnetBlock2D`` and its variants): norms, convs, its ``time_emb_proj``
    and its shortcut conv;
  * each attention block: a ``Transformer2DModel`` (proj_in, its transformer blocks, proj_out)
    as one unit, or a bare diffusers ``Attention`` (pixel / latent UNets' attention blocks);
  * each transformer block of a DiT / PixArt (``BasicTransformerBlock``: its attentions, its
    feed-forward and, in a DiT, its own adaLN embedder and modulation linear);
  * each time / class embedding MLP (``TimestepEmbedding``: ``linear_1`` and ``linear_2``);
  * every quantized layer outside those ("loose" layers): ``conv_in``, ``conv_out``, the
    upsampler and downsampler convs; a transformer's patch embedding, caption projection and
    final projections.

Units are ordered by the order in which they first run in a forward pass (module registration
order differs: e.g. diffusers registers ``up_blocks`` before ``mid_block`` and a block's
attentions before its resnets).

Split shortcut (Q-Diffusion). In every up block the resnet input is
``torch.cat([h, skip], dim=1)``: ``h`` (the upsampled / previous feature) and the skip feature
from the down path have very different ranges. Inside ``ResnetBlock2D`` that concatenation is
read by two paths:

  * ``conv_shortcut`` (the 1x1 conv that matches channel counts) reads the RAW concatenation;
  * ``conv1`` reads ``SiLU(GroupNorm(concat))``. GroupNorm and SiLU keep the channel layout, so
    its input still consists of the same two channel groups, at the same index, with ranges
    set by the two groups' different norm affines.

``norm1`` also reads the raw concatenation but is not quantized. :func:`shortcut_splits` gives
both quantized readers, ``<resnet>.conv_shortcut`` and ``<resnet>.conv1``, the channel index
where the skip group starts; ``WrapSpec.splits`` turns their input quantizers into
:class:`~tfmq.quant.layers.GroupActQuantizer` (one range per group). Only the *input*
activation is split; weights stay per output channel. Under a layer policy that keeps those
inputs in full precision (``tfmq-official`` keeps both), the split has nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..hooks import temporary_hooks
from ..quant.layers import QuantLayer
from ..quant.model import quant_layers
from .adapter import call_denoiser
from ..quant.quantizer import UniformQuantizer


@dataclass
class Unit:
    """One reconstruction unit.

    Attributes:
        name: the module's name in the denoiser (a layer's name for loose layers).
        module: the module whose forward is the unit.
        kind: ``resnet``, ``transformer``, ``attention``, ``embedding`` or ``layer``.
        layers: the unit's quantized layers, by their full names.
    """
    name: str
    module: nn.Module
    kind: str
    layers: dict[str, QuantLayer] = field(default_factory=dict)

    def weight_layers(self, exclude=()) -> dict[str, QuantLayer]:
        """Layers whose weights are quantized (rounding can be learned), minus ``exclude``."""
        return {n: l for n, l in self.layers.items()
                if l.weight_quantizer is not None and n not in exclude}

    def act_quantizers(self) -> dict[str, UniformQuantizer]:
        """Per-tensor activation quantizers inside the unit (layer inputs, split groups,
        attention q / k / v / softmax), by their full names."""
        return {f"{self.name}.{n}": m for n, m in self.module.named_modules()
                if isinstance(m, UniformQuantizer) and m.channel_axis is None}


def _block_kind(module: nn.Module) -> str | None:
    cls = type(module).__name__
    if cls.startswith("ResnetBlock"):
        return "resnet"
    if cls in ("Transformer2DModel", "DualTransformer2DModel", "BasicTransformerBlock"):
        return "transformer"
    if cls == "Attention":
        return "attention"
    if cls == "TimestepEmbedding":
        return "embedding"
    return None


def find_units(denoiser: nn.Module) -> list[Unit]:
    """All units of a wrapped denoiser, in module-registration order (see :func:`order_units`).

    Blocks nest (an ``Attention`` inside a ``Transformer2DModel``): the outermost one is the unit.
    Blocks without any quantized layer or quantizer are left out.
    """
    blocks: list[Unit] = []
    for name, m in denoiser.named_modules():
        kind = _block_kind(m)
        if kind is None or any(name.startswith(b.name + ".") for b in blocks):
            continue
        blocks.append(Unit(name, m, kind))
    units: list[Unit] = []
    for lname, layer in quant_layers(denoiser).items():
        owner = next((b for b in blocks if lname.startswith(b.name + ".")), None)
        if owner is None:
            units.append(Unit(lname, layer, "layer", {lname: layer}))
        else:
            owner.layers[lname] = layer
    keep = [b for b in blocks if b.layers or b.act_quantizers()]
    return keep + units


class _Seen(Exception):
    pass


@torch.no_grad()
def order_units(denoiser: nn.Module, units: list[Unit], example: dict[str, torch.Tensor]) -> list[Unit]:
    """``units`` sorted by when they first run on ``example`` (a one-row denoiser input:
    ``sample``, ``timestep`` and conditioning). Units that never run are dropped. Quantizers are
    bypassed during this probe (their ranges may not be set yet).

    Units whose input is not one row per sample cannot be reconstructed on sample rows (PixArt's
    size-condition embedders read the flattened (height, width) pair: two rows per sample); they
    are dropped with a warning naming them, and keep nearest rounding and their initial ranges.
    """
    import warnings

    from ..quant.model import quant_state
    first: dict[str, int] = {}
    rows: dict[str, int] = {}
    def probe(name):
        def hook(module, args):
            first.setdefault(name, len(first))
            x = next((a for a in args if torch.is_tensor(a)), None)
            if x is not None and x.dim() > 0:
                rows.setdefault(name, x.shape[0])
        return hook
    with temporary_hooks((u.module, probe(u.name)) for u in units), \
            quant_state(denoiser, weight=False, act=False):
        call_denoiser(denoiser, example)
    batch = example["sample"].shape[0]
    unbatched = [u.name for u in units if rows.get(u.name, batch) != batch]
    if unbatched:
        warnings.warn(f"units whose input is not one row per sample are not reconstructed: {unbatched}",
                      stacklevel=2)
    ran = [u for u in units if u.name in first and u.name not in unbatched]
    return sorted(ran, key=lambda u: first[u.name])


def select_units(units: list[Unit], patterns: list[str] | None) -> list[Unit]:
    """Units whose name matches one of the shell-style ``patterns`` (all when None).
    A pattern that matches nothing is an error (a typo would otherwise go unnoticed)."""
    if patterns is None:
        return list(units)
    from fnmatch import fnmatchcase
    chosen = [u for u in units if any(fnmatchcase(u.name, p) for p in patterns)]
    for p in patterns:
        if not any(fnmatchcase(u.name, p) for u in units):
            names = ", ".join(u.name for u in units[:8])
            raise ValueError(f"reconstruction unit pattern {p!r} matches no unit (units are e.g. {names}, ...)")
    return chosen


# ---- split shortcut ---------------------------------------------------------------------
def _out_channels(module: nn.Module) -> int:
    v = getattr(module, "out_channels", None)
    if isinstance(v, int):
        return v
    conv = getattr(module, "conv", None)
    if isinstance(conv, nn.Conv2d):
        return conv.out_channels
    raise TypeError(f"cannot tell the output channels of {type(module).__name__}")


def shortcut_splits(denoiser: nn.Module) -> dict[str, int]:
    """Layer name -> channel index where the skip group starts, for the layers that read an up
    block's concatenated input (``conv_shortcut`` and ``conv1`` of each up-block resnet; see the
    module docstring). Works on an FP or a wrapped diffusers UNet.

    The feature entering up block ``i``'s resnet ``j`` has the channels of whatever ran just
    before it: resnet ``j - 1`` (attention keeps channels), the previous up block's upsampler or
    last resnet, or the mid block for the first up block. The rest are skip channels.
    """
    up_blocks = getattr(denoiser, "up_blocks", None)
    if up_blocks is None:
        return {}
    mid = getattr(denoiser, "mid_block", None)
    if mid is not None and getattr(mid, "resnets", None):
        prev = _out_channels(mid.resnets[-1])
    else:
        last = denoiser.down_blocks[-1]
        prev = _out_channels(last.downsamplers[-1]) if getattr(last, "downsamplers", None) \
            else _out_channels(last.resnets[-1])
    splits: dict[str, int] = {}
    for i, block in enumerate(up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            in_ch = resnet.in_channels
            if not 0 < prev < in_ch:
                raise RuntimeError(f"up_blocks.{i}.resnets.{j}: input of {in_ch} channels is not "
                                   f"a concatenation of {prev} feature channels and a skip")
            base = f"up_blocks.{i}.resnets.{j}"
            if resnet.conv_shortcut is not None:
                splits[f"{base}.conv_shortcut"] = prev
            splits[f"{base}.conv1"] = prev
            prev = _out_channels(resnet)
        ups = getattr(block, "upsamplers", None)
        if ups:
            prev = _out_channels(ups[-1])
    return splits
