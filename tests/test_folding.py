"""fold_bn: one conv equal to BatchNorm(conv(x)) in eval mode, checked in float64."""

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from fused_resnet import fold_bn


def conv_bn(c, k, ksize, *, conv_bias, affine, groups=1, stride=1):
    conv = nn.Conv2d(c, k, ksize, stride=stride, padding=ksize // 2, groups=groups, bias=conv_bias)
    bn = nn.BatchNorm2d(k, affine=affine)
    randomize_bn(nn.Sequential(conv, bn))
    return conv.double().eval(), bn.double().eval()


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("c,k,ksize,groups,stride", [(3, 64, 7, 1, 2), (64, 64, 3, 1, 1), (256, 128, 1, 1, 1),
                                                     (128, 128, 3, 32, 2)])
def test_fold_matches_bn_of_conv_in_float64(c, k, ksize, groups, stride, conv_bias, affine):
    conv, bn = conv_bn(c, k, ksize, conv_bias=conv_bias, affine=affine, groups=groups, stride=stride)
    # The statistics are far from the identity, so the check below can fail.
    assert bn.running_mean.abs().max() > 0.1 and (bn.running_var - 1).abs().max() > 0.1
    x = torch.randn(2, c, 9, 9, dtype=torch.float64)
    weight, bias = fold_bn(conv, bn)
    assert weight.dtype == bias.dtype == torch.float64
    with torch.no_grad():
        expected = bn(conv(x))
        folded = nn.functional.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        unfolded = nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                        conv.groups)
    torch.testing.assert_close(folded, expected, rtol=1e-12, atol=1e-12)
    assert (unfolded - expected).abs().max() > 1e-2  # folding did change something


def test_fold_casts_once_from_float64():
    conv, bn = conv_bn(16, 8, 3, conv_bias=True, affine=True)
    w64, b64 = fold_bn(conv, bn)
    conv32, bn32 = conv.float(), bn.float()
    w16, b16 = fold_bn(conv32, bn32, dtype=torch.float16)
    assert w16.dtype == b16.dtype == torch.float16
    w32, b32 = fold_bn(conv32, bn32)
    assert w32.dtype == torch.float32
    # Folding in float64 from the fp32 parameters, then one cast, is exact to the last fp16 bit.
    w_ref, b_ref = fold_bn(conv32.double(), bn32.double())
    assert torch.equal(w16, w_ref.half()) and torch.equal(b16, b_ref.half())


def test_fold_leaves_the_modules_untouched():
    conv, bn = conv_bn(8, 8, 3, conv_bias=True, affine=True)
    before = [t.clone() for t in (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    fold_bn(conv, bn)
    after = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_fold_errors():
    conv = nn.Conv2d(4, 8, 3)
    with pytest.raises(ValueError, match="no running statistics"):
        fold_bn(conv, nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ValueError, match="6 features, the conv has 8 output channels"):
        fold_bn(conv, nn.BatchNorm2d(6))
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d"):
        fold_bn(conv, nn.BatchNorm1d(8))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        fold_bn(nn.Linear(4, 8), nn.BatchNorm2d(8))
