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


# Shapes aimed at the AVX2 variant's code paths (kernels_avx2.cpp), run on every variant:
# (C, O, H, W, k, stride, padding, dilation). KS = k * k * ceil(C / 64) words per dot product;
# the AVX2 byte counters fold after at most 31 words, in chunks of equal length.
TILING_SHAPES = [
    (64, 64, 9, 17, 3, 1, 1, 1),     # KS 9, one chunk; OW 17 = 8 + 8 + 1 (epilogue tails)
    (256, 20, 5, 13, 3, 2, 1, 1),    # KS 36: 2 chunks of 18; stride 2; O 20 = 16 + 4
    (448, 16, 4, 6, 3, 1, 1, 1),     # KS 63: 3 chunks of 21
    (390, 7, 6, 5, 3, 1, 0, 2),      # C 390 = 6 x 64 + 6 (tail bits); dilated rows; O 7
    (130, 33, 7, 11, 1, 1, 0, 1),    # 1x1: KS 3; O 33 = 2 blocks + 1 channel; odd width
    (1, 1, 1, 1, 1, 1, 0, 1),        # smallest
    (3, 9, 2, 3, 3, 2, 1, 1),        # input words 2 x 5 = 10 (split tail of 2 words)
    (64, 8, 6, 7, 5, 2, 2, 1),       # half block only; 5x5; stride 2, padding 2
]


@pytest.mark.parametrize("isa", bc.ISA_NAMES)
@pytest.mark.parametrize("threads", [1, 2])
def test_variant_tiling_paths(isa, threads):
    """Tails of every tile / chunk / block size, and 2 threads (per-thread scratch)."""
    if isa not in bc.available_isas():
        pytest.skip(f"{isa} not available on this CPU")
    gen = torch.Generator().manual_seed(11)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for c, o, h, w, k, s, p, d in TILING_SHAPES:
            for channels_last in (False, True):
                x = random_input((2, c, h, w), gen, channels_last=channels_last)
                wt = torch.randn(o, c, k, k, generator=gen)
                alpha, bias = torch.rand(o, generator=gen) + 0.1, torch.randn(o, generator=gen)
                packed = bc.pack_weights(wt, alpha, bias)
                y = bc.binary_conv2d(x, packed, s, p, d, backend="cpp", isa=isa)
                ref = reference(x, wt, s, p, d, alpha, bias)
                assert torch.equal(y, ref), (isa, c, o, h, w, k, s, p, d, channels_last)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", bc.ISA_NAMES)
@pytest.mark.parametrize("channels", [31 * 64, 62 * 64, 63 * 64])
def test_variant_counter_limits(isa, channels):
    """Every bit differs (x >= 0, all weights < 0): each byte counter grows by the maximum, 8
    per word, up to 31 x 8 = 248 before a fold; 1x1 conv with 31, 62 and 63 words (1, 2 and
    3 chunks). The output is then -K * alpha exactly, and 0 where one input is negated."""
    if isa not in bc.available_isas():
        pytest.skip(f"{isa} not available on this CPU")
    o = 24
    x = torch.ones(1, channels, 2, 3)
    x[0, :, 1, 2] = -1.0  # this pixel agrees with every weight: popcount 0
    wt = -torch.ones(o, channels, 1, 1)
    alpha = torch.full((o,), 0.5)
    y = bc.binary_conv2d(x, bc.pack_weights(wt, alpha), 1, 0, 1, backend="cpp", isa=isa)
    expected = torch.full((1, o, 2, 3), -0.5 * channels)
    expected[0, :, 1, 2] = 0.5 * channels
    assert torch.equal(y, expected)
