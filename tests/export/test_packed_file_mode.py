"""Packed files get the permissions of an ordinary file (0666 less the umask), like the
detectron2 checkpoints next to them; a temporary file's 0600 was kept before."""
import os
import stat

from torch import nn

from aqd_d2.engine.checkpoint import AQDCheckpointer
from aqd_d2.export import save_packed


def test_packed_file_mode_equals_checkpoint_mode(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    old = os.umask(0o022)
    try:
        save_packed(model, str(tmp_path / "m.packed"))
        AQDCheckpointer(model, str(tmp_path)).save("model_final")
        mode = stat.S_IMODE(os.stat(tmp_path / "m.packed").st_mode)
        assert mode == 0o644
        assert mode == stat.S_IMODE(os.stat(tmp_path / "model_final.pth").st_mode)
        os.umask(0o077)
        save_packed(model, str(tmp_path / "private.packed"))
        assert stat.S_IMODE(os.stat(tmp_path / "private.packed").st_mode) == 0o600
    finally:
        os.umask(old)
