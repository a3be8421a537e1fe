"""No device->host synchronisation inside a quantized training step after initialisation.

After the first training batch has initialised the learned ranges, a step through quantized
layers (forward, backward, SGD update) must not read device values on the host (``.item()``,
``bool(t)``, ``float(t)``, data-dependent Python branches): on a GPU each read stalls the
launch queue. Checked three ways:

* GPU: the step under ``torch.cuda.set_sync_debug_mode("error")``, fused kernels on and off.
* CPU, eager kernels: the initialised model moved to the ``meta`` device and stepped there;
  a meta tensor has no value, so any host read raises (the eager kernels read scalars on
  purpose only for CPU tensors, :func:`aqd_d2.quantization.functional.as_scalar`).
* CPU, fused kernels under Triton's interpreter (child process): the step with
  ``Tensor.item`` / ``__bool__`` / ``__float__`` / ``__int__`` patched to raise.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.quant_helpers import skip_old_triton_interpreter
import torch.nn.functional as F
from torch import nn

from aqd_d2.layers import QConv2d, QLinear
from aqd_d2.quantization import build_quantizer

ROOT = Path(__file__).resolve().parents[2]


# (weight method, bits, kwargs), (activation method, bits) for each layer of the test net
SPECS = [
    (("liq", 4, {}), ("liq", 4)),
    (("liq", 2, {"weight_norm": False}), ("liq", 2)),
    (("liq", 3, {"rescale": False}), ("lsq", 3)),
    (("lsq", 4, {}), ("dorefa", 4)),
    (("dorefa", 3, {}), ("liq", 3)),
    (("twn", 2, {}), ("liq", 2)),
    (("bnn", 1, {}), ("bnn", 1)),
    (("xnor", 1, {}), ("xnor", 1)),
    (("bwn", 1, {}), None),
    (("bireal", 1, {}), ("bireal", 1)),
]


class Net(nn.Module):
    """Quantized convs for every method pair, then a quantized linear."""

    def __init__(self, ch: int = 8):
        super().__init__()
        layers = []
        for (wm, wb, wkw), a in SPECS:
            wq = build_quantizer(wm, wb, "weight", **wkw)
            aq = None if a is None else build_quantizer(a[0], a[1], "activation")
            layers.append(QConv2d(ch, ch, 3, padding=1, bias=True, weight_quantizer=wq,
                                  input_quantizer=aq, activation=F.relu))
        self.convs = nn.ModuleList(layers)
        self.fc = QLinear(ch, 3, weight_quantizer=build_quantizer("liq", 4, "weight"),
                          input_quantizer=build_quantizer("liq", 4, "activation"))

    def forward(self, x):
        for conv in self.convs:
            x = conv(x) + 0.1 * x
        return self.fc(x.mean(dim=(2, 3)))


def set_mode(model: nn.Module, mode: str) -> None:
    for m in model.modules():
        if hasattr(m, "set_fused_kernels"):
            m.set_fused_kernels(mode)


def make(device) -> tuple:
    torch.manual_seed(0)
    model = Net().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(2, 8, 10, 12, device=device)
    return model, opt, x


def step(model, opt, x) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def test_meta_step_reads_nothing_from_the_device():
    model, opt, x = make("cpu")
    step(model, opt, x)  # initialisation (reads on the host: allowed, once)
    model = model.to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step(model, opt, x.to("meta"))
    step(model, opt, x.to("meta"))


def test_host_flags_follow_buffer_writes():
    q = build_quantizer("liq", 4, "activation")
    assert q.is_enabled
    q.enabled.fill_(False)  # direct write: version bump, re-read
    assert not q.is_enabled
    q.load_state_dict({**q.state_dict(), "enabled": torch.tensor(True)})
    assert q.is_enabled
    q.set_enabled(False)
    q2 = q.to("meta")  # carried across .to()
    assert not q2.is_enabled


def test_fused_interpreted_step_reads_nothing_from_the_device():
    pytest.importorskip("triton")
    skip_old_triton_interpreter()
    code = (
        "import torch\n"
        "from tests.layers.test_no_host_sync import make, step, set_mode\n"
        "model, opt, x = make('cpu'); set_mode(model, 'force')\n"
        "step(model, opt, x)\n"
        "def boom(*a, **k): raise RuntimeError('host read of a tensor value')\n"
        "for name in ('item', '__bool__', '__float__', '__int__', 'tolist'):\n"
        "    setattr(torch.Tensor, name, boom)\n"
        "step(model, opt, x); step(model, opt, x)\n"
        "print('ok')\n"
    )
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["auto", "off"])
def test_cuda_step_has_no_sync(mode):
    model, opt, x = make("cuda")
    set_mode(model, mode)
    step(model, opt, x)  # initialisation
    step(model, opt, x)  # warm-up (Triton compiles, caches fill)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(model, opt, x)
        step(model, opt, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
