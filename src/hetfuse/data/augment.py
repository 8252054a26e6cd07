"""Batch data augmentation for image tensors (no torchvision).

Meant to be applied by a trainer to each training batch, after the batch has been selected and
before the forward pass, e.g.::

    gen = torch.Generator().manual_seed(seed)
    for idx in batches:
        xb = random_crop_flip(ds.x_train[idx], padding=4, generator=gen)

Test / evaluation data are never augmented.
"""

from __future__ import annotations

import torch


def random_crop_flip(x: torch.Tensor, *, padding: int = 4, flip: bool = True,
                     generator: torch.Generator) -> torch.Tensor:
    """The standard CIFAR augmentation: zero-pad, random crop back to H x W, random horizontal flip.

    ``x`` is N x C x H x W (already normalised, so the zero padding is the data mean). Each image
    independently gets a crop offset drawn uniformly from ``0 .. 2 * padding`` in each direction
    (in padded coordinates) and, if ``flip``, a horizontal mirror with probability 1/2. The random
    numbers come from ``generator`` only (on its device), so a seeded generator gives a
    reproducible stream. Returns a new contiguous tensor of the same shape, dtype and device;
    ``x`` is not modified. Fully vectorised (one gather, no loop over images).
    """
    if x.ndim != 4:
        raise ValueError(f"random_crop_flip expects an N x C x H x W tensor, got shape {tuple(x.shape)}")
    return apply_crop_flip(x, crop_flip_params(x.shape[0], padding=padding, flip=flip, generator=generator),
                           padding=padding)


def crop_flip_params(n: int, *, padding: int = 4, flip: bool = True,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random numbers of :func:`random_crop_flip` for ``n`` images: (row offsets, column offsets, flips), drawn
    in that order. Drawn for a whole batch and applied to part of it (:func:`apply_crop_flip`), every process of a
    distributed run augments its share of a global batch exactly as one process would."""
    padding = int(padding)
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    gdev = generator.device
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev)
    flips = torch.randint(0, 2, (n,), generator=generator, device=gdev).bool() if flip else \
        torch.zeros(n, dtype=torch.bool, device=gdev)
    return oy, ox, flips


def apply_crop_flip(x: torch.Tensor, params, *, padding: int = 4) -> torch.Tensor:
    """Apply crop offsets and flips (one per image of ``x``) drawn by :func:`crop_flip_params`."""
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    oy, ox, flips = (p.to(x.device) for p in params)
    padding = int(padding)

    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding)) if padding else x
    hp, wp = h + 2 * padding, w + 2 * padding
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h[None, :]                                   # N x H
    cols_fwd = ar_w[None, :].expand(n, w)
    cols = ox[:, None] + torch.where(flips[:, None], (w - 1) - cols_fwd, cols_fwd)  # N x W
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    out = torch.gather(padded.reshape(n, c, hp * wp), 2, flat)
    return out.reshape(n, c, h, w)
