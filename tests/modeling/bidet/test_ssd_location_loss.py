"""BiDetSSD's location term: the paper's Gaussian -log p(l|f)/p(l) (default) and the official
BiDet SSD code's smooth L1 on a posterior sample (MODEL.BIDET.SSD_LOCATION_LOSS), against
hand-computed values; the config key's validation."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from aqd_d2.config import ConfigError
from tests.test_configs import load_test_config, tiny_batch

CPU = "configs/BiDet/SSD300-VGG16-shapes-voc-cpu-BiDet.yaml"
TARGET = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
MEAN = torch.zeros(1, 4)


def _model(*extra):
    torch.manual_seed(0)
    return build_model(load_test_config(CPU, extra=list(extra), narrow=True)).train()


def test_default_is_the_papers_gaussian_term():
    model = _model()
    assert model.location_loss == "gaussian"
    lv = torch.full((1, 4), math.log(2.0))
    # 0.5 * ((l - 0)^2 / 2 + log 2) - 0.5 * l^2 per offset, summed
    expect = sum(0.5 * (t * t / 2 + math.log(2.0)) - 0.5 * t * t for t in TARGET[0].tolist())
    assert float(model.location_term(TARGET, MEAN, lv)[0]) == pytest.approx(expect, rel=1e-6)


def test_official_variant_smooth_l1_of_the_means():
    model = _model("MODEL.BIDET.SSD_LOCATION_LOSS", "sampled_smooth_l1")
    lv = torch.zeros(1, 4, requires_grad=True)
    # sample scale 0: smooth L1 (beta 1) of mu - l = (-1, 1, -2, -0.5): 0.5 + 0.5 + 1.5 + 0.125
    out = model.location_term(TARGET, MEAN, lv)
    assert float(out[0]) == pytest.approx(2.625, rel=1e-6)


def test_official_variant_with_sampling():
    model = _model("MODEL.BIDET.SSD_LOCATION_LOSS", "sampled_smooth_l1",
                   "MODEL.BIDET.SSD_SAMPLE_SCALE", "0.5")
    lv = torch.full((1, 4), math.log(4.0), requires_grad=True)  # std 2
    torch.manual_seed(7)
    eps = torch.randn(1, 4)
    torch.manual_seed(7)
    out = model.location_term(TARGET, MEAN, lv)
    d = (0.5 * 2.0 * eps - TARGET).abs()[0].tolist()  # sample = 0 + 0.5 * 2 * eps
    expect = sum(x - 0.5 if x >= 1 else 0.5 * x * x for x in d)
    assert float(out[0]) == pytest.approx(expect, rel=1e-5)
    out.sum().backward()
    assert lv.grad is not None and lv.grad.abs().sum() > 0  # the variance is learnt


def test_training_step_with_the_official_variant_is_finite():
    model = _model("MODEL.BIDET.SSD_LOCATION_LOSS", "sampled_smooth_l1")
    with EventStorage(0):
        losses = model(tiny_batch())
    assert set(losses) == {"loss_ib_feature", "loss_cls", "loss_box_ib", "loss_sop"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_box_ib"]) >= 0  # a smooth L1, unlike the Gaussian log-ratio


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="MODEL.BIDET.SSD_LOCATION_LOSS"):
        _model("MODEL.BIDET.SSD_LOCATION_LOSS", "l2")
    with pytest.raises(ConfigError, match="MODEL.BIDET.SSD_SAMPLE_SCALE"):
        _model("MODEL.BIDET.SSD_SAMPLE_SCALE", "-1.0")
