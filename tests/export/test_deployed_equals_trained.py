"""Deployed equals trained (issue 19): after a real short training on the embedded data, the
packed file loaded for inference with the real kernels gives the trained detector's detections
bit for bit, and every quantized layer of the deployed model receives exactly the input the
trained model's layer receives (so every binary and k-bit activation code is the same), on
each kernel variant this CPU runs (AVX-512 VNNI, AVX2, portable C++, the PyTorch fallbacks).
tools/test_avx2_path.sh runs this file again with torch's own float kernels capped at AVX2.

Why it holds: in eval mode the trained model's quantized layers compute their integer form
(aqd_d2/layers/integer_eval.py: exact sums of codes, then the deployed kernels' epilogue with
the same constants), and the deployment keeps every float layer as it is.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from aqd_d2.export import save_packed
from aqd_d2.export import binary_conv as bc
from aqd_d2.export.deploy import load_for_inference
from aqd_d2.export.int8_gemm import Int8ConvInference, int8_available_isas
from aqd_d2.export.binary_conv import BinaryConv2dInference
from aqd_d2.layers import QConv2d, QLinear

pytestmark = pytest.mark.usefixtures("single_thread")

# (config, dataset of its images, overrides, deployed kernel kinds that must appear)
DETECTORS = {
    "binary-frcnn-fpn": ("configs/FasterRCNN/R18-FPN-shapes-cpu-binary-boxhead.yaml", "aqd_shapes_tiny_val",
                         ["MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                          "MODEL.RPN.POST_NMS_TOPK_TEST", "100"], {"binary"}),
    "binary-frcnn-c4": ("configs/FasterRCNN/R18-C4-shapes-voc-cpu-BNN.yaml", "aqd_shapes_voc_tiny_val",
                        ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RPN.POST_NMS_TOPK_TEST", "100"],
                        {"binary"}),
    "binary-ssd": ("configs/SSD/VGG16-shapes-voc-cpu-XNOR.yaml", "aqd_shapes_voc_tiny_val", [], {"binary"}),
    "2bit-retinanet": ("configs/RetinaNet/R18-FPN-shapes-cpu-2bit.yaml", "aqd_shapes_tiny_val",
                       ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"], {"int8"}),
    "4bit-retinanet": ("configs/RetinaNet/R18-FPN-shapes-cpu-4bit.yaml", "aqd_shapes_tiny_val",
                       ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"], {"int8"}),
}
TRAIN_ITERS = 12


def _kernel_choices():
    """``(id, environment)`` for every kernel variant this CPU and build run."""
    out = [("torch-fallbacks", {"AQD_BINARY_KERNEL": "torch", "AQD_INT8_KERNEL": "torch"})]
    binary = bc.available_isas()
    int8 = int8_available_isas()
    for isa in sorted(set(binary) | set(int8)):
        env = {}
        if isa in binary:
            env["AQD_BINARY_ISA"] = isa
        if isa in int8:
            env["AQD_INT8_ISA"] = isa
        out.append((f"cpp-{isa}", env))
    return out


KERNELS = _kernel_choices()


def _images(dataset: str, n: int = 3):
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    batch = []
    for rec in DatasetCatalog.get(dataset)[:n]:
        img = read_image(rec["file_name"], format="BGR")
        batch.append({"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))).float(),
                      "height": img.shape[0], "width": img.shape[1]})
    return batch


_TRAINED = {}


def _trained(key: str, tmp_path_factory):
    """The detector of ``DETECTORS[key]`` after TRAIN_ITERS SGD iterations on the embedded
    training set (the config's own loader, mapper, optimizer and learning rate), its packed
    file, and the config. Cached per test session: the kernel variants share one training."""
    if key in _TRAINED:
        return _TRAINED[key]
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from aqd_d2.engine.trainer import Trainer
    from tests.test_configs import load_test_config

    config, _, extra, _ = DETECTORS[key]
    torch.manual_seed(0)
    cfg = load_test_config(config, narrow=True, extra=[
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "TEST.DETECTIONS_PER_IMAGE", "20",
        "SOLVER.WARMUP_ITERS", "0", "SEED", "0", *extra])
    model = build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    data = iter(Trainer.build_train_loader(cfg))
    model.train()
    with EventStorage(0) as storage:
        for i in range(TRAIN_ITERS):
            storage.iter = i
            losses = model(next(data))
            loss = sum(losses.values())
            assert torch.isfinite(loss), losses
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    path = tmp_path_factory.mktemp(key) / "model.packed"
    save_packed(model, str(path))
    _TRAINED[key] = (cfg, model, str(path))
    return _TRAINED[key]


def _record_inputs(model, names):
    """Forward pre-hooks recording the first input of the modules named ``names``."""
    seen, handles = {}, []
    mods = dict(model.named_modules())
    for n in names:
        handles.append(mods[n].register_forward_pre_hook(
            lambda m, inp, n=n: seen.setdefault(n, []).append(inp[0].detach().clone())))
    return seen, handles


@pytest.mark.parametrize("kernels", [k[1] for k in KERNELS], ids=[k[0] for k in KERNELS])
@pytest.mark.parametrize("key", list(DETECTORS))
def test_deployed_detector_equals_trained(key, kernels, tmp_path_factory, monkeypatch):
    from detectron2.modeling import build_model

    for var in ("AQD_BINARY_KERNEL", "AQD_INT8_KERNEL", "AQD_BINARY_ISA", "AQD_INT8_ISA"):
        monkeypatch.delenv(var, raising=False)
    for var, value in kernels.items():
        monkeypatch.setenv(var, value)
    cfg, model, path = _trained(key, tmp_path_factory)
    _, dataset, _, kinds = DETECTORS[key]
    batch = _images(dataset)
    quantized = [n for n, m in model.named_modules()
                 if isinstance(m, (QConv2d, QLinear)) and m.input_quantizer is not None]
    assert len(quantized) > 5

    seen_ref, handles = _record_inputs(model, quantized)
    with torch.no_grad():
        ref = [o["instances"] for o in model(batch)]
    for h in handles:
        h.remove()

    deployed, report = load_for_inference(build_model(cfg), path)
    assert kinds <= {r[1] for r in report.rows}, report.table()
    kernel_mods = [n for n, m in deployed.named_modules() if isinstance(m, (BinaryConv2dInference, Int8ConvInference))]
    assert len(kernel_mods) > 5, report.table()
    seen_dep, handles = _record_inputs(deployed, quantized)
    with torch.no_grad():
        out = [o["instances"] for o in deployed(batch)]
    for h in handles:
        h.remove()

    # every quantized layer sees exactly what the trained layer sees: the same codes
    assert set(seen_dep) == set(seen_ref) and len(seen_ref) == len(quantized)
    for n in quantized:
        assert len(seen_dep[n]) == len(seen_ref[n]), n
        for a, b in zip(seen_ref[n], seen_dep[n]):
            assert torch.equal(a, b), f"{n}: input differs by {(a - b).abs().max().item():.3g}"
    # hence the same detections: same classes, boxes and scores, bit for bit (the issue asks
    # for 1e-3 px and 1e-4)
    for a, b in zip(ref, out):
        assert len(a) == len(b) > 0
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
