"""Every detection config names the pretraining config of its backbone, and that config's
checkpoint holds every backbone tensor of the detector under the detector's name and shape
(issue 17 item 3): ``MODEL.WEIGHTS`` of the detection config loads it with no missing
backbone key.

"Backbone keys" of a detector: ``backbone.bottom_up.*`` (FPN detectors) or ``backbone.*``, and
the C4 detectors' ``roi_heads.box_head.res5.*``; not the SSD extra layers (conv8_1 .. conv11_2
of VGG16, conv7_1 .. conv10_2 of MobileNetV1) and conv4_3's L2Norm, which SSD adds to the
ImageNet network and trains from random initialisation. A float pretraining config may leave
the quantizer state of a quantized detector missing (the paper starts those from the float
network); a quantized one must provide it too. The pairs are checked at full (paper / twin)
width; models are built on PyTorch's meta device (names and shapes only) where that works.
One real load through detectron2's checkpointer per kind of name mapping checks the files.
"""
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, build_model

import aqd_d2
from aqd_d2.engine.checkpoint import QUANTIZER_STATE_MARKERS, AQDCheckpointer, CheckpointError
from aqd_d2.engine.pretrain import backbone_checkpoint_marker
from tests.classification.common import PRETRAIN_DIR, pretrain_cfg, tiny_pretrain_opts
from tests.conftest import REPO

LINE = re.compile(r"^# Pretrained backbone: (.*)$", re.M)
PATH = re.compile(r"configs/Pretrain/[\w.\-]+\.yaml")
SSD_EXTRAS = re.compile(r"backbone\.(conv(7|8|9|10|11)_[12]\.|conv4_3_norm\.)")
#: detection configs whose paper trains from scratch (paper 003, sec. 5)
FROM_SCRATCH = re.compile(r"configs/CenterNet/(q|rtb)")


def _leaves():
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                  if "Pretrain" not in p.parts and not p.name.startswith("Base-"))


def _named(rel):
    m = LINE.search((REPO / rel).read_text())
    if m is None:
        return None, None
    paths = PATH.findall(m.group(1))
    return m.group(1), (paths[0] if paths else None)


PAIRS = [(rel, _named(rel)[1]) for rel in _leaves() if _named(rel)[1]]


def test_every_detection_config_names_its_pretraining_config():
    problems = []
    for rel in _leaves():
        text, path = _named(rel)
        if text is None:
            problems.append(f"{rel}: no '# Pretrained backbone:' line")
        elif path is None and not (text.startswith("none") and FROM_SCRATCH.match(rel)):
            problems.append(f"{rel}: names no configs/Pretrain/*.yaml ({text!r})")
        elif path is not None and not (REPO / path).is_file():
            problems.append(f"{rel}: {path} does not exist")
    assert not problems, "\n".join(problems)
    assert len(PAIRS) > 150


def _detection_cfg(rel):
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / rel))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    if cfg.MODEL.META_ARCHITECTURE == "KnowledgeTransfer":  # the student is what loads
        cfg.MODEL.META_ARCHITECTURE = cfg.MODEL.KT.STUDENT_META_ARCHITECTURE
    return cfg


def _shapes(cfg):
    """{state_dict key: shape} of the model ``cfg`` builds (on the meta device if possible)."""
    build = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    try:
        with torch.device("meta"):
            state = build(cfg).state_dict()
    except Exception:  # a model that computes on its weights (pruning state): build it for real
        state = build(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}


@lru_cache(maxsize=None)
def _pretrain_shapes(path):
    cfg = pretrain_cfg(REPO / path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return _shapes(cfg), cfg


def _backbone_keys(det, ssd):
    fpn = any(k.startswith("backbone.bottom_up.") for k in det)
    prefixes = ("backbone.bottom_up.",) if fpn else ("backbone.",)
    keys = [k for k in det if k.startswith(prefixes + ("roi_heads.box_head.res5.",))]
    return [k for k in keys if not (ssd and SSD_EXTRAS.match(k))]


@pytest.mark.parametrize("rel, path", PAIRS, ids=[r for r, _ in PAIRS])
def test_pretraining_checkpoint_covers_the_detector_backbone(rel, path):
    dcfg = _detection_cfg(rel)
    det = _shapes(dcfg)
    cls, pcfg = _pretrain_shapes(path)
    ssd = dcfg.MODEL.BACKBONE.NAME in ("build_vgg16_ssd_backbone", "build_mobilenet_ssd_backbone")
    keys = _backbone_keys(det, ssd)
    assert len(keys) > 10
    if not pcfg.MODEL.QUANT.ENABLED:
        keys = [k for k in keys if not any(m in k for m in QUANTIZER_STATE_MARKERS)]
    missing = [k for k in keys if k not in cls]
    other_shape = [(k, det[k], cls[k]) for k in keys if k in cls and cls[k] != det[k]]
    assert not missing, f"{path} lacks {len(missing)} backbone keys of {rel}: {missing[:5]}"
    assert not other_shape, f"{path} has other shapes than {rel}: {other_shape[:5]}"
    # the images are normalised as the detector normalises them
    for key in ("PIXEL_MEAN", "PIXEL_STD"):
        assert list(pcfg.MODEL[key]) == list(dcfg.MODEL[key]), key
    assert pcfg.INPUT.FORMAT == dcfg.INPUT.FORMAT


def test_quantized_pretraining_gives_the_quantizer_state_too():
    """R18-LIQ-2bit (AQD sec. 4.6) -> the 2-bit AQD RetinaNet: every backbone key, LIQ's
    interval parameters included."""
    det = _shapes(_detection_cfg("configs/RetinaNet/R18-FPN-COCO-2bit.yaml"))
    cls, _ = _pretrain_shapes("configs/Pretrain/R18-LIQ-2bit.yaml")
    keys = _backbone_keys(det, False)
    assert any("quantizer" in k for k in keys)
    assert [k for k in keys if k not in cls] == []


@pytest.mark.parametrize("pretrain, detection", [
    ("R18-shapes-cpu.yaml", "configs/RetinaNet/R18-FPN-shapes-cpu-FP.yaml"),
    ("R18-C4-shapes-cpu.yaml", "configs/FasterRCNN/R18-C4-shapes-voc-cpu-FP.yaml"),
    ("VGG16-XNOR-shapes-cpu.yaml", "configs/SSD/VGG16-shapes-voc-cpu-XNOR.yaml"),
])
def test_real_checkpoint_loads_through_detectron2(pretrain, detection, tmp_path):
    """A checkpoint written as PretrainTrainer writes it loads into the detector as
    train_net.py loads MODEL.WEIGHTS (AQDCheckpointer: a detectron2 DetectionCheckpointer that
    checks the checkpoint fits): every backbone tensor arrives with the classifier's value."""
    pcfg = pretrain_cfg(PRETRAIN_DIR / pretrain, tiny_pretrain_opts(tmp_path))
    cls = build_model(pcfg)
    with torch.no_grad():
        for p in cls.parameters():
            p.uniform_(-1, 1)
    writer = AQDCheckpointer(cls, str(tmp_path))  # what PretrainTrainer saves with
    writer.extra_state.update(backbone_checkpoint_marker(pcfg))
    writer.save("pre")
    dcfg = _detection_cfg(detection)
    det = build_model(dcfg)
    AQDCheckpointer(det).load(str(tmp_path / "pre.pth"))  # what train_net's Trainer loads with
    saved = torch.load(tmp_path / "pre.pth", map_location="cpu", weights_only=False)["model"]
    ssd = dcfg.MODEL.QUANT.META_ARCHITECTURE in ("SSD", "BiDetSSD")
    keys = _backbone_keys(det.state_dict(), ssd)
    for k in keys:
        if not any(m in k for m in QUANTIZER_STATE_MARKERS) or k in saved:
            assert torch.equal(det.state_dict()[k], saved[k]), k


def test_backbone_checkpoint_of_another_network_is_refused(tmp_path):
    """A pretraining checkpoint of another backbone (VGG16 for a ResNet detector) fails with a
    message naming the backbone, not a silently random detector."""
    pcfg = pretrain_cfg(PRETRAIN_DIR / "VGG16-shapes-cpu.yaml", tiny_pretrain_opts(tmp_path))
    writer = AQDCheckpointer(build_model(pcfg), str(tmp_path))
    writer.extra_state.update(backbone_checkpoint_marker(pcfg))
    writer.save("vgg")
    det = build_model(_detection_cfg("configs/RetinaNet/R18-FPN-shapes-cpu-FP.yaml"))
    with pytest.raises(CheckpointError, match="build_vgg16_ssd_backbone.*does not fit"):
        AQDCheckpointer(det).load(str(tmp_path / "vgg.pth"))
