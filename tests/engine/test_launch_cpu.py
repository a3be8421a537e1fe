"""Two CPU processes (gloo) train with detectron2's DefaultTrainer and stay in sync."""
import os

import torch

from tests.conftest import REPO, tiny_train_opts


def _train_and_dump(opts, out_dir):
    """Runs in each spawned process: train 2 iterations, save this rank's parameters."""
    from detectron2.config import get_cfg
    from detectron2.utils import comm

    import aqd_d2
    from aqd_d2.engine import Trainer

    cfg = get_cfg()
    aqd_d2.add_aqd_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "RetinaNet" / "R18-FPN-shapes-cpu.yaml"))
    cfg.merge_from_list(opts)
    cfg.freeze()
    trainer = Trainer(cfg)  # create_ddp_model wraps the CPU model (compat shim)
    trainer.resume_or_load(resume=False)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    changed = sum(not torch.equal(before[k], state[k]) for k in state)
    torch.save(
        {"state": state, "world": comm.get_world_size(), "local": comm.get_local_size(),
         "ddp": hasattr(trainer.model, "module"), "changed": changed},
        os.path.join(out_dir, f"rank{comm.get_rank()}.pth"),
    )


def test_two_process_cpu_training_keeps_ranks_identical(tmp_path):
    from aqd_d2.engine import launch_cpu

    # warm the dataset cache in this process so the two ranks do not race to generate it
    from detectron2.data import DatasetCatalog

    DatasetCatalog.get("aqd_shapes_tiny_train")
    opts = tiny_train_opts(tmp_path / "run", max_iter=2) + ["TEST.EVAL_PERIOD", "0"]
    launch_cpu(_train_and_dump, num_processes=2, args=(opts, str(tmp_path)))
    r0 = torch.load(tmp_path / "rank0.pth")
    r1 = torch.load(tmp_path / "rank1.pth")
    assert r0["world"] == r1["world"] == 2 and r0["local"] == 2 and r0["ddp"]
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # and training changed the weights (not a no-op run)
    assert r0["changed"] > len(r0["state"]) // 2
