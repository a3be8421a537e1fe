"""tools/export_model.py + tools/infer_packed.py --int8 auto on a 2-bit detector: each k-bit
layer is timed on the int8 GEMM path against float on the first image and the faster kept."""
import re
import subprocess
import sys

from PIL import Image

from tests.conftest import REPO


def test_export_and_infer_2bit_retinanet_int8_modes(tmp_path):
    cfg = str(REPO / "configs/RetinaNet/R18-FPN-shapes-cpu-2bit.yaml")
    narrow = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.QUANT.W_KWARGS", "['init=max']",
              "MODEL.QUANT.A_KWARGS", "['init=max']"]
    packed = tmp_path / "m.packed"

    def run(*args):
        res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    out = run(str(REPO / "tools/export_model.py"), "--config-file", cfg, "--output", str(packed), *narrow)
    packed_layers = int(re.search(r"(\d+) packed layers", out).group(1))
    png = tmp_path / "auto.png"
    out = run(str(REPO / "tools/infer_packed.py"), "--config-file", cfg, "--packed", str(packed),
              "--dataset", "aqd_shapes_tiny_val", "--num-images", "1", "--output", str(png),
              "--threads", "1", "--int8", "auto", *narrow, "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64")
    m = re.search(r"'int8': (\d+), 'fake-quant weight frozen': (\d+)", out)
    assert m, out
    # every packed k-bit layer was timed and deployed on int8 or as float, none left out
    assert packed_layers > 10 and int(m.group(1)) + int(m.group(2)) == packed_layers
    assert Image.open(png).size[0] >= 128
