"""tools/demo.py (the README's ``python3 tools/run.py demo``) on tiny settings: every stage
(float training, 4-bit / 2-bit fine-tuning from the float checkpoint, export, evaluation of
the trained and the deployed model, latency, picture), the table, the PNG; a rerun reuses
every stage; an interrupted training resumes; changed settings start a stage over; a
quantized stage without its float checkpoint fails."""
import importlib.util
import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import REPO

DEMO = REPO / "tools" / "demo.py"
# 64-px images of the 16 / 8-image tiny dataset, a narrow FPN, a few iterations
TINY = ["--quick", "--iters", "2,2", "--dataset", "aqd_shapes_tiny", "--image-size", "64", "--batch", "2",
        "--latency-repeats", "2", "--num-images", "2"]
OPTS = ["MODEL.FPN.OUT_CHANNELS", "32", "DATALOADER.NUM_WORKERS", "0"]  # trailing: config overrides
ROW = re.compile(r"^\| (float|4-bit LIQ|2-bit LIQ) \|(.*)\|$", re.M)


def _run(out, *args):
    res = subprocess.run([sys.executable, str(DEMO), *TINY, "--out", str(out), *args, *OPTS],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _rows(stdout):
    return {m.group(1): [c.strip() for c in m.group(2).split("|")] for m in ROW.finditer(stdout)}


def test_demo_quick_end_to_end_then_reused(tmp_path):
    out = _run(tmp_path)
    for i in range(1, 12):
        assert f"[{i}/11]" in out, out
    assert "QUICK RUN" in out and "starting over" not in out
    rows = _rows(out)
    assert list(rows) == ["float", "4-bit LIQ", "2-bit LIQ"], out
    # model | AP | AP50 | deployed vs as trained | file | MB | size vs float | latency | speed
    assert all(len(r) == 8 for r in rows.values()), rows
    assert rows["float"][5] == "1.00x" and rows["float"][7] == "1.00x"
    mb = {k: float(r[4]) for k, r in rows.items()}
    assert mb["2-bit LIQ"] < mb["4-bit LIQ"] < mb["float"] / 4
    for key, name in (("float", "model_weights.pth"), ("4bit", "model.packed"), ("2bit", "model.packed")):
        assert (tmp_path / key / name).is_file()
        assert (tmp_path / key / "model_final.pth").is_file()
        assert not list((tmp_path / key).glob("model_0*.pth"))  # intermediate checkpoints removed
    # the quantized models started from the float checkpoint, named explicitly
    for key in ("4bit", "2bit"):
        log = (tmp_path / key / "log.txt").read_text()
        assert str(tmp_path / "float" / "model_final.pth") in log
        assert "training from scratch" not in log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quick"] and summary["rows"]["4bit"]["eval"]["deployed_layers"]["int8"] > 10
    png = Image.open(tmp_path / "detections.png")
    assert png.size[0] > png.size[1]  # 3 columns (float / 4-bit / 2-bit) x 2 images
    assert (tmp_path / "summary.md").read_text().count("| 2-bit LIQ |") == 1

    again = _run(tmp_path)
    assert len(re.findall(r"^\[\d+/11\] .* reused ", again, re.M)) == 11, again
    assert _rows(again) == rows


def _load_demo():
    spec = importlib.util.spec_from_file_location("aqd_demo_tool", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_interrupted_training_resumes_and_changed_settings_start_over(tmp_path, capsys):
    demo = _load_demo()
    argv = [a for a in TINY if a not in ("--iters", "2,2")] + ["--out", str(tmp_path)]

    def args(iters):
        return demo.parse_args(argv + ["--iters", iters] + OPTS)
    fp = demo.VARIANTS[0]

    class Interrupt(Exception):
        pass

    real = demo._ProgressHook.after_step

    def interrupt_at_iteration_3(hook):
        real(hook)
        if hook.trainer.iter == 2:  # after the checkpoint of iteration 3 (period 1)
            raise Interrupt

    d = demo.Demo(*args("4,2"))
    demo._ProgressHook.after_step = interrupt_at_iteration_3
    try:
        with pytest.raises(Interrupt):
            d.train(fp)
    finally:
        demo._ProgressHook.after_step = real
    assert not (tmp_path / "float" / "train.json").exists()

    d = demo.Demo(*args("4,2"))
    d.train(fp)
    text = capsys.readouterr().out
    assert "resuming from iteration 3" in text, text
    assert json.loads((tmp_path / "float" / "train.json").read_text())["iterations"] == 4

    d = demo.Demo(*args("3,2"))
    d.train(fp)
    text = capsys.readouterr().out
    assert "starting over" in text and "resuming" not in text, text
    assert json.loads((tmp_path / "float" / "train.json").read_text())["iterations"] == 3


def test_quantized_stage_needs_the_float_checkpoint(tmp_path):
    demo = _load_demo()
    d = demo.Demo(*demo.parse_args(TINY + ["--out", str(tmp_path)] + OPTS))
    d.fps["float"] = d.train_cfg(demo.VARIANTS[0])[1]
    with pytest.raises(demo.DemoError, match="float checkpoint .*model_final.pth"):
        d.train(demo.VARIANTS[1])
    assert not (tmp_path / "4bit" / "log.txt").exists()
