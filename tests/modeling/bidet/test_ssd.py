"""BiDetSSD: loss dict of eq. 7 for one-stage detectors, gradient routing, the per-image beta
weighting, the log-variance branch kept real-valued and dropped at inference."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tests.test_configs import load_test_config, tiny_batch

CPU = "configs/BiDet/SSD300-VGG16-shapes-voc-cpu-BiDet.yaml"


def _model(extra=()):
    torch.manual_seed(0)
    cfg = load_test_config(CPU, extra=list(extra), narrow=True)
    return build_model(cfg).train()


def _grads(loss, model):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    return {n for (n, _), g in zip(params, gs) if g is not None and g.abs().sum() > 0}


def test_losses_and_gradient_routing():
    model = _model()
    with EventStorage(0):
        losses = model(tiny_batch())
    assert set(losses) == {"loss_ib_feature", "loss_cls", "loss_box_ib", "loss_sop"}
    fe = _grads(losses["loss_ib_feature"], model)
    assert fe and all(n.startswith("backbone.") for n in fe)
    sop = _grads(losses["loss_sop"], model)
    assert any(n.startswith("head.cls_score.") for n in sop)
    assert not any(n.startswith(("head.bbox_pred.", "head.bbox_logvar.")) for n in sop)
    box = _grads(losses["loss_box_ib"], model)
    assert any(n.startswith("head.bbox_logvar.") for n in box)
    assert any(n.startswith("head.bbox_pred.") for n in box)
    assert not any(n.startswith("head.cls_score.") for n in box)
    # the log-variance convs are prediction layers: real-valued like cls_score / bbox_pred
    quantized = set(model.quant_report.quantized_names())
    assert not any(n.startswith("head.bbox_logvar") for n in quantized)


def test_beta_scales_class_and_location_terms():
    out = {}
    for beta in (1.0, 4.0):
        model = _model(["MODEL.BIDET.BETA", str(beta)])
        torch.manual_seed(3)
        with EventStorage(0):
            out[beta] = {k: float(v.detach()) for k, v in model(tiny_batch()).items()}
    for k in ("loss_cls", "loss_box_ib"):
        assert out[4.0][k] == pytest.approx(4 * out[1.0][k], rel=1e-4)
    assert out[4.0]["loss_ib_feature"] == pytest.approx(out[1.0]["loss_ib_feature"], rel=1e-5)


def test_inference_without_variance_branch_is_deterministic():
    model = _model().eval()
    feats = [torch.randn(1, c.in_channels, 2, 2) for c in model.head.cls_score]
    assert len(model.head(feats)) == 2
    with torch.no_grad():
        a = model(tiny_batch(1, with_gt=False))[0]["instances"]
        b = model(tiny_batch(1, with_gt=False))[0]["instances"]
    assert torch.equal(a.scores, b.scores) and a.image_size == (64, 64)
