"""The exact-resume train loader: a loader restarted from a saved position yields exactly
the batches (images, augmentation, boxes) an uninterrupted one yields, with or without
workers and aspect-ratio grouping; mapping leaves the global RNGs untouched."""
import random

import numpy as np
import pytest
import torch


def _cfg(**over):
    from detectron2.config import get_cfg

    import aqd_d2
    from tests.conftest import REPO

    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "RetinaNet" / "R18-FPN-shapes-cpu.yaml"))
    opts = {"DATASETS.TRAIN": "('aqd_shapes_tiny_train',)", "SOLVER.IMS_PER_BATCH": "3",
            "INPUT.MIN_SIZE_TRAIN": "(48, 56, 64)", "DATALOADER.NUM_WORKERS": "0", "SEED": "5"}
    opts.update(over)
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    return cfg


def _same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert [d["file_name"] for d in x] == [d["file_name"] for d in y]
        for a, b in zip(x, y):
            assert torch.equal(a["image"], b["image"])
            assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)


@pytest.mark.parametrize("workers,grouping", [(0, True), (2, False)])
def test_resumed_loader_continues_the_stream(workers, grouping):
    from aqd_d2.data.mappers import build_aqd_train_loader
    from aqd_d2.data.resumable_loader import ResumableTrainLoader

    cfg = _cfg(**{"DATALOADER.NUM_WORKERS": str(workers),
                  "DATALOADER.ASPECT_RATIO_GROUPING": str(grouping)})
    full = build_aqd_train_loader(cfg)
    assert isinstance(full, ResumableTrainLoader)
    it = iter(full)
    batches = [next(it) for _ in range(7)]  # > one epoch of 16 images
    assert full.state_dict()["batches"] == 7
    sizes = {tuple(d["image"].shape[1:]) for b in batches for d in b}
    assert len(sizes) > 1  # the random resize really varies
    resumed = build_aqd_train_loader(cfg)
    it2 = iter(resumed)  # started before the state is loaded, as in DefaultTrainer
    resumed.load_state_dict({**full.state_dict(), "batches": 4})
    _same_batches(batches[4:], [next(it2) for _ in range(3)])
    assert resumed.state_dict()["batches"] == 7


def test_saved_seed_wins_and_global_rngs_untouched():
    from aqd_d2.data.mappers import build_aqd_train_loader

    a = build_aqd_train_loader(_cfg())
    ia = iter(a)
    first = [next(ia) for _ in range(3)]
    b = build_aqd_train_loader(_cfg(SEED="6"))  # e.g. SEED -1: another seed after restart
    b.load_state_dict({**a.state_dict(), "batches": 1})
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ib = iter(b)
    got = [next(ib) for _ in range(2)]
    _same_batches(first[1:], got)
    # mapping (random resize + flip) drew from scoped RNGs only
    assert random.random() == random.Random(0).random()
    assert np.random.rand() == np.random.RandomState(0).rand()
    assert torch.equal(torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(0)))


def test_detectron2_loader_when_disabled():
    from aqd_d2.data.mappers import build_aqd_train_loader
    from aqd_d2.data.resumable_loader import ResumableTrainLoader

    loader = build_aqd_train_loader(_cfg(**{"AQD.EXACT_RESUME": "False"}))
    assert not isinstance(loader, ResumableTrainLoader)
    assert len(next(iter(loader))) == 3


def test_python_state_roundtrip():
    from torch import nn

    from aqd_d2.engine.python_state import collect_python_state, restore_python_state

    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    m.loss_normalizer = 77.5
    m[1].loss_normalizer_cls = 12.0
    m[1].test_score_thresh = 0.05  # configuration, not training state: not saved
    state = collect_python_state(m)
    assert state == {"loss_normalizer": 77.5, "1.loss_normalizer_cls": 12.0}
    fresh = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    restore_python_state(fresh, state)
    assert fresh.loss_normalizer == 77.5 and fresh[1].loss_normalizer_cls == 12.0
