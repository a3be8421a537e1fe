"""The C4 Faster R-CNN (paper 000's two-stage detector; aqd_d2.modeling.meta_arch.res5_basic)
through train_net.py as a user runs it, on CPU: train, kill -9 mid-run, --resume to the end,
--eval-only on the final checkpoint (tools/check_families.py's "faster_rcnn_c4_bidet" family:
the binary C4 twin with the BiDet objective, narrowed)."""
import importlib.util

from tests.conftest import REPO


def test_c4_trains_resumes_and_evaluates(tmp_path):
    spec = importlib.util.spec_from_file_location("check_families", REPO / "tools" / "check_families.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    family, config, extra = next(f for f in tool.FAMILIES if f[0] == "faster_rcnn_c4_bidet")
    assert "C4" in config
    row = tool.check_family(family, config, extra, tmp_path / family)
    assert row["resumed_from"] >= 4 and max(row["checkpoints_at_kill"]) < tool.MAX_ITER
    assert set(row["metrics"]) and all(k.startswith("AP") for k in row["metrics"])
    assert (tmp_path / family / "model_final.pth").exists()
