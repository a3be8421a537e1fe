"""AQDCheckpointer: atomic saves, clear errors for bad files and foreign architectures."""
import os

import pytest
import torch
from torch import nn

from aqd_d2.engine.checkpoint import AQDCheckpointer, CheckpointError


class _Net(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3)
        self.fc = nn.Linear(c, 2)


def test_save_is_atomic_when_a_crash_interrupts_writing(tmp_path, monkeypatch):
    ck = AQDCheckpointer(_Net(), str(tmp_path))
    ck.save("model_0000001")
    good = (tmp_path / "model_0000001.pth").read_bytes()

    real_save = torch.save

    def crash_half_way(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")  # a few bytes land, then the process "dies"
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000001")  # overwrite attempt of the same file
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000002")
    monkeypatch.setattr(torch, "save", real_save)

    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]
    ck2 = AQDCheckpointer(_Net(), str(tmp_path))
    assert ck2.has_checkpoint()
    ck2.resume_or_load("", resume=True)


def test_truncated_and_foreign_files_fail_clearly(tmp_path):
    AQDCheckpointer(_Net(), str(tmp_path)).save("full")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("this is not a checkpoint\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pth")

    ck = AQDCheckpointer(_Net())
    for name in ("truncated.pth", "text.pth", "empty.pth"):
        with pytest.raises(CheckpointError, match=name) as e:
            ck.load(str(tmp_path / name))
        assert "truncated, corrupt or not a" in str(e.value)
    with pytest.raises(CheckpointError, match="list.pth"):
        ck.load(str(tmp_path / "list.pth"))
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load(str(tmp_path / "missing.pth"))
    # after failed loads the same checkpointer still loads a good file (detectron2 main keeps
    # per-load state that only a successful load reset: the next load was an AssertionError)
    ck.load(str(tmp_path / "full.pth"))
    assert getattr(ck, "_parsed_url_during_load", None) is None


def test_other_architecture_fails_and_same_architecture_loads(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.Linear(8, 9))
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        AQDCheckpointer(_Net()).load(str(tmp_path / "other.pth"))

    # same names, different widths: also rejected (shapes count)
    torch.save({"model": _Net(c=7).state_dict()}, tmp_path / "wider.pth")
    with pytest.raises(CheckpointError, match="wrong shape"):
        AQDCheckpointer(_Net()).load(str(tmp_path / "wider.pth"))

    src = _Net()
    torch.save({"model": src.state_dict()}, tmp_path / "same.pth")
    dst = _Net()
    AQDCheckpointer(dst).load(str(tmp_path / "same.pth"))
    assert torch.equal(dst.conv.weight, src.conv.weight)


def test_missing_quantizer_state_is_reported_not_fatal(tmp_path):
    class _QNet(_Net):
        def __init__(self):
            super().__init__()
            self.conv.weight_quantizer = nn.Module()
            self.conv.weight_quantizer.register_buffer("alpha", torch.ones(1))

    torch.save({"model": _Net().state_dict()}, tmp_path / "float.pth")
    ck = AQDCheckpointer(_QNet())
    ck.load(str(tmp_path / "float.pth"))
    assert ck.last_incompatible.missing_keys == ["conv.weight_quantizer.alpha"]
    assert ck.last_other_missing == 0
