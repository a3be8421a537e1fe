"""aqd_d2.compat: shims apply, stay local to detectron2, and missing ops fail clearly."""
import importlib.util
import sys

import numpy as np
import pytest
import torch

from aqd_d2 import compat


def test_import_registers_and_detectron2_modules_import():
    import detectron2.data  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.layers  # noqa: F401
    import detectron2.model_zoo  # noqa: F401
    import detectron2.modeling  # noqa: F401
    from detectron2.data.datasets import pascal_voc
    from detectron2.data import build

    assert compat.apply() is compat.APPLIED  # idempotent
    if not hasattr(np, "int") and _source_uses(build, r"\bnp\.int\b(?!_)"):
        # detectron2 v0.6: its modules see the legacy names, NumPy itself is untouched.
        assert build.np.int is int and pascal_voc.np.str is str
        assert build.np.zeros is np.zeros
    else:  # detectron2 main no longer uses them: nothing patched
        assert build.np is np and not any("NumPy" in a for a in compat.APPLIED)


def _source_uses(module, pattern: str) -> bool:
    import inspect
    import re

    return re.search(pattern, inspect.getsource(module)) is not None


def test_applied_lists_exactly_the_shims_this_detectron2_needs():
    """Feature detection, never versions: a shim is listed iff the installed detectron2's own
    source still uses what the shim provides (v0.6 sdist: all; main: pkg_resources only)."""
    import detectron2.data.transforms.transform as transform
    import detectron2.model_zoo.model_zoo as model_zoo

    applied = " | ".join(compat.APPLIED)
    assert ("Image.LINEAR" in applied) == _source_uses(transform, r"\bImage\.LINEAR\b")
    assert ("pkg_resources" in applied) == (
        _source_uses(model_zoo, r"import pkg_resources")
        and importlib.util.find_spec("pkg_resources") is None)
    assert ("_C stand-in" in applied) == (not compat.has_compiled_ops())
    assert "create_ddp_model" in applied  # detectron2 still passes device_ids=[rank] on CPU


def test_shims_do_not_leak_outside_detectron2():
    from PIL import Image

    assert not hasattr(Image, "LINEAR") or Image.LINEAR == Image.BILINEAR
    if importlib.util.find_spec("pkg_resources") is None:
        assert "pkg_resources" not in sys.modules
    with pytest.raises(AttributeError):
        np.float  # noqa: B018  (NumPy >= 1.24 must still reject it for everybody else)


def test_pil_linear_default_resolved_to_bilinear():
    from PIL import Image
    from detectron2.data.transforms.transform import ExtentTransform

    t = ExtentTransform(src_rect=(0, 0, 4, 4), output_size=(2, 2))
    assert t.interp == Image.BILINEAR


@pytest.mark.skipif(compat.has_compiled_ops(), reason="detectron2 has its compiled ops")
def test_compiled_op_raises_clear_error():
    from detectron2.layers import batched_nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    with pytest.raises(compat.MissingCompiledOpError, match="rotated boxes"):
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
    with pytest.raises(compat.MissingCompiledOpError, match="rotated boxes"):
        batched_nms_rotated(torch.rand(2, 5) + 1, torch.rand(2), torch.zeros(2), 0.5)
    with pytest.raises(compat.MissingCompiledOpError, match="COCOeval"):
        from detectron2 import _C

        _C.COCOevalAccumulate  # noqa: B018


def test_deform_conv_on_cpu_uses_torchvision_and_is_correct():
    """detectron2 runs DeformConv on CPU through torchvision: no stand-in involved."""
    import torchvision
    from detectron2.layers import DeformConv

    torch.manual_seed(0)
    conv = DeformConv(4, 6, 3, padding=1, bias=False)
    x, offset = torch.randn(1, 4, 5, 5), torch.randn(1, 18, 5, 5)
    ref = torchvision.ops.deform_conv2d(x, offset, conv.weight, padding=1)
    assert torch.allclose(conv(x, offset), ref, atol=1e-6)


def test_cpu_ddp_shim_is_marked():
    from detectron2.engine import defaults

    assert getattr(defaults.create_ddp_model, "_aqd_cpu_aware", False)
