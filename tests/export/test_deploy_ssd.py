"""Binary SSD300-VGG16 (configs/SSD, paper 000's binary SSD): its packed file, loaded for
inference with the real XNOR-popcount kernel, gives the fake-quantized detector's detections
on the embedded VOC-layout dataset's images: bit for bit those of the trained detector in
eval mode (its integer form, aqd_d2/layers/integer_eval.py), on any CPU; and those agree with
the fake-quantized detector whose quantized convolutions are computed exactly
(tests/export/exact_reference.py) to float32 rounding."""
import numpy as np
import pytest
import torch
from torch import nn

from aqd_d2.export import binary_conv as bc
from aqd_d2.export import packed_size_report, save_packed
from aqd_d2.export.deploy import load_for_inference
from aqd_d2.layers import QConv2d

from .exact_reference import ExactQuantizedConvs

# one intra-op thread per module (tests/conftest.py); set here, it is restored afterwards
pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = "configs/SSD/VGG16-shapes-voc-cpu-XNOR.yaml"


def _voc_images(n: int = 3):
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    batch = []
    for rec in DatasetCatalog.get("aqd_shapes_voc_tiny_val")[:n]:
        img = read_image(rec["file_name"], format="BGR")
        batch.append({"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))).float(),
                      "height": img.shape[0], "width": img.shape[1]})
    return batch


@pytest.mark.parametrize("fold_bn", [False, True], ids=["float-bn-kept", "float-bn-folded"])
def test_packed_binary_ssd_equals_fake_quant(tmp_path, fold_bn):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from tests.test_configs import load_test_config, tiny_batch

    torch.manual_seed(0)
    cfg = load_test_config(CONFIG, narrow=True)
    model = build_model(cfg)
    model.train()
    with EventStorage(0), torch.no_grad():
        model(tiny_batch())  # BN statistics, data-initialised quantizers
    for conv in model.head.cls_score:  # spread the class scores (a random init scores alike)
        nn.init.normal_(conv.weight, std=0.002)  # (binary features are large: keep scores < 1)
    model.eval()
    batch = _voc_images()
    with torch.no_grad():  # the trained model in eval mode: its integer form
        ref = [o["instances"] for o in model(batch)]
    # that is the fake-quantized detector: against its quantized convolutions computed exactly
    # (sum of +-alpha in float64, rounded once, BN as a module), the same detections up to
    # float32 rounding
    with torch.no_grad(), ExactQuantizedConvs(model) as exact:
        exact_ref = [o["instances"] for o in model(batch)]
    assert len(exact.layers) > 10
    for a, b in zip(exact_ref, ref):
        assert torch.equal(a.pred_classes, b.pred_classes)
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, rtol=1e-4, atol=1e-3)

    path = tmp_path / "ssd.packed"
    report = save_packed(model, str(path))
    assert report.ratio > 2 and len(report.layers) > 10  # narrow test model: the float head weighs more
    assert packed_size_report(model).packed_bytes == report.packed_bytes
    deployed, dep = load_for_inference(build_model(cfg), str(path), fold_bn=fold_bn)
    assert dep.count("binary") == len(report.layers), dep.table()
    assert not any(isinstance(m, QConv2d) and m.weight_quantizer is not None and int(m.weight_quantizer.bits) == 1
                   for m in deployed.modules())
    with torch.no_grad():
        out = [o["instances"] for o in deployed(batch)]
    for a, b in zip(ref, out):
        assert len(a) == len(b) and len(a) > 0
        assert torch.equal(a.pred_classes, b.pred_classes)
        if fold_bn:  # BN folded into the float convs too: a few float32 roundings per layer
            torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
        else:  # exact popcounts, the trained model's epilogue and folded BN: bit for bit
            assert torch.equal(b.scores, a.scores) and torch.equal(b.pred_boxes.tensor, a.pred_boxes.tensor)
