"""Fused multi-level ROIAlign for CPU inference: :class:`FastROIPooler`.

detectron2's :class:`~detectron2.modeling.poolers.ROIPooler` pools the boxes of an FPN
detector level by level: a zero-filled ``(R, C, PH, PW)`` output, then for each level
torchvision's ``roi_align`` (a scalar loop over NCHW memory, one channel at a time, into its
own zero-filled tensor) and an ``index_put_`` into the output. On Faster R-CNN R18-FPN with
1000 proposals that is about 60 ms of ROIAlign plus 36 ms of zero fills on one thread.

:func:`roi_align_multilevel` does the same in one call of the C++ extension
(``csrc/roi_align.cpp``, op ``torch.ops.aqd_binary.roi_align_multilevel``): it takes every
level, all boxes with their level and image index, and writes the result directly,
vectorised over channels (levels converted to channels_last once per call), OpenMP over
boxes. It performs torchvision's float operations in torchvision's order per channel, so
its output equals detectron2's ``ROIPooler`` bit for bit (ROIAlign and ROIAlignV2 types,
any sampling ratio; ``tests/export/test_roi_pooler.py`` checks ``torch.equal``).

:class:`FastROIPooler` is a ``ROIPooler`` (same constructor, same level assignment through
detectron2's own :func:`~detectron2.modeling.poolers.assign_boxes_to_levels`) whose forward
uses the fused op when it can, and ``ROIPooler.forward`` otherwise: extension unavailable
(or ``AQD_BINARY_KERNEL=torch``), gradients needed, non-float32 or non-CPU features. The
kernel variant is the best one the CPU runs, or ``$AQD_ROI_ISA`` (``generic`` | ``avx2`` |
``avx512``; e.g. the AVX2 variant on an AVX-512 CPU, tools/test_avx2_path.sh);
:func:`roi_align_kernel` says which runs.
:func:`convert_roi_poolers` swaps every ROIAlign/ROIAlignV2 ``ROIPooler`` of a model for one
(``convert_for_inference(roi_pooler=True)``); ROIPool and ROIAlignRotated poolers are left
to detectron2. Inference only: the op has no autograd.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.structures import Boxes

from ._ext_build import OPS_NAMESPACE, load_extension

__all__ = ["ROI_ISA_NAMES", "FastROIPooler", "convert_roi_poolers", "roi_align_isas", "roi_align_kernel",
           "roi_align_multilevel"]

#: kernel variants of the fused op: name -> the extension's isa id
ROI_ISA_NAMES = {"generic": 0, "avx2": 2, "avx512": 3}


def _op_available() -> bool:
    return load_extension() and hasattr(getattr(torch.ops, OPS_NAMESPACE), "roi_align_multilevel")


def roi_align_isas() -> List[str]:
    """Variants of the fused kernel this CPU runs (empty when the extension is unavailable)."""
    if not _op_available():
        return []
    ids = set(getattr(torch.ops, OPS_NAMESPACE).roi_align_isas())
    return [n for n, i in ROI_ISA_NAMES.items() if i in ids]


def _env_isa() -> Optional[str]:
    """``$AQD_ROI_ISA`` (None when unset or empty).

    Raises:
        ValueError: not a name of :data:`ROI_ISA_NAMES`.
        RuntimeError: a variant this CPU does not run.
    """
    isa = os.environ.get("AQD_ROI_ISA", "") or None
    if isa is None:
        return None
    if isa not in ROI_ISA_NAMES:
        raise ValueError(f"$AQD_ROI_ISA={isa!r}: allowed values are {', '.join(ROI_ISA_NAMES)}")
    if isa not in roi_align_isas():
        raise RuntimeError(f"$AQD_ROI_ISA={isa!r} is not available here ({roi_align_isas()})")
    return isa


def roi_align_kernel() -> str:
    """What :class:`FastROIPooler` runs now: ``"torch"`` (detectron2's ROIPooler: extension
    unavailable or ``AQD_BINARY_KERNEL=torch``) or ``"cpp-<variant>"`` (``$AQD_ROI_ISA`` or
    the best one)."""
    if not _use_fused():
        return "torch"
    return "cpp-" + (_env_isa() or roi_align_isas()[-1])


def _use_fused() -> bool:
    """The fused op is used unless unavailable or ``AQD_BINARY_KERNEL=torch`` (the switch the
    binary convolution uses too, :mod:`.binary_conv`)."""
    return os.environ.get("AQD_BINARY_KERNEL", "auto") != "torch" and _op_available()


def _reference(features: Sequence[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor,
               scales: Sequence[float], output_size: Tuple[int, int], sampling_ratio: int,
               aligned: bool) -> torch.Tensor:
    """What detectron2's ROIPooler does: per level, detectron2's ROIAlign into a zero-filled output."""
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1]) + tuple(output_size))
    for level, (feat, scale) in enumerate(zip(features, scales)):
        inds = torch.nonzero(levels == level).squeeze(1)
        if len(inds):
            out.index_put_((inds,), ROIAlign(output_size, scale, sampling_ratio, aligned)(feat, rois[inds]))
    return out


@torch.no_grad()
def roi_align_multilevel(features: Sequence[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor,
                         scales: Sequence[float], output_size: Union[int, Tuple[int, int]],
                         sampling_ratio: int = 0, aligned: bool = True,
                         isa: Optional[str] = None) -> torch.Tensor:
    """ROIAlign of each box on its own FPN level, all levels in one call.

    Args:
        features: L float32 tensors ``(N, C, H_l, W_l)``, NCHW or channels_last.
        rois: ``(R, 5)`` rows ``(image index, x0, y0, x1, y1)`` in input-image coordinates
            (detectron2's ``convert_boxes_to_pooler_format``).
        levels: ``(R,)`` int64, the level index (0..L-1) of each box.
        scales: L spatial scales (1 / stride).
        output_size: ``PH`` or ``(PH, PW)``.
        sampling_ratio: samples per bin and axis; 0 = adaptive ``ceil(box size / PH)``.
        aligned: ROIAlignV2 (half-pixel shift) when True, the legacy ROIAlign when False.
        isa: force a kernel variant (:data:`ROI_ISA_NAMES`); default ``$AQD_ROI_ISA`` or the
            best one.
    Returns:
        ``(R, C, PH, PW)`` float32, contiguous. Without the extension: the per-level
        detectron2 ROIAlign (same values).
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(features) != len(scales):
        raise ValueError(f"got {len(features)} feature levels but {len(scales)} scales")
    rois = rois.to(features[0].dtype)
    levels = levels.to(torch.int64)
    if isa is not None and isa not in ROI_ISA_NAMES:
        raise ValueError(f"unknown kernel variant {isa!r}; choose from {tuple(ROI_ISA_NAMES)}")
    if not _use_fused() or features[0].dtype != torch.float32 or features[0].device.type != "cpu":
        if isa is not None:
            raise RuntimeError(f"kernel variant {isa!r} requested but the fused ROIAlign is unavailable")
        return _reference(features, rois, levels, scales, (oh, ow), sampling_ratio, aligned)
    if isa is not None and isa not in roi_align_isas():
        raise RuntimeError(f"kernel variant {isa!r} is not available here ({roi_align_isas()})")
    isa = isa or _env_isa()
    return getattr(torch.ops, OPS_NAMESPACE).roi_align_multilevel(
        list(features), rois, levels, [float(s) for s in scales], oh, ow, int(sampling_ratio),
        bool(aligned), ROI_ISA_NAMES[isa] if isa is not None else -1)


class FastROIPooler(ROIPooler):
    """detectron2's ``ROIPooler`` (ROIAlign / ROIAlignV2 types) with a fused inference forward.

    Constructor: that of ``ROIPooler`` (``output_size, scales, sampling_ratio, pooler_type,
    canonical_box_size, canonical_level``); ``pooler_type`` must be ``"ROIAlign"`` or
    ``"ROIAlignV2"``. :meth:`from_pooler` builds one from an existing pooler.
    Forward: ``(x: list of L (N, C, H_l, W_l), box_lists: list of N Boxes)`` ->
    ``(R, C, PH, PW)``, equal to ``ROIPooler.forward`` (which it calls where the fused op
    cannot run: extension unavailable, gradients needed, not float32 on the CPU; and under
    ``torch.jit`` tracing, so traced graphs need no aqd_d2 library).
    """

    def __init__(self, output_size, scales: Sequence[float], sampling_ratio: int, pooler_type: str,
                 canonical_box_size: int = 224, canonical_level: int = 4):
        if pooler_type not in ("ROIAlign", "ROIAlignV2"):
            raise ValueError(f"FastROIPooler: pooler_type must be 'ROIAlign' or 'ROIAlignV2', got "
                             f"{pooler_type!r} (ROIPool / ROIAlignRotated stay detectron2's ROIPooler)")
        super().__init__(output_size, scales, sampling_ratio, pooler_type, canonical_box_size, canonical_level)
        self.scales = tuple(float(s) for s in scales)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = pooler_type == "ROIAlignV2"

    @classmethod
    def from_pooler(cls, pooler: ROIPooler) -> Optional["FastROIPooler"]:
        """The fused equivalent of ``pooler``, or None when its level poolers are not all
        detectron2 ``ROIAlign`` modules with one sampling ratio and alignment."""
        ps = list(pooler.level_poolers)
        if not ps or any(type(p) is not ROIAlign for p in ps):
            return None
        if len({(p.sampling_ratio, bool(p.aligned)) for p in ps}) != 1:
            return None
        return cls(tuple(pooler.output_size), [p.spatial_scale for p in ps], ps[0].sampling_ratio,
                   "ROIAlignV2" if ps[0].aligned else "ROIAlign", pooler.canonical_box_size,
                   pooler.canonical_level)

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in x)
        if (needs_grad or torch.jit.is_tracing() or not isinstance(x, list) or len(x) != len(self.level_poolers) or not box_lists
                or len(box_lists) != x[0].shape[0] or any(type(b) is not Boxes for b in box_lists)
                or x[0].dtype != torch.float32 or x[0].device.type != "cpu" or not _use_fused()):
            return super().forward(x, box_lists)  # detectron2's path (also its checks / errors)
        rois = convert_boxes_to_pooler_format(box_lists)
        if len(x) == 1:
            levels = torch.zeros(rois.shape[0], dtype=torch.int64)
        else:
            levels = assign_boxes_to_levels(box_lists, self.min_level, self.max_level,
                                            self.canonical_box_size, self.canonical_level)
        return roi_align_multilevel(x, rois, levels, self.scales, self.output_size,
                                    self.sampling_ratio, self.aligned)


def convert_roi_poolers(model: nn.Module) -> List[Tuple[str, str, str]]:
    """Replace every detectron2 ``ROIPooler`` of ``model`` whose levels are ROIAlign /
    ROIAlignV2 by an equivalent :class:`FastROIPooler` (in place).

    Args:
        model: any module (e.g. a GeneralizedRCNN with box / mask / keypoint poolers).
    Returns:
        report rows ``(module name, kind, detail)``; kind ``"fused ROIAlign"`` or
        ``"ROIPooler kept"`` (ROIPool, ROIAlignRotated, mixed levels).
    """
    from aqd_d2.convert import replace_module_references

    rows, mapping = [], {}
    for name, m in model.named_modules():
        if type(m) is not ROIPooler:
            continue
        new = FastROIPooler.from_pooler(m)
        if new is None:
            kinds = sorted({type(p).__name__ for p in m.level_poolers})
            rows.append((name, "ROIPooler kept", f"level poolers {', '.join(kinds)}"))
            continue
        mapping[id(m)] = new.train(m.training)
        detail = (f"{'ROIAlignV2' if new.aligned else 'ROIAlign'} {tuple(new.output_size)}, "
                  f"sampling ratio {new.sampling_ratio}, {len(new.scales)} level(s)")
        rows.append((name, "fused ROIAlign", detail + ("" if _use_fused() else " (extension unavailable: "
                                                                            "detectron2 fallback)")))
    replace_module_references(model, mapping)
    return rows
