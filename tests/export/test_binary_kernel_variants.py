"""Every compiled kernel variant (generic, popcnt, avx2, avx512, whatever this CPU runs)
equals the reference binary convolution bit for bit on random shapes, including the cases
that exercise each variant's tiling: output widths that leave a tail of 1..7 pixels, output
channel counts that fill half a block or less, several byte-counter folds (the AVX2 variant
folds every 31 words: KH*KW*ceil(C/64) > 31), strides, dilations, -1 padding, NCHW and
channels_last, per-channel scale and bias."""
import random

import pytest
import torch

from aqd_d2.export import binary_conv as bc
from tests.export.test_binary_conv import random_input, reference

pytestmark = pytest.mark.skipif(not bc.kernel_available(), reason="C++ extension unavailable")


@pytest.mark.parametrize("isa", bc.ISA_NAMES)
def test_variant_random_sweep(isa):
    if isa not in bc.available_isas():
        pytest.skip(f"{isa} not available on this CPU")
    rnd = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    shapes = [  # (C, O, H, W, k, stride, padding, dilation)
        (300, 20, 5, 11, 3, 1, 1, 1),   # 5 words x 9 taps = 45 steps: two folds
        (64, 8, 3, 9, 3, 1, 1, 1),      # one half block, widths 9 = 2 tiles of 4 + 1
        (65, 9, 4, 7, 3, 2, 1, 1),      # 9 channels: second half with one channel
        (129, 33, 6, 10, 5, 1, 2, 1),   # 3 words x 25 taps = 75 steps
        (17, 16, 7, 6, 3, 1, 1, 2),
    ]
    for _ in range(25):
        k = rnd.choice([1, 3, 5])
        s, d, p = rnd.choice([1, 2]), rnd.choice([1, 2]), rnd.choice([0, 1, 2])
        c, o = rnd.randint(1, 200), rnd.randint(1, 40)
        h = rnd.randint(max(1, d * (k - 1) + 1 - 2 * p), 12)
        w = rnd.randint(max(1, d * (k - 1) + 1 - 2 * p), 15)
        shapes.append((c, o, h, w, k, s, p, d))
    for c, o, h, w, k, s, p, d in shapes:
        for channels_last in (False, True):
            x = random_input((rnd.randint(1, 2), c, h, w), gen, channels_last=channels_last)
            wt = torch.randn(o, c, k, k, generator=gen)
            alpha, bias = torch.rand(o, generator=gen) + 0.1, torch.randn(o, generator=gen)
            packed = bc.pack_weights(wt, alpha, bias)
            y = bc.binary_conv2d(x, packed, s, p, d, backend="cpp", isa=isa)
            ref = reference(x, wt, s, p, d, alpha, bias)
            assert torch.equal(y, ref), (isa, x.shape, wt.shape, s, p, d, channels_last)
            assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                                   else torch.contiguous_format)
