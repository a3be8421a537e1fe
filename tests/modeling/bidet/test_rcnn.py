"""BiDetRCNN / BiDetROIHeads: the loss dict of eq. 7, gradients reaching the right parameters
only, per-image beta weighting, the variance branch dropped at inference, config errors."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from aqd_d2.config import ConfigError
from tests.test_configs import load_test_config, tiny_batch

BIDET = "configs/BiDet/FasterRCNN-R18-shapes-voc-cpu-BiDet.yaml"
AUTO = "configs/BiDet/FasterRCNN-R18-shapes-voc-cpu-AutoBiDet.yaml"


def _model(path=BIDET, extra=()):
    torch.manual_seed(0)
    cfg = load_test_config(path, extra=list(extra), narrow=True)
    return cfg, build_model(cfg).train()


def _grads(loss, params):
    gs = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    return {n for (n, _), g in zip(params, gs) if g is not None and g.abs().sum() > 0}


@pytest.fixture(scope="module")
def losses_and_model():
    cfg, model = _model()
    with EventStorage(0):
        losses = model(tiny_batch())
    return cfg, model, losses


def test_loss_dict_and_gradient_routing(losses_and_model):
    _, model, losses = losses_and_model
    assert {"loss_ib_feature", "loss_cls", "loss_box_ib", "loss_sop", "loss_rpn_cls",
            "loss_rpn_loc"} <= set(losses)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fe = _grads(losses["loss_ib_feature"], params)
    assert fe and all(n.startswith("backbone.") for n in fe)
    sop = _grads(losses["loss_sop"], params)
    assert "roi_heads.box_predictor.cls_score.weight" in sop
    assert not any("bbox_pred" in n or "bbox_logvar" in n or "proposal_generator" in n for n in sop)
    box = _grads(losses["loss_box_ib"], params)
    assert {"roi_heads.box_predictor.bbox_pred.weight",
            "roi_heads.box_predictor.bbox_logvar.weight"} <= box
    assert "roi_heads.box_predictor.cls_score.weight" not in box
    cls = _grads(losses["loss_cls"], params)
    assert "roi_heads.box_predictor.cls_score.weight" in cls
    assert not any("bbox_logvar" in n for n in cls)


def test_beta_scales_the_detection_terms_only():
    out = {}
    for beta in (1.0, 10.0):
        _, model = _model(extra=["MODEL.BIDET.BETA", str(beta)])
        torch.manual_seed(1)
        with EventStorage(0):
            out[beta] = {k: float(v) for k, v in model(tiny_batch()).items()}
    for k in ("loss_cls", "loss_box_ib"):
        assert out[10.0][k] == pytest.approx(10 * out[1.0][k], rel=1e-4)
    for k in ("loss_ib_feature", "loss_rpn_cls"):
        assert out[10.0][k] == pytest.approx(out[1.0][k], rel=1e-4)


def test_warmup_switches_terms_off():
    _, model = _model(extra=["MODEL.BIDET.WARMUP_ITERS", "5"])
    with EventStorage(0):
        early = model(tiny_batch())
    assert float(early["loss_ib_feature"]) == 0.0 and float(early["loss_sop"]) == 0.0
    with EventStorage(5):
        late = model(tiny_batch())
    assert float(late["loss_ib_feature"]) > 0.0


def test_inference_drops_variance_branch_and_is_deterministic():
    _, model = _model()
    model.eval()
    x = torch.randn(3, 1024)
    assert len(model.roi_heads.box_predictor(x)) == 2
    with torch.no_grad():
        a = model(tiny_batch(1, with_gt=False))[0]["instances"]
        b = model(tiny_batch(1, with_gt=False))[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_estimator_not_in_detector_optimizer_and_float():
    cfg, model = _model(AUTO)
    est = model.bidet.estimator
    opt_ids = {id(p) for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert est is not None and not any(id(p) in opt_ids for p in est.parameters())
    assert not any(n.startswith("bidet.") for n in model.quant_report.quantized_names())
    with EventStorage(0):
        losses = model(tiny_batch())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in est.parameters())


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="MODEL.BIDET.SOP"):
        _model(extra=["MODEL.BIDET.SOP", "sparse"])
    with pytest.raises(ConfigError, match="AQD.TRAIN_LOOP"):
        _model(AUTO, extra=["AQD.TRAIN_LOOP", "AQDTrainLoop"])
    with pytest.raises(ConfigError, match="MODEL.BIDET.AUTO.IN_FEATURE"):
        _model(AUTO, extra=["MODEL.BIDET.AUTO.IN_FEATURE", "res9"])
    with pytest.raises(ValueError, match="MODEL.MASK_ON"):
        _model(extra=["MODEL.MASK_ON", "True"])
