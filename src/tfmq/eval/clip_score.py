"""CLIP score of text-to-image samples, with CLIP weights found locally.

``CLIP score = 100 * mean_i max(cos(E_img(x_i), E_txt(p_i)), 0)``, the usual definition (as in
torchmetrics' ``CLIPScore``): image and prompt embeddings of a CLIP model, cosine per pair,
negatives clipped, averaged over the images. Image ``i`` is scored against the prompt it was
sampled with (prompts are cycled over the images, as in :func:`tfmq.sampling.build_conditioning`).

Nothing is downloaded. The weights come from a local folder (``--clip-model DIR`` of
``tfmq evaluate``, or ``$TFMQ_CLIP_MODEL``) or, failing that, from the Hugging Face cache of
``openai/clip-vit-large-patch14`` (loaded with ``local_files_only``). When none is there the score
is skipped and the report says why (:class:`ClipUnavailable`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm.auto import tqdm

#: Hub id tried in the local Hugging Face cache when no folder is given.
DEFAULT_CLIP_ID = "openai/clip-vit-large-patch14"


class ClipUnavailable(RuntimeError):
    """No CLIP weights could be loaded without a download."""


def clip_source(path: str | None = None) -> str:
    """Where the CLIP weights are taken from: ``path``, ``$TFMQ_CLIP_MODEL`` or the default id."""
    return path or os.environ.get("TFMQ_CLIP_MODEL") or DEFAULT_CLIP_ID


class ClipScorer:
    """A CLIP model and processor loaded offline from :func:`clip_source`."""

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", batch_size: int = 64):
        self.source = clip_source(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as exc:
            raise ClipUnavailable(f"CLIP score needs the 'transformers' package: {exc}") from exc
        try:
            self.model = CLIPModel.from_pretrained(self.source, local_files_only=True).eval().to(self.device)
            self.processor = CLIPProcessor.from_pretrained(self.source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ClipUnavailable(
                f"no local CLIP weights at {self.source!r} (pass --clip-model DIR or set "
                f"$TFMQ_CLIP_MODEL to a folder with a CLIP model and processor): "
                f"{str(exc).splitlines()[0]}") from exc

    @torch.no_grad()
    def cosines(self, images: np.ndarray, prompts: list[str], progress: bool = False) -> np.ndarray:
        """Cosine of each image (uint8 NHWC) with its prompt (cycled over the images)."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 NHWC, got {images.dtype} {images.shape}")
        if not prompts:
            raise ValueError("CLIP score needs the prompts the images were sampled with")
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        texts = [prompts[i % len(prompts)] for i in range(len(images))]
        out = []
        for i in tqdm(range(0, len(images), self.batch_size), desc="CLIP score", disable=not progress,
                      leave=False):
            batch = self.processor(text=texts[i:i + self.batch_size], images=list(images[i:i + self.batch_size]),
                                   return_tensors="pt", padding=True, truncation=True)
            res = self.model(**{k: v.to(self.device) for k, v in batch.items()})
            # image_embeds / text_embeds are the L2-normalised projections
            out.append((res.image_embeds * res.text_embeds).sum(-1).float().cpu())
        return torch.cat(out).numpy()

    def score(self, images: np.ndarray, prompts: list[str], progress: bool = False) -> float:
        """``100 * mean(max(cos, 0))`` over the images."""
        return float(100.0 * np.clip(self.cosines(images, prompts, progress), 0.0, None).mean())
