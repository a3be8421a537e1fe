"""BiDet / AutoBiDet objective terms (paper 000 eq. 6, 7, 10, 11; appendix 001 B.2) as plain
tensor functions, so any detector can add them to its loss dict.

Notation of paper 000: f high-level feature maps, p(f|x) their posterior, c / l the class and
location of the objects, beta the IB trade-off, gamma the sparsity weight, s_j the normalised
foreground confidence of the j-th detection surviving NMS.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "binomial_kl", "categorical_kl", "categorical_levels", "gaussian_kl", "location_info_loss",
    "sop_loss", "csop_loss", "sparse_object_prior", "beta_transform",
]


def binomial_kl(logits: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bern(p) || Bern(1/2)) with ``p = sigmoid(logits)``.

    Paper 000 eq. 3 / 7, first term: E_{f~p(f|x)} log p(f_st|x) / p(f_st) with the posterior
    ``cat([p, 1-p])`` and the uniform binomial prior p(f_st) = 1/2, i.e.
    ``p log p + (1-p) log(1-p) + log 2`` (the expectation is taken in closed form instead of
    with the Monte-Carlo sample: same mean, no estimator variance).

    Args:
        logits: any shape; the real-valued outputs of the backbone's last layer.
    Returns:
        a tensor of the same shape, >= 0, 0 where ``logits == 0``.
    """
    logp = F.logsigmoid(logits)
    log1mp = F.logsigmoid(-logits)
    p = logp.exp()
    return p * logp + (1 - p) * log1mp + math.log(2.0)


def categorical_levels(bits: int, device=None, dtype=None) -> torch.Tensor:
    """The ``2^bits`` feature values of an n-bit map, evenly spaced in [-1, 1]. Shape (K,)."""
    k = 2 ** int(bits)
    return torch.linspace(-1.0, 1.0, k, device=device, dtype=dtype)


def categorical_kl(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """KL(cat(probs) || uniform over K) along ``dim``: ``sum_k p_k log p_k + log K``.

    The 2^n-class categorical prior for n-bit feature maps (appendix 001 B.2, "the design of
    prior and posterior distributions" of eq. 7 for quantized detectors).

    Args:
        probs: probabilities summing to 1 along ``dim`` (K = probs.shape[dim]).
    Returns:
        the KL with ``dim`` reduced.
    """
    k = probs.shape[dim]
    return (torch.special.xlogy(probs, probs)).sum(dim) + math.log(k)


def gaussian_kl(mean: torch.Tensor, logvar: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Elementwise KL(N(mean, exp(logvar)) || N(0, 1)) = (var + mean^2 - 1 - logvar) / 2.

    The Gaussian prior of real-valued feature maps (pruned / efficient models, appendix 001
    B.2). With ``logvar=None`` (unit posterior variance) it is ``mean^2 / 2``: exactly the
    official BiDet code's L2 feature penalty.
    """
    if logvar is None:
        return 0.5 * mean * mean
    return 0.5 * (logvar.exp() + mean * mean - 1.0 - logvar)


def location_info_loss(target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                       prior_mean: Optional[torch.Tensor] = None,
                       prior_logvar: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``-log p(l|f) / p(l)`` per element for diagonal Gaussians (paper 000 eq. 7, location part
    of the second term, without beta).

    Posterior p(l|f) = N(mean, exp(logvar)) (the box branch and its log-variance branch),
    prior p(l) = N(prior_mean, exp(prior_logvar)); N(0, I) when not given (one-stage detectors,
    sec. 3.1.2). The 2*pi constants cancel, so the value is exactly
    ``0.5*((l-mu)^2/var + logvar) - 0.5*((l-mu0)^2/var0 + logvar0)``.

    Args:
        target: (..., D) ground-truth offsets l (shift l1 and log-scale l2 of eq. 7).
        mean, logvar: (..., D) posterior parameters.
        prior_mean, prior_logvar: (..., D) or None.
    Returns:
        (..., D) elementwise terms (sum over D for one box).
    """
    post = 0.5 * ((target - mean) ** 2 * torch.exp(-logvar) + logvar)
    mu0 = torch.zeros_like(target) if prior_mean is None else prior_mean
    lv0 = torch.zeros_like(target) if prior_logvar is None else prior_logvar
    prior = 0.5 * ((target - mu0) ** 2 * torch.exp(-lv0) + lv0)
    return post - prior


def _entropy_of_normalised(scores: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """``-sum_j s_j log s_j`` with ``s_j = p_j / sum_k p_k`` (0 for an empty input)."""
    if scores.numel() == 0:
        return scores.sum() * 0.0
    norm = scores.sum()
    if detach_norm:
        norm = norm.detach()
    s = scores / norm.clamp_min(1e-12)
    return -torch.special.xlogy(s, s).sum()


def sop_loss(scores: torch.Tensor, detach_norm: bool = False) -> torch.Tensor:
    """Sparse object priors of one image: ``-(1/m) sum_j s_j log s_j`` (paper 000 eq. 6, the J2
    term of eq. 7 without gamma), ``s_j = p_j / sum_k p_k`` over the m foreground detections
    that survive NMS.

    Args:
        scores: (m,) foreground confidences p_j^o of the detections kept by NMS.
        detach_norm: official-code variant, no gradient through sum_k p_k.
    Returns:
        a scalar; 0 (still connected to ``scores``) when m = 0.
    """
    m = scores.numel()
    return _entropy_of_normalised(scores, detach_norm) / max(m, 1)


def csop_loss(scores: torch.Tensor, classes: torch.Tensor, gt_counts: torch.Tensor,
              use_nc: bool = True, detach_norm: bool = False) -> torch.Tensor:
    """Class-aware sparse object priors of one image (paper 000 eq. 11):
    ``sum_c -(1/n_c) sum_j u_j^c log u_j^c`` with ``u_j^c = p_{j,c} / sum_k p_{k,c}`` over the
    m_c detections of class c.

    Args:
        scores: (m,) foreground confidences of the detections kept by NMS.
        classes: (m,) their predicted classes (0..n-1).
        gt_counts: (n,) number of ground-truth objects n_c per class in this image. A class
            detected but absent from the ground truth has n_c = 0; its weight is taken as
            1/max(n_c, 1) = 1 (the paper leaves 1/0 undefined).
        use_nc: False gives the "C-SOP without 1/n_c" ablation of Table 1 (weight 1).
        detach_norm: official-code variant, no gradient through the normaliser.
    Returns:
        a scalar (0 connected to ``scores`` when there are no detections).
    """
    total = scores.sum() * 0.0
    for c in torch.unique(classes).tolist():
        sel = classes == c
        term = _entropy_of_normalised(scores[sel], detach_norm)
        if use_nc:
            n_c = int(gt_counts[c]) if c < gt_counts.numel() else 0
            term = term / max(n_c, 1)
        total = total + term
    return total


def sparse_object_prior(scores: Sequence[torch.Tensor], classes: Sequence[torch.Tensor],
                        gt_classes: Sequence[torch.Tensor], num_classes: int, mode: str,
                        detach_norm: bool = False) -> torch.Tensor:
    """J2 / gamma averaged over the images of a batch.

    Args:
        scores, classes: per image, (m_i,) foreground confidences and classes of the
            detections that survived NMS.
        gt_classes: per image, the ground-truth classes (for n_c of C-SOP).
        num_classes: n.
        mode: "sop" (eq. 6), "csop" (eq. 11), "csop_no_nc" (eq. 11 without 1/n_c).
    Returns:
        a scalar: the mean over images.
    Raises:
        ValueError: unknown ``mode`` (naming MODEL.BIDET.SOP).
    """
    if mode not in ("sop", "csop", "csop_no_nc"):
        raise ValueError(f"MODEL.BIDET.SOP = {mode!r}; choose one of ['csop', 'csop_no_nc', 'sop']")
    terms = []
    for s, c, g in zip(scores, classes, gt_classes):
        if mode == "sop":
            terms.append(sop_loss(s, detach_norm))
        else:
            counts = torch.bincount(g.long(), minlength=num_classes)
            terms.append(csop_loss(s, c, counts, use_nc=mode == "csop", detach_norm=detach_norm))
    return torch.stack(terms).mean()


def beta_transform(score: torch.Tensor, kind: str, delta: float, theta: float) -> torch.Tensor:
    """Per-image IB trade-off beta = T(D(G(f))) (paper 000 eq. 10).

    Args:
        score: (N,) discriminator probabilities (or another score) in [0, 1].
        kind: "linear" ``delta + theta*s``; "exponential" ``delta*exp(theta*s)``;
            "sine" ``delta + theta*sin(pi/2 * s)``.
    Returns:
        (N,) beta values.
    Raises:
        ValueError: unknown ``kind`` (naming MODEL.BIDET.AUTO.TRANSFORM).
    """
    if kind == "linear":
        return delta + theta * score
    if kind == "exponential":
        return delta * torch.exp(theta * score)
    if kind == "sine":
        return delta + theta * torch.sin(0.5 * math.pi * score)
    raise ValueError(f"MODEL.BIDET.AUTO.TRANSFORM = {kind!r}; choose one of "
                     "['exponential', 'linear', 'sine']")
