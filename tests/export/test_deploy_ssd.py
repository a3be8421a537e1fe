"""Binary SSD300-VGG16 (configs/SSD, paper 000's binary SSD): its packed file, loaded for
inference with the real XNOR-popcount kernel, gives the fake-quantized detector's detections
on the embedded VOC-layout dataset's images."""
import numpy as np
import pytest
import torch
from torch import nn

from aqd_d2.export import packed_size_report, save_packed
from aqd_d2.export.deploy import load_for_inference
from aqd_d2.layers import QConv2d

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


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn-kept", "bn-folded"])
def test_packed_binary_ssd_equals_fake_quant(tmp_path, fold_bn):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from tests.test_configs import load_test_config, tiny_batch

    torch.set_num_threads(1)
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
    with torch.no_grad():
        ref = [o["instances"] for o in model(batch)]

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
        if fold_bn:  # BN folded into the kernel's scale / bias: equal to float32 rounding
            torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
        else:  # integer popcounts + the same float ops as the fake-quantized model
            torch.testing.assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, rtol=1e-5, atol=1e-4)
