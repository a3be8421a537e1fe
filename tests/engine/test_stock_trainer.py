"""The plugin's promise: stock detectron2 (get_cfg, build_model, DefaultTrainer) + import aqd_d2
+ add_aqd_config + one of our yaml files gives the quantized detector."""
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer
from detectron2.modeling import build_model

import aqd_d2
from aqd_d2.layers import QConv2d
from tests.conftest import REPO, tiny_train_opts

CONFIG = REPO / "configs" / "RetinaNet" / "R18-FPN-shapes-cpu-4bit.yaml"


def _cfg(out):
    cfg = get_cfg()
    aqd_d2.add_aqd_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    # MODEL.WEIGHTS "": the config starts from the float run's checkpoint, absent here
    cfg.merge_from_list(tiny_train_opts(out, max_iter=1) + [
        "MODEL.WEIGHTS", "",
        "MODEL.QUANT.W_KWARGS", "['init=max']",
        "MODEL.QUANT.A_KWARGS", "['init=max']",
    ])
    return cfg


def test_stock_build_model_and_default_trainer_give_the_quantized_detector(tmp_path):
    cfg = _cfg(tmp_path)
    model = build_model(cfg)
    assert sum(isinstance(m, QConv2d) for m in model.modules()) > 20

    trainer = DefaultTrainer(cfg)  # detectron2's own trainer, no aqd_d2 subclass
    qconvs = [m for m in trainer.model.modules() if isinstance(m, QConv2d)]
    assert len(qconvs) > 20 and all(q.weight_quantizer.bits == 4 for q in qconvs
                                    if q.weight_quantizer is not None)
    before = qconvs[0].weight.detach().clone()
    trainer.resume_or_load(resume=False)
    trainer.train()  # one iteration through the fake-quantized layers
    assert not qconvs[0].weight.detach().equal(before)
    # the checkpoint DefaultTrainer wrote holds the quantizer state
    import torch

    state = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert any(".weight_quantizer." in k for k in state)
