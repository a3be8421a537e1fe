"""BiDet-SSD location term and MODEL.BIDET.LOGVAR_CLAMP (issue 5).

Paper 000 eq. 7, location part: ``0.5 ((l - mu)^2 exp(-lv) + lv) - 0.5 l^2`` per offset, so
d/dmu = (mu - l) exp(-lv): the clamp of the predicted log-variance bounds how much the term
amplifies the box means' gradient (e^10 = 22026 with the default 10, which let the CPU twin's
posterior means run to 1e10+; e^2 = 7.39 with the twins' 2).
"""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

import aqd_d2
from aqd_d2.modeling.bidet.losses import location_info_loss
from aqd_d2.modeling.bidet.ssd import BiDetSSDHead
from tests.conftest import REPO


def _head(clamp: float) -> BiDetSSDHead:
    head = BiDetSSDHead(input_shape=[ShapeSpec(channels=2)], num_classes=1, num_anchors=[1],
                        logvar_clamp=clamp)
    with torch.no_grad():  # log-variance conv output -50 everywhere, box means 0
        head.bbox_logvar[0].weight.zero_()
        head.bbox_logvar[0].bias.fill_(-50.0)
        head.bbox_pred[0].weight.zero_()
        head.bbox_pred[0].bias.zero_()
    return head.train()


@pytest.mark.parametrize("clamp", [2.0, 10.0])
def test_mean_gradient_is_bounded_by_the_clamp(clamp):
    head = _head(clamp)
    _, deltas, logvars = head([torch.zeros(1, 2, 1, 1)])
    assert torch.allclose(logvars[0], torch.full((1, 4, 1, 1), -clamp))
    mu = deltas[0].view(4).detach().requires_grad_(True)
    lv = logvars[0].view(4)
    target = torch.tensor([1.0, -1.0, 2.0, 0.5])
    loss = location_info_loss(target, mu, lv).sum()
    loss.backward()
    # hand-computed: d/dmu = (mu - l) e^{-lv} with mu = 0, lv = -clamp
    expect = -target * math.exp(clamp)
    assert torch.allclose(mu.grad, expect, rtol=1e-5)
    # value: 0.5 * (l^2 e^{clamp} - clamp) - 0.5 l^2, summed over the 4 offsets
    value = sum(0.5 * (t * t * math.exp(clamp) - clamp) - 0.5 * t * t for t in target.tolist())
    assert float(loss) == pytest.approx(value, rel=1e-5)


def test_cpu_twins_use_the_tight_clamp_and_the_paper_configs_do_not():
    def clamp(rel):
        cfg = aqd_d2.add_aqd_config(get_cfg())
        cfg.merge_from_file(str(REPO / rel))
        return cfg.MODEL.BIDET.LOGVAR_CLAMP

    assert clamp("configs/BiDet/SSD300-VGG16-shapes-voc-cpu-BiDet.yaml") == 2.0
    assert clamp("configs/BiDet/SSD300-VGG16-shapes-voc-cpu-AutoBiDet.yaml") == 2.0
    assert clamp("configs/BiDet/SSD300-VGG16-VOC-BiDet.yaml") == 10.0
