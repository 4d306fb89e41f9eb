"""The feature-retaining losses: masked diffusion loss, attention (JSD) loss, and SSIM for mask refresh."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mask_math import minmax


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                          unmasked_term: bool = False) -> torch.Tensor:
    """MSE of prediction and target multiplied by the mask [B, 1, h, w] (None = plain MSE).

    With `unmasked_term` the loss is half masked, half full-image (the reference code's effective loss).
    """
    pred, target = pred.float(), target.float()
    full = F.mse_loss(pred, target)
    if mask is None:
        return full
    mask = mask.to(pred)
    masked = F.mse_loss(pred * mask, target * mask)
    return 0.5 * (masked + full) if unmasked_term else masked


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Jensen-Shannon divergence between distributions along the last dim (mean over leading dims)."""
    m = 0.5 * (p + q)
    kl_pm = (p * ((p + eps).log() - (m + eps).log())).sum(-1)
    kl_qm = (q * ((q + eps).log() - (m + eps).log())).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def attention_loss(cross: torch.Tensor, token_idx: list[int], cross_hw: tuple[int, int],
                   masks: torch.Tensor) -> torch.Tensor:
    """JSD between softmax-over-pixels of each token's min-max map (bicubic to mask size) and of its mask.

    cross: [queries, tokens] of one image; token_idx and masks [K, h, w] pair up (start token with background).
    """
    maps = cross[:, token_idx].T.reshape(len(token_idx), 1, *cross_hw)
    maps = F.interpolate(maps.float(), size=masks.shape[-2:], mode="bicubic", align_corners=False)[:, 0]
    maps = minmax(maps, dims=(1, 2))
    p = maps.flatten(1).softmax(-1)
    q = masks.float().flatten(1).softmax(-1)
    return js_divergence(p, q)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Mean structural similarity of two single-channel images [h, w] in [0, 1], defined as scikit-image's
    `structural_similarity(a, b, data_range=1)` (the paper's reference code): a uniform 7x7 window, sample
    covariances (N / (N - 1)), K1 = 0.01, K2 = 0.03, averaged over the positions where the window fits
    (scikit-image crops the border). An image smaller than the window uses the largest odd window that fits."""
    x, y = a.float()[None, None], b.float()[None, None]
    window = min(window, *x.shape[-2:])
    window -= 1 - window % 2  # odd
    mean = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731  (valid positions only)
    n = window * window
    cov_norm = n / (n - 1) if n > 1 else 1.0
    mx, my = mean(x), mean(y)
    vx, vy = cov_norm * (mean(x * x) - mx ** 2), cov_norm * (mean(y * y) - my ** 2)
    cxy = cov_norm * (mean(x * y) - mx * my)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())
