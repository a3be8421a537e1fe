"""Fused multi-level ROIAlign (csrc/roi_align.cpp, aqd_d2.export.roi_pooler): equal to
detectron2's ROIPooler bit for bit; FastROIPooler falls back to it; a converted float Faster
R-CNN gives the unconverted one's detections (the pooler bit for bit, the float conversions
within the float32 rounding bound of each layer)."""
from pathlib import Path

import pytest
import torch

import aqd_d2
from aqd_d2.export import roi_pooler as rp
from aqd_d2.export.deploy import convert_for_inference
from aqd_d2.export.float_linear import OneDNNLinear, onednn_linear_available
from aqd_d2.export.roi_pooler import (
    FastROIPooler,
    convert_roi_poolers,
    roi_align_isas,
    roi_align_kernel,
    roi_align_multilevel,
)
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.structures import Boxes

from .exact_reference import assert_within, float_exact

REPO = Path(__file__).resolve().parents[2]

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
needs_ext = pytest.mark.skipif(not roi_align_isas(), reason="C++ extension unavailable")


# one intra-op thread per module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def _boxes(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    """Random boxes: partly / fully outside the image, tiny (< 1 px), huge (4x the image),
    degenerate (zero width) and inverted."""
    xy = torch.rand(n, 2, generator=g) * size * 1.4 - 0.2 * size
    wh = torch.rand(n, 2, generator=g) ** 3 * size
    b = torch.cat([xy, xy + wh], 1)
    if n < 5:
        return b
    b[0] = torch.tensor([-3.0 * size, -2.0 * size, -1.5 * size, -size])  # fully outside
    b[1] = torch.tensor([-1.5 * size, -1.5 * size, 2.5 * size, 2.5 * size])  # huge
    b[2] = torch.tensor([5.0, 6.0, 5.3, 6.2])  # tiny
    b[3] = torch.tensor([10.0, 10.0, 10.0, 20.0])  # zero width
    b[4] = torch.tensor([20.0, 20.0, 12.0, 11.0])  # inverted
    return b


def _features(g, n, c, size, channels_last):
    feats = [torch.randn(n, c, size // int(1 / s), size // int(1 / s) + 1, generator=g) for s in SCALES]
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    return feats


@needs_ext
@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("channels,channels_last", [(13, False), (24, True), (16, False)])
def test_fused_equals_detectron2_pooler(pooler_type, sampling_ratio, channels, channels_last):
    g = torch.Generator().manual_seed(channels + sampling_ratio)
    size = 64
    feats = _features(g, 3, channels, size, channels_last)
    box_lists = [Boxes(_boxes(g, k, size)) for k in (40, 0, 25)]  # an image without boxes
    # canonical box 24 px (not 224) so that the 64-px image's boxes reach all four levels
    ref = ROIPooler((7, 7), SCALES, sampling_ratio, pooler_type, canonical_box_size=24)(feats, box_lists)
    levels = assign_boxes_to_levels(box_lists, 2, 5, 24, 4)
    assert set(levels.tolist()) == {0, 1, 2, 3}  # every level is exercised
    rois = convert_boxes_to_pooler_format(box_lists)
    for isa in roi_align_isas():
        out = roi_align_multilevel(feats, rois, levels, SCALES, 7, sampling_ratio,
                                   pooler_type == "ROIAlignV2", isa=isa)
        assert out.shape == ref.shape and out.is_contiguous()
        assert torch.equal(out, ref), (isa, (out - ref).abs().max())
    fast = FastROIPooler((7, 7), SCALES, sampling_ratio, pooler_type, canonical_box_size=24)
    assert torch.equal(fast(feats, box_lists), ref)


@needs_ext
def test_single_level_non_square_and_zero_boxes():
    g = torch.Generator().manual_seed(3)
    feat = [torch.randn(2, 5, 9, 11, generator=g)]
    box_lists = [Boxes(_boxes(g, 12, 40)), Boxes(_boxes(g, 7, 40))]
    ref = ROIPooler((3, 5), [1 / 4], 0, "ROIAlignV2")(feat, box_lists)
    assert torch.equal(FastROIPooler((3, 5), [1 / 4], 0, "ROIAlignV2")(feat, box_lists), ref)
    strided = [torch.randn(2, 11, 9, 14, generator=g)[:, 1:6, :, 2:13]]  # neither NCHW nor NHWC dense
    ref = ROIPooler(4, [1 / 4], 2, "ROIAlign")(strided, box_lists)
    assert torch.equal(FastROIPooler(4, [1 / 4], 2, "ROIAlign")(strided, box_lists), ref)
    empty = [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))]
    fast = FastROIPooler(7, SCALES, 0, "ROIAlignV2")
    feats = _features(g, 2, 6, 64, False)
    out = fast(feats, empty)
    assert out.shape == (0, 6, 7, 7)
    assert out.shape == ROIPooler(7, SCALES, 0, "ROIAlignV2")(feats, empty).shape


@needs_ext
def test_hand_computed_value():
    """One box, one bin, 2 x 2 samples on a 2 x 2 map, ROIAlignV2 by hand: box (0, 0)-(1, 1) at
    scale 1, shifted by -0.5 -> [-0.5, 0.5]; samples at -0.25 (clamped to 0: weight 1 on pixel
    0) and 0.25 (0.75 on pixel 0, 0.25 on pixel 1) per axis. Values [[1, 2], [3, 5]]:
    samples 1, 0.75+0.5, 0.75+0.75, 0.5625*1+0.1875*2+0.1875*3+0.0625*5 = 1.8125; mean 1.390625."""
    v = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2)
    rois = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]])
    out = roi_align_multilevel([v], rois, torch.zeros(1, dtype=torch.long), [1.0], 1, 2, True)
    assert out.shape == (1, 1, 1, 1) and out.item() == 1.390625


def test_fallback_equals_fused(monkeypatch):
    """AQD_BINARY_KERNEL=torch: FastROIPooler runs detectron2's ROIPooler.forward (same values)."""
    g = torch.Generator().manual_seed(1)
    feats = _features(g, 2, 10, 64, False)
    box_lists = [Boxes(_boxes(g, 30, 64)), Boxes(_boxes(g, 9, 64))]
    fast = FastROIPooler(7, SCALES, 0, "ROIAlignV2")
    ref = ROIPooler(7, SCALES, 0, "ROIAlignV2")(feats, box_lists)
    calls = []
    monkeypatch.setattr(ROIPooler, "forward", lambda self, x, b: calls.append(1) or ROIPooler_forward(self, x, b))
    monkeypatch.setenv("AQD_BINARY_KERNEL", "torch")
    assert torch.equal(fast(feats, box_lists), ref) and calls == [1]
    rois = convert_boxes_to_pooler_format(box_lists)
    levels = assign_boxes_to_levels(box_lists, 2, 5, 224, 4)
    assert torch.equal(roi_align_multilevel(feats, rois, levels, SCALES, 7, 0, True), ref)
    with pytest.raises(RuntimeError, match="avx2"):
        roi_align_multilevel(feats, rois, levels, SCALES, 7, 0, True, isa="avx2")
    # gradients needed: detectron2's path as well (the fused op has no autograd)
    monkeypatch.delenv("AQD_BINARY_KERNEL")
    feats[0].requires_grad_(True)
    out = fast(feats, box_lists)
    assert out.requires_grad and calls == [1, 1]


ROIPooler_forward = ROIPooler.forward


@needs_ext
def test_variant_from_environment(monkeypatch):
    """$AQD_ROI_ISA picks the variant (tools/test_avx2_path.sh: avx2 on an AVX-512 CPU); the
    detectron2 fallback ignores it."""
    monkeypatch.delenv("AQD_BINARY_KERNEL", raising=False)
    monkeypatch.delenv("AQD_ROI_ISA", raising=False)
    assert roi_align_kernel() == f"cpp-{roi_align_isas()[-1]}"
    g = torch.Generator().manual_seed(5)
    feats = _features(g, 2, 8, 64, False)
    box_lists = [Boxes(_boxes(g, 20, 64)), Boxes(_boxes(g, 6, 64))]
    ref = ROIPooler(7, SCALES, 0, "ROIAlignV2")(feats, box_lists)
    for isa in roi_align_isas():
        monkeypatch.setenv("AQD_ROI_ISA", isa)
        assert roi_align_kernel() == f"cpp-{isa}"
        assert torch.equal(FastROIPooler(7, SCALES, 0, "ROIAlignV2")(feats, box_lists), ref)
    monkeypatch.setenv("AQD_ROI_ISA", "avx9")
    with pytest.raises(ValueError, match="AQD_ROI_ISA"):
        roi_align_kernel()
    monkeypatch.setenv("AQD_ROI_ISA", "avx512")
    monkeypatch.setattr(rp, "roi_align_isas", lambda: ["generic"])  # a CPU without it
    with pytest.raises(RuntimeError, match="AQD_ROI_ISA='avx512' is not available"):
        FastROIPooler(7, SCALES, 0, "ROIAlignV2")(feats, box_lists)
    monkeypatch.setenv("AQD_BINARY_KERNEL", "torch")  # detectron2's path: no variant to pick
    assert roi_align_kernel() == "torch"
    assert torch.equal(FastROIPooler(7, SCALES, 0, "ROIAlignV2")(feats, box_lists), ref)


def test_bad_arguments():
    with pytest.raises(ValueError, match="ROIPool"):
        FastROIPooler(7, SCALES, 0, "ROIPool")
    with pytest.raises(ValueError, match="avx9"):
        roi_align_multilevel([torch.zeros(1, 1, 4, 4)], torch.zeros(0, 5), torch.zeros(0), [1.0], 2, isa="avx9")
    with pytest.raises(ValueError, match="scales"):
        roi_align_multilevel([torch.zeros(1, 1, 4, 4)], torch.zeros(0, 5), torch.zeros(0), [1.0, 0.5], 2)


@needs_ext
def test_kernel_rejects_bad_levels_and_batch_index():
    feats = [torch.zeros(1, 2, 4, 4)]
    with pytest.raises(RuntimeError, match="level"):
        roi_align_multilevel(feats, torch.tensor([[0.0, 0, 0, 2, 2]]), torch.tensor([1]), [1.0], 2)
    with pytest.raises(RuntimeError, match="batch index"):
        roi_align_multilevel(feats, torch.tensor([[1.0, 0, 0, 2, 2]]), torch.tensor([0]), [1.0], 2)


def test_convert_keeps_roipool_and_rotated():
    m = torch.nn.ModuleDict({
        "a": ROIPooler(7, SCALES, 0, "ROIAlignV2"),
        "b": ROIPooler(7, SCALES, 0, "ROIPool"),
        "c": ROIPooler(14, SCALES, 2, "ROIAlign"),
    })
    rows = {r[0]: r for r in convert_roi_poolers(m)}
    assert type(m["a"]) is FastROIPooler and m["a"].aligned and m["a"].scales == tuple(SCALES)
    assert type(m["b"]) is ROIPooler and rows["b"][1] == "ROIPooler kept"
    assert type(m["c"]) is FastROIPooler and not m["c"].aligned and m["c"].sampling_ratio == 2
    assert tuple(m["c"].output_size) == (14, 14)


def _frcnn_float():
    cfg = get_cfg()
    aqd_d2.add_aqd_config(cfg)
    cfg.merge_from_file(str(REPO / "configs/FasterRCNN/R18-FPN-shapes-cpu-FP.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "64",
                         "INPUT.MAX_SIZE_TEST", "64", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                         "MODEL.RPN.POST_NMS_TOPK_TEST", "200"])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_converted_float_faster_rcnn_same_detections():
    """The conversion of a float Faster R-CNN: fused ROIAlign, oneDNN linears, BN folded into
    the backbone's convs. The two float conversions round differently from the layers they
    replace, and how much depends on the CPU's float kernels (an AVX2-only CPU moved 3 of 400
    box coordinates of a random-init detector by 3e-3 against the unconverted one), so:

    * detections: against the same conversion with detectron2's pooler, bit for bit (the fused
      ROIAlign is exact, everything else runs the same float ops);
    * each float conversion: on the inputs it receives in the detector, against the replaced
      layer computed exactly, within the a-priori float32 error bound of its dot products
      (tests/export/exact_reference.py), which no summation order crosses."""
    model = _frcnn_float()
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.rand(3, 64, 64, generator=g) * 255, "height": 64, "width": 64},
             {"image": torch.rand(3, 64, 48, generator=g) * 255, "height": 64, "width": 48}]
    with torch.no_grad():
        dep, report = convert_for_inference(model, float_linear=True, fold_bn=True, example_inputs=batch)
        same_float, _ = convert_for_inference(model, float_linear=True, fold_bn=True, roi_pooler=False)
        ref, out = same_float(batch), dep(batch)
    kinds = {r[1] for r in report.rows}
    assert type(dep.roi_heads.box_pooler) is FastROIPooler or not rp._use_fused()
    assert "fused ROIAlign" in kinds and type(model.roi_heads.box_pooler) is ROIPooler  # copy
    assert type(same_float.roi_heads.box_pooler) is ROIPooler
    if onednn_linear_available():
        assert type(dep.roi_heads.box_head.fc1) is OneDNNLinear and "float (oneDNN)" in kinds
    assert "float (BN folded)" in kinds
    for r, o in zip(ref, out):
        a, b = r["instances"], o["instances"]
        assert len(a) == len(b) and len(a) > 0
        assert torch.equal(b.pred_boxes.tensor, a.pred_boxes.tensor)
        assert torch.equal(b.scores, a.scores) and torch.equal(b.pred_classes, a.pred_classes)

    # every converted layer against the layer it replaces, on what that layer receives
    converted = {name for name, kind, _ in report.rows if kind in ("float (BN folded)", "float (oneDNN)")}
    dep_mods = dict(dep.named_modules())
    checked = set()

    def compare(name):
        def hook(module, inputs, output):
            ours = dep_mods[name](inputs[0])
            ref64, mag, n = float_exact(module, inputs[0])
            assert_within(ours, ref64, mag, n, name)
            checked.add(name)
        return hook

    handles = [m.register_forward_hook(compare(n)) for n, m in model.named_modules() if n in converted]
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    assert checked == converted and len(checked) > 10


@needs_ext
def test_traced_graph_uses_detectron2_path():
    fast = FastROIPooler(3, [1 / 4], 0, "ROIAlignV2")
    boxes = [Boxes(torch.tensor([[2.0, 3.0, 20.0, 17.0]]))]

    class Wrap(torch.nn.Module):
        def forward(self, f):
            return fast([f], boxes)

    f = torch.randn(1, 4, 8, 8)
    graph = str(torch.jit.trace(Wrap(), f).graph)
    assert "torchvision::roi_align" in graph and "aqd_binary" not in graph
