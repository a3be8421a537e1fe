"""The detector of a config file, as the analysis tools (``tools/analyze_model.py``,
``tools/equivalent_flops.py``) build and feed it: one function each, so the two tools count the
same model at the same input size."""
from __future__ import annotations

from typing import Sequence, Tuple

from torch import nn

__all__ = ["build_from_config", "default_input_size", "input_shape", "meta_architecture"]


def meta_architecture(cfg) -> str:
    """The detector's meta-architecture (the one ``QuantizedDetector`` converts)."""
    if cfg.MODEL.META_ARCHITECTURE == "QuantizedDetector":
        return cfg.MODEL.QUANT.META_ARCHITECTURE
    return cfg.MODEL.META_ARCHITECTURE


def default_input_size(cfg) -> Tuple[int, int]:
    """``(H, W)`` of the network input at test time: the square ``MODEL.SSD.INPUT_SIZE`` /
    ``MODEL.CENTERNET.INPUT_SIZE`` of SSD / CenterNet models (they resize every image), else
    ``INPUT.MIN_SIZE_TEST x INPUT.MAX_SIZE_TEST`` (e.g. paper 000's 600 x 1000 for Faster R-CNN)."""
    arch = meta_architecture(cfg)
    if arch in ("SSD", "BiDetSSD"):
        return int(cfg.MODEL.SSD.INPUT_SIZE), int(cfg.MODEL.SSD.INPUT_SIZE)
    if arch == "CenterNet":
        return int(cfg.MODEL.CENTERNET.INPUT_SIZE), int(cfg.MODEL.CENTERNET.INPUT_SIZE)
    return int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)


def build_from_config(config_file: str, opts: Sequence[str] = (), weights: str = ""
                      ) -> Tuple[object, nn.Module]:
    """``(cfg, model)``: the model of ``config_file`` (+ ``opts``) on CPU in eval mode, random
    weights or loaded from ``weights``."""
    import aqd_d2
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts))
    model = build_model(cfg)
    if weights:
        from aqd_d2.engine import AQDCheckpointer

        AQDCheckpointer(model).load(weights)
    return cfg, model.eval()


def input_shape(cfg, size: Sequence[int] = ()) -> Tuple[int, int, int]:
    """``(3, H, W)`` from ``size`` (``[H]`` = square, ``[H, W]``) or :func:`default_input_size`."""
    if len(size) == 0:
        h, w = default_input_size(cfg)
    elif len(size) == 1:
        h = w = int(size[0])
    else:
        h, w = int(size[0]), int(size[1])
    return 3, h, w
