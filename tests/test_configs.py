"""Every detector yaml under configs/ merges into a fresh config, builds on CPU with detectron2's own
``build_model``, runs one training step and one inference on small random images.

Overrides for speed and for a machine without GPU or datasets: ``MODEL.DEVICE cpu``, no
``MODEL.WEIGHTS`` (quantized leaves name a float checkpoint that a test cannot have), LIQ
ranges initialised from the max instead of the MSE search (the search is tested with the
quantizer), and narrower layers where the structure allows it (``narrow=True``: 64 FPN/head
channels, ResNet-50 bottlenecks of width 16) so that ~50 configs train in about a minute;
every layer, norm, quantization decision and loss of the config is still there (full-width
builds and per-component layer counts: tests/modeling/test_aqd_retinanet_fcos.py). The batch is
built in memory (64x64 images, two gt boxes), so configs naming COCO need no data. ``SyncBN``
layers run as plain BN in one process.
"""
from pathlib import Path

import pytest
import torch

import aqd_d2  # noqa: I100  (compat shims before detectron2 is imported)
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from tests.conftest import REPO

# configs/Pretrain/ holds image classifiers (backbone pretraining): they take labelled images,
# not detection batches, and tests/classification builds and trains each of them.
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")
                 if "Pretrain" not in p.relative_to(REPO).parts)


# one intra-op thread per module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def load_test_config(rel_path: str, extra=(), narrow: bool = False):
    """A config from ``rel_path`` (relative to the repo) with the CPU smoke-test overrides.

    Args:
        rel_path: yaml path relative to the repository root.
        extra: further ``merge_from_list`` options.
        narrow: also shrink layer widths (FPN/head channels 64; ResNet-50+ bottleneck width 16).
    """
    cfg = get_cfg()
    aqd_d2.add_aqd_config(cfg)
    cfg.merge_from_file(str(REPO / rel_path))
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    if narrow:
        opts += ["MODEL.FPN.OUT_CHANNELS", "64"]
        if cfg.MODEL.RESNETS.DEPTH >= 50:
            opts += ["MODEL.RESNETS.WIDTH_PER_GROUP", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
        # DarkNet-19 is ~50 M parameters; KT configs keep full width (their teacher, built
        # from its own config file, must match the student's feature shapes).
        if cfg.MODEL.QUANT.META_ARCHITECTURE == "YOLOv2" and cfg.MODEL.META_ARCHITECTURE != "KnowledgeTransfer":
            opts += ["MODEL.DARKNET.WIDTH_MULT", "0.125"]
        if cfg.MODEL.QUANT.META_ARCHITECTURE in ("SSD", "BiDetSSD"):  # SSD300: VGG16 / MobileNetV1 at 1/8 width
            opts += ["MODEL.VGG.WIDTH_MULT", "0.125", "MODEL.MOBILENET_SSD.WIDTH_MULT", "0.125"]
    if cfg.MODEL.QUANT.W_METHOD == "liq" and not cfg.MODEL.QUANT.W_KWARGS:
        opts += ["MODEL.QUANT.W_KWARGS", "['init=max']"]
    if cfg.MODEL.QUANT.A_METHOD == "liq" and not cfg.MODEL.QUANT.A_KWARGS:
        opts += ["MODEL.QUANT.A_KWARGS", "['init=max']"]
    cfg.merge_from_list(opts + list(extra))
    return cfg


def tiny_batch(num_images: int = 2, size: int = 64, with_gt: bool = True):
    """``num_images`` random (3, size, size) images in detectron2's input format."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(num_images):
        d = {"image": torch.rand(3, size, size, generator=g) * 255, "height": size, "width": size}
        if with_gt:
            inst = Instances((size, size))
            inst.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 40.0, 40.0], [30.0, 20.0, 62.0, 50.0]]) * size / 64)
            inst.gt_classes = torch.tensor([0, 1])
            d["instances"] = inst
        batch.append(d)
    return batch


def train_step(cfg, model) -> dict:
    """One SGD step with detectron2's optimizer; returns the float losses."""
    model.train()
    optimizer = build_optimizer(cfg, model)
    with EventStorage(0):
        losses = model(tiny_batch())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return {k: float(v) for k, v in losses.items()}


@pytest.mark.parametrize("rel_path", CONFIGS)
def test_config_builds_trains_and_infers(rel_path):
    torch.manual_seed(0)
    cfg = load_test_config(rel_path, narrow=True)
    model = build_model(cfg)
    losses = train_step(cfg, model)
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    model.eval()
    with torch.no_grad():
        out = model(tiny_batch(1, with_gt=False))
    assert len(out) == 1 and "instances" in out[0]
    inst = out[0]["instances"]
    assert inst.image_size == (64, 64) and inst.pred_boxes.tensor.shape[1] == 4
    if cfg.MODEL.QUANT.ENABLED:
        assert model.quant_report is not None and model.quant_report.quantized_names()


def test_every_detector_config_is_tested():
    """The parametrization found the AQD configs (guards against a broken glob)."""
    names = {Path(p).name for p in CONFIGS}
    for expected in ("Base-FCOS.yaml", "R18-FPN-COCO-2bit-sharedBN.yaml", "R50-FPN-COCO-4bit.yaml",
                     "R18-FPN-shapes-cpu-2bit.yaml"):
        assert expected in names
