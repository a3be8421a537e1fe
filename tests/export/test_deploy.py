"""convert_for_inference / load_for_inference: real binary and int8 layers compute what the
fake-quantized layers compute (to the float32 rounding of their own epilogue, against the
fake-quantized layer computed exactly: tests/export/exact_reference.py), and a packed +
deployed detector gives the fake-quantized detector's detections on the embedded dataset's
images."""
import numpy as np
import pytest
import torch
from torch import nn

from aqd_d2.export import save_packed
from aqd_d2.export.binary_conv import BinaryConv2dInference
from aqd_d2.export.deploy import (
    BinaryLinearInference,
    Int8ConvInference,
    convert_for_inference,
    int8_gemm_available,
    load_for_inference,
)
from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.quantization import build_quantizer

from .exact_reference import assert_within, fake_quant_exact, float_terms

SPECS = [  # (w method, w bits, a method, a bits, expected deployment)
    ("xnor", 1, "xnor", 1, BinaryConv2dInference),
    ("bnn", 1, "bnn", 1, BinaryConv2dInference),
    ("liq", 2, "liq", 2, Int8ConvInference),
    ("liq", 4, "liq", 4, Int8ConvInference),
    ("lsq", 3, "lsq", 3, Int8ConvInference),
    ("dorefa", 4, "dorefa", 4, Int8ConvInference),
    ("bwn", 1, "liq", 4, Int8ConvInference),
    ("liq", 4, "fp", 32, QConv2d),  # weight-only: frozen fake-quant weight
]


# one intra-op thread per module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """One training-mode forward (data-initialised quantizers, BN statistics), then eval."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _qconv(wm, wb, am, ab, stride, groups_ok=True):
    aq = None if ab >= 32 else build_quantizer(am, ab, "activation")
    return QConv2d(16, 24, 3, stride=stride, padding=1, bias=True, norm=nn.BatchNorm2d(24),
                   activation=nn.ReLU(), weight_quantizer=build_quantizer(wm, wb, "weight"),
                   input_quantizer=aq)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s[0]}{s[1]}-{s[2]}{s[3]}")
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_layer_matches_fake_quant(spec, stride):
    if spec[4] is Int8ConvInference and not int8_gemm_available():
        pytest.skip("torch._int_mm unavailable")
    torch.manual_seed(0)
    m = nn.Sequential(_qconv(*spec[:4], stride))
    x = torch.randn(2, 16, 11, 9)
    _calibrated(m, x)
    with torch.no_grad():
        dep, report = convert_for_inference(m)
        out = dep(x)
    assert isinstance(dep[0], spec[4]), report.table()
    assert isinstance(m[0], QConv2d)  # not in place by default
    ref, mag = fake_quant_exact(m[0], x)
    assert_within(out, ref, mag, float_terms(dep[0]), report.table())


def test_linear_layers_match_fake_quant():
    torch.manual_seed(0)
    m = nn.Sequential(
        QLinear(70, 33, weight_quantizer=build_quantizer("xnor", 1, "weight"),
                input_quantizer=build_quantizer("xnor", 1, "activation")),
        QLinear(33, 9, weight_quantizer=build_quantizer("liq", 2, "weight"),
                input_quantizer=build_quantizer("liq", 2, "activation")),
    )
    x = torch.randn(13, 70)
    _calibrated(m, x)
    with torch.no_grad():
        dep, report = convert_for_inference(m)
        hidden = dep[0](x)
        out = dep[1](hidden)
    assert isinstance(dep[0], BinaryLinearInference)
    assert report.count("binary") == 1
    for i, (inp, o) in enumerate(((x, hidden), (hidden, out))):  # each layer on what it sees
        ref, mag = fake_quant_exact(m[i], inp)
        assert_within(o, ref, mag, float_terms(dep[i]), f"layer {i}: {report.table()}")


def test_xnor_activation_scale_falls_back_to_frozen_weight():
    torch.manual_seed(0)
    m = nn.Sequential(QConv2d(8, 8, 3, padding=1, weight_quantizer=build_quantizer("xnor", 1, "weight"),
                              input_quantizer=build_quantizer("xnor", 1, "activation", scale_activations=True)))
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        ref = m.eval()(x)
        dep, report = convert_for_inference(m)
        out = dep(x)
    assert report.rows[0][1] == "fake-quant weight frozen" and "scale K" in report.rows[0][2]
    assert not bool(dep[0].weight_quantizer.enabled)
    torch.testing.assert_close(out, ref)


# ---- whole detectors: packed file -> inference model == fake-quantized model -----------------
def _shapes_images(n: int = 4):
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    batch = []
    for rec in DatasetCatalog.get("aqd_shapes_tiny_val")[:n]:
        img = read_image(rec["file_name"], format="BGR")
        batch.append({"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))).float(),
                      "height": img.shape[0], "width": img.shape[1]})
    return batch


def _detections(model, batch):
    with torch.no_grad():
        return [o["instances"] for o in model(batch)]


def _assert_same_detections(ref, out):
    for a, b in zip(ref, out):
        assert len(a) == len(b) and len(a) > 0
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-4)
        assert torch.equal(b.pred_classes, a.pred_classes)
        torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("config, extra, kinds, fold_bn", [
    # BNN (unscaled signs), BN not folded: every op of the deployed model is exact or the same
    # float op as in the fake-quantized model, so the detections are bit-identical.
    ("configs/FasterRCNN/R18-FPN-shapes-cpu-binary-boxhead.yaml",
     ["MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
      "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.QUANT.W_METHOD", "bnn",
      "MODEL.QUANT.A_METHOD", "bnn"], {"binary"}, False),
    # 2-bit LIQ on the int8 path with BN folded: equal to float32 rounding
    ("configs/RetinaNet/R18-FPN-shapes-cpu-2bit.yaml", ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.2"],
     {"int8"}, True),
], ids=["binary-frcnn-exact", "2bit-retinanet"])
def test_packed_detector_equals_fake_quant(tmp_path, config, extra, kinds, fold_bn):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from tests.test_configs import load_test_config, tiny_batch

    torch.manual_seed(0)
    cfg = load_test_config(config, extra=extra, narrow=True)
    model = build_model(cfg)
    model.train()
    with EventStorage(0), torch.no_grad():
        model(tiny_batch())  # data-initialised quantizers, non-trivial BN statistics
    # spread the classification scores (a random init scores every box alike)
    pred = model.roi_heads.box_predictor.cls_score if hasattr(model, "roi_heads") else model.head.cls_score
    nn.init.normal_(pred.weight, std=0.5)
    nn.init.zeros_(pred.bias)
    model.eval()
    batch = _shapes_images()
    ref = _detections(model, batch)

    path = tmp_path / "model.packed"
    save_packed(model, str(path))
    fresh = build_model(cfg)
    deployed, report = load_for_inference(fresh, str(path), fold_bn=fold_bn)
    assert kinds <= {r[1] for r in report.rows}, report.table()
    assert not any(isinstance(m, (QConv2d, QLinear)) and m.input_quantizer is not None
                   and int(m.input_quantizer.bits) <= 2 for m in deployed.modules())
    out = _detections(deployed, batch)
    _assert_same_detections(ref, out)
    if not fold_bn:
        for a, b in zip(ref, out):
            assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    # every deployed layer equals its fake-quantized layer, computed exactly, on the inputs that
    # layer sees in the detector, to the float32 rounding of the deployed layer's own epilogue
    # (tests/export/exact_reference.py). Not against the fake-quantized layer's float32
    # output: that one is a float32 convolution whose rounding depends on the CPU's kernel
    # (2.9e-4 of 24, beyond 1e-5 relative, with oneDNN's AVX2 kernel). (Whole feature maps of
    # a 2-bit network are compared only through the detections: a float32 rounding difference
    # that lands on a 2-bit threshold flips one code, and deep random-init 2-bit networks
    # amplify that.)
    deployed_mods = dict(deployed.named_modules())
    checked = []

    def compare(name):
        def hook(module, inputs, output):
            ours = deployed_mods[name](inputs[0].clone())
            ref, mag = fake_quant_exact(module, inputs[0])
            assert_within(ours, ref, mag, float_terms(deployed_mods[name]), name)
            checked.append(name)
        return hook

    handles = [m.register_forward_hook(compare(n)) for n, m in model.named_modules()
               if isinstance(m, (QConv2d, QLinear)) and not isinstance(deployed_mods[n], (QConv2d, QLinear))]
    # the FPN runs its convs from python lists: those must be the deployed modules too
    fpn = deployed.backbone
    assert not any(isinstance(c, (QConv2d, QLinear)) for c in list(fpn.lateral_convs) + list(fpn.output_convs))
    with torch.no_grad():
        model(batch[:2])
    for h in handles:
        h.remove()
    assert len(set(checked)) == len(handles) > 10


def test_export_and_infer_tools(tmp_path):
    """tools/export_model.py writes a packed file; tools/infer_packed.py runs it on dataset
    images with the real kernels and draws a PNG."""
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import REPO

    cfg = str(REPO / "configs/FasterRCNN/R18-FPN-shapes-cpu-binary-boxhead.yaml")
    narrow = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]
    packed, png = tmp_path / "m.packed", tmp_path / "det.png"
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=REPO, timeout=180)
    res = run(str(REPO / "tools/export_model.py"), "--config-file", cfg, "--output", str(packed), *narrow)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "packed layers" in res.stdout
    # --keep-bn-state: the norms keep gamma/beta/mean/var (a file for fine-tuning), bigger
    kept = tmp_path / "kept.packed"
    res = run(str(REPO / "tools/export_model.py"), "--config-file", cfg, "--output", str(kept),
              "--keep-bn-state", *narrow)
    assert res.returncode == 0, res.stderr[-3000:]
    from aqd_d2.export.packing import _read

    affine, full = _read(str(packed)), _read(str(kept))
    assert full["norms"] == {} and len(affine["norms"]) > 20
    assert kept.stat().st_size > packed.stat().st_size
    res = run(str(REPO / "tools/infer_packed.py"), "--config-file", cfg, "--packed", str(packed),
              "--dataset", "aqd_shapes_tiny_val", "--num-images", "2", "--output", str(png),
              "--threads", "1", *narrow)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "'binary': 27" in res.stdout  # Bi-Real backbone: 1x1 shortcuts stay float
    w, h = Image.open(png).size
    assert w > 2 * 128 and h > 128
