"""The denoiser adapter: everything tfmq needs to know about one family of denoisers.

tfmq's stages (calibration data, reconstruction, TIAR, FSC, the temporal cache, sampling,
evaluation, the runtime) are written once against this protocol; one adapter per family
(:mod:`tfmq.models.unet`, :mod:`tfmq.models.dit`, :mod:`tfmq.models.pixart`) says

* which pipeline component is the denoiser (``unet`` / ``transformer``) and its sample shape;
* how the sampler conditions it: :class:`Conditioning` holds the per-sample inputs besides the
  sample and the timestep as FLAT tensors (``class_labels``, ``encoder_hidden_states``,
  ``encoder_attention_mask``, ``text_embeds``, ``time_ids``, ...) and the inputs the guidance
  half gets instead; calibration data record the same flat rows, and :meth:`forward_kwargs`
  turns a row into the keyword arguments of the model's forward (``added_cond_kwargs``);
* what the model returns (:meth:`epsilon`: a learned-variance half is dropped);
* its temporal information block (TIB, :class:`~tfmq.models.temporal.TemporalBlock`): the modules
  that compute the time (+ class) embedding, the modules whose outputs are the temporal
  features, and how to compute those features for a batch of (timestep, class) pairs.

Reconstruction units, quantizable layers and the layer policy work by module type and name for
every family (:mod:`tfmq.models.units`, :mod:`tfmq.policy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant.layers import QuantLayer


class UnsupportedModelError(ValueError):
    """The pipeline or denoiser is not one tfmq can quantize."""


#: what TFMQ-DM / Q-Diffusion piece a transformer family cannot use (said in evaluation reports)
NO_SPLIT_SHORTCUT = ("Q-Diffusion's split shortcut (transformers have no skip concatenations: "
                     "--set split_shortcut=true changes nothing)")


def unwrap(module: nn.Module) -> nn.Module:
    """The FP layer inside a fake-quant wrapper (the module itself when it is not wrapped)."""
    return module.layer if isinstance(module, QuantLayer) else module


def cycled_prompts(class_labels, prompts, num_images: int) -> list[str]:
    """A text-to-image model's prompt for each of ``num_images`` samples (``prompts`` cycled);
    a clear error for class labels or no prompt."""
    if class_labels is not None:
        raise ValueError("this is a text-to-image model: class labels do not apply")
    if not prompts:
        raise ValueError("this is a text-to-image model: give at least one prompt")
    return [prompts[i % len(prompts)] for i in range(num_images)]


def pixel_size(pipe, denoiser: nn.Module) -> tuple[int, int]:
    """The (height, width) in pixels of the denoiser's native sample size (latent size times the
    pipeline's VAE scale factor, 8 when the pipeline does not say)."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    size = denoiser.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    return h * scale, w * scale


@dataclass
class Conditioning:
    """Per-sample denoiser inputs besides the sample and the timestep.

    ``inputs``: flat tensors whose first dimension is the sample (``class_labels``,
    ``encoder_hidden_states``, ``text_embeds``, ...). ``negative``: the same keys for the
    unconditional half of classifier-free guidance (None: the model has no guidance input).
    """
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    negative: dict[str, torch.Tensor] | None = None

    @property
    def class_labels(self) -> torch.Tensor | None:
        """The class label of every sample (class-conditional models), else None."""
        return self.inputs.get("class_labels")

    def rows(self, idx: slice, guidance: bool) -> dict[str, torch.Tensor]:
        """The inputs of samples ``idx``; with ``guidance`` the negative rows follow (2x batch)."""
        if not guidance:
            return {k: v[idx] for k, v in self.inputs.items()}
        if self.negative is None:
            raise ValueError("guidance scale > 1 needs class labels or prompts")
        return {k: torch.cat([v[idx], self.negative[k][idx]]) for k, v in self.inputs.items()}


@dataclass
class TemporalBlock:
    """The modules of a denoiser's temporal information block (TIB), by name.

    ``embedding``: modules computing the time (+ class) embedding(s), in the order the model
    applies them. ``projections``: feature ``i`` is the output of module ``projections[i]``
    (a UNet resnet's ``time_emb_proj``, a DiT block's adaLN ``norm1.linear``, ...).
    ``cache_removes``: embedding modules the temporal feature cache replaces by an empty stand-in
    (their outputs are read by projections only). ``needs_conditioning``: the embedding also
    reads inputs other than (timestep, class) (SDXL's text_time embedding, PixArt's size
    conditions), so the block's finite set is the calibration data's rows. ``step_free``: modules
    of the block whose inputs do not depend on the step (PixArt's size embedders): their
    activations get one parameter set, not one per step (:func:`~tfmq.models.temporal.step_layer_names`).
    """
    embedding: list[str]
    projections: list[str]
    class_conditional: bool = False
    needs_conditioning: bool = False
    feature_dims: list[int] = field(default_factory=list)
    cache_removes: list[str] = field(default_factory=list)
    step_free: list[str] = field(default_factory=list)

    @property
    def roots(self) -> list[str]:
        """Every module of the block (embedding modules and projections), each once."""
        return list(dict.fromkeys(self.embedding + self.projections))

    def __len__(self) -> int:
        return len(self.projections)


class DenoiserAdapter:
    """One denoiser family. Subclasses set ``family``, ``component`` and ``model_types`` and
    implement the methods below; :func:`tfmq.models.adapter.adapter_for` picks the adapter."""

    #: short name used in reports and checkpoints (``unet``, ``dit``, ``pixart``)
    family: str = ""
    #: the pipeline attribute holding the denoiser
    component: str = ""
    #: diffusers model classes this adapter handles
    model_types: tuple = ()
    #: whether :mod:`tfmq.export` can write this family as an ONNX graph
    onnx_export: bool = False
    #: pieces of the methods that do not transfer to this family (said in the evaluation report)
    not_transferred: tuple[str, ...] = ()

    @classmethod
    def matches(cls, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, cls.model_types)

    # ---- sampling -----------------------------------------------------------------------
    def sample_shape(self, denoiser: nn.Module) -> tuple[int, ...]:
        """Shape of one sample (channels, height, width) in model space."""
        cfg = denoiser.config
        size = cfg.sample_size
        return (cfg.in_channels, size, size) if isinstance(size, int) else (cfg.in_channels, *size)

    def class_labels_apply(self, denoiser: nn.Module) -> bool:
        """Whether the denoiser takes class labels."""
        return False

    def null_class(self, denoiser: nn.Module) -> int:
        """The class id of the unconditional label used for guidance."""
        raise ValueError(f"{type(denoiser).__name__} is not class-conditional")

    def num_classes(self, denoiser: nn.Module) -> int:
        """Real classes (the null class excluded)."""
        return self.null_class(denoiser)

    def text_conditional(self, denoiser: nn.Module) -> bool:
        return False

    def text_inputs(self, denoiser: nn.Module) -> list[tuple[str, int | None]]:
        """The per-sample text conditioning the denoiser reads, in order: ``(name, width)`` of
        ``[B, S, width]`` embeddings, width None for a ``[B, S]`` mask (the inputs of an exported
        graph beside the sample and the temporal features)."""
        return []

    def added_inputs(self, denoiser: nn.Module) -> list[tuple[str, int]]:
        """Per-sample ``[B, width]`` inputs the time embedding reads beside the timestep (SDXL's
        pooled text embedding and size ids, PixArt-alpha 1024's size conditions): graph inputs of
        an export whose temporal block stays in the graph."""
        return []

    def conditioning(self, pipe, denoiser: nn.Module, num_images: int, seed: int, class_labels=None,
                     prompts=None, guidance_scale: float = 1.0, device="cpu") -> Conditioning:
        """Conditioning for ``num_images`` samples (see :func:`tfmq.sampling.build_conditioning`)."""
        if prompts:
            raise ValueError("this model is not text-conditional: --prompt does not apply")
        if not self.class_labels_apply(denoiser):
            if class_labels is not None:
                raise ValueError("this model is not class-conditional: class labels do not apply")
            if guidance_scale != 1.0:
                raise ValueError("guidance needs a conditional model")
            return Conditioning()
        n_real = self.num_classes(denoiser)
        if class_labels is None or len(class_labels) == 0:
            g = torch.Generator().manual_seed(seed)
            labels = torch.randint(0, n_real, (num_images,), generator=g)
        else:
            labels = torch.tensor([int(c) for c in class_labels])
            if labels.min() < 0 or labels.max() >= n_real:
                raise ValueError(f"class labels must be in 0..{n_real - 1}")
            labels = labels.repeat((num_images + len(labels) - 1) // len(labels))[:num_images]
        labels = labels.to(device)
        return Conditioning({"class_labels": labels},
                            {"class_labels": torch.full_like(labels, self.null_class(denoiser))})

    def forward_kwargs(self, row: dict[str, torch.Tensor]) -> dict:
        """Keyword arguments of the model's forward for a flat row (no sample / timestep)."""
        return dict(row)

    def epsilon(self, denoiser: nn.Module, output) -> torch.Tensor:
        """The noise prediction from the model's output (``.sample`` or a tuple)."""
        out = output.sample if hasattr(output, "sample") else output[0]
        c = denoiser.config.in_channels
        if out.shape[1] == 2 * c and getattr(denoiser.config, "out_channels", None) == 2 * c:
            out = out[:, :c]                     # learned variance: the sampler reads the mean
        return out

    # ---- the temporal information block ---------------------------------------------------
    def temporal_block(self, denoiser: nn.Module):
        """The :class:`~tfmq.models.temporal.TemporalBlock` of ``denoiser`` (FP or quantized)."""
        raise NotImplementedError

    def temporal_features(self, denoiser: nn.Module, timesteps: torch.Tensor,
                          class_labels: torch.Tensor | None, cond: dict[str, torch.Tensor],
                          block) -> list[torch.Tensor]:
        """Every temporal feature for a batch of timesteps (1-D, on the model's device), class
        labels and, where the block reads them, other conditioning rows."""
        raise NotImplementedError

    def class_table(self, denoiser: nn.Module) -> list[int] | None:
        """Every class id of the model's label table (null class included), or None."""
        return None

    def cache_refusal(self, denoiser: nn.Module, block) -> str | None:
        """Why the temporal feature cache cannot serve this model (None: it can)."""
        if block.needs_conditioning:
            return ("temporal feature caching needs a time embedding that depends on the timestep "
                    "and class only; this model's also reads other inputs")
        return None

    def describe(self) -> str:
        return f"{self.family} ({', '.join(t.__name__ for t in self.model_types)})"
