"""Feature extractors: timm ViTs through local weight files, the offline LocalFeatures, pooling; bad input."""
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from safetensors.torch import save_file

from spectraldiffusion.features import (TimmBackbone, LocalFeatures, FrozenBackbone, token_grid, pool_tokens,
                                        multiscale_tokens, gaussian_blur, gabor_bank, edge_preserving)

TINY = {'vit_small_patch14_dinov2': dict(embed_dim=32, depth=2, num_heads=2, img_size=56),
        'vit_small_patch16_dinov3': dict(embed_dim=32, depth=2, num_heads=2, img_size=64)}


def _save(model, path, fmt):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == 'safetensors': save_file(sd, str(path))
    else: torch.save(sd, str(path))


@pytest.mark.parametrize('name', list(TINY))
@pytest.mark.parametrize('fmt', ['safetensors', 'pth'])
def test_weights_round_trip(tmp_path, name, fmt):
    ref = TimmBackbone(name, pretrained=False, **TINY[name])
    path = tmp_path / f'w.{fmt}'
    _save(ref.model, path, fmt)
    loaded = TimmBackbone(name, weights=path, **TINY[name])
    x = torch.rand(2, 3, 45, 71)
    (a, ga), (b, gb) = ref(x), loaded(x)
    patch = ref.stride
    assert ga == gb == (math.ceil(45 / patch), math.ceil(71 / patch))
    assert a.shape == (2, ga[0] * ga[1], 32)
    assert torch.equal(a, b)
    keys, gk = TimmBackbone(name, weights=path, output='keys', **TINY[name])(x)
    assert gk == ga and keys.shape == (2, ga[0] * ga[1], 32)


def test_frozen():
    bb = TimmBackbone('vit_small_patch14_dinov2', pretrained=False, **TINY['vit_small_patch14_dinov2'])
    assert not any(p.requires_grad for p in bb.parameters())
    assert bb.train().training is False
    tok, _ = bb(torch.rand(1, 3, 28, 28, requires_grad=True))
    assert not tok.requires_grad


def test_keys_match_recomputation(tmp_path):
    cfg = TINY['vit_small_patch14_dinov2']
    bb = TimmBackbone('vit_small_patch14_dinov2', pretrained=False, output='keys', **cfg)
    x = torch.rand(1, 3, 42, 56)
    k, g = bb(x)
    m = bb.model
    xn = (x - bb.mean) / bb.std
    inter = m.forward_intermediates(xn, indices=[0], intermediates_only=True, norm=False)[0]
    tok = inter.flatten(2).transpose(1, 2)
    blk = m.blocks[-1]
    assert torch.allclose(k, blk.attn.qkv(blk.norm1(tok))[..., 32:64], atol=1e-5)


def test_missing_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)needs a local weights file.*weights="):
        TimmBackbone('vit_small_patch14_dinov2')
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TimmBackbone('vit_small_patch16_dinov3', weights=tmp_path / 'nope.safetensors')
    with pytest.raises(ValueError, match="unknown timm model"):
        TimmBackbone('no_such_model', pretrained=False)
    with pytest.raises(ValueError, match="output"):
        TimmBackbone('vit_small_patch14_dinov2', pretrained=False, output='values', **TINY['vit_small_patch14_dinov2'])


@pytest.mark.parametrize('size', [(64, 64), (45, 71), (7, 5), (1, 1)])
@pytest.mark.parametrize('stride', [1, 2, 4])
def test_local_features_grid(size, stride):
    lf = LocalFeatures(stride=stride)
    tok, g = lf(torch.rand(2, 3, *size))
    assert g == token_grid(size, stride) == (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    assert tok.shape == (2, g[0] * g[1], lf.dim) and torch.isfinite(tok).all()


def test_local_features_sample_cell_centres():
    lf = LocalFeatures(stride=4)
    x = torch.rand(1, 3, 16, 16)
    pix = lf.pixel_features(x)
    tok, g = lf(x)
    assert torch.allclose(tok[0].T.reshape(-1, 4, 4), pix[0, :, 2::4, 2::4])


def test_local_features_flat_and_regions():
    lf = LocalFeatures(stride=2)
    flat = torch.full((1, 3, 32, 32), 0.4)
    tok, _ = lf(flat)
    assert torch.allclose(tok[0, :, :-2], tok[0, :1, :-2].expand_as(tok[0, :, :-2]), atol=1e-6)   # all but position
    # two stripe textures of the same two colours: same mean colour, different orientation → different tokens
    yy, xx = torch.meshgrid(torch.arange(32.), torch.arange(64.), indexing='ij')
    pat = torch.where(xx < 32, (xx // 3) % 2, (yy // 3) % 2)
    img = torch.stack([0.2 + 0.6 * pat] * 3)[None]
    tok, g = lf(img)
    f = tok[0].view(*g, -1)[..., 3:-2]                                                 # texture statistics only
    left, right = f[4:12, 2:12].reshape(-1, f.shape[-1]), f[4:12, 20:30].reshape(-1, f.shape[-1])
    between = (left.mean(0) - right.mean(0)).norm()
    within = max((left - left.mean(0)).norm(dim=1).mean(), (right - right.mean(0)).norm(dim=1).mean())
    assert between > 3 * within


def test_filters_against_scipy():
    x = torch.rand(1, 1, 13, 17, dtype=torch.float64)
    r = math.ceil(3 * 1.5)
    ref = gaussian_filter(x[0, 0].numpy(), 1.5, mode='mirror', truncate=r / 1.5)
    assert np.allclose(gaussian_blur(x, 1.5)[0, 0].numpy(), ref, atol=1e-12)
    gb = gabor_bank((4.0, 8.0), 4)
    assert torch.allclose(gb.sum((1, 2, 3)), torch.zeros(16), atol=1e-5)


def test_edge_preserving_step():
    step = torch.zeros(1, 1, 5, 12); step[..., 6:] = 1
    m = gaussian_blur(step, 1.0)
    v = (gaussian_blur(step ** 2, 1.0) - m * m).clamp_min(0)
    out = edge_preserving(m, v, 2, m, step, lam=1.0)
    assert torch.allclose(out, step, atol=0.02)


def test_pool_tokens_against_loop():
    t = torch.randn(2, 5 * 7, 3, dtype=torch.float64)
    got = pool_tokens(t, (5, 7), (2, 3)).numpy().reshape(2, 2, 3, 3)
    g = t.numpy().reshape(2, 5, 7, 3)
    for i in range(2):
        for j in range(3):
            cell = g[:, (i * 5) // 2: -(-(i + 1) * 5 // 2), (j * 7) // 3: -(-(j + 1) * 7 // 3)]
            assert np.allclose(got[:, i, j], cell.mean((1, 2)))
    ms = multiscale_tokens(torch.randn(1, 16 * 16, 4), (16, 16))
    assert {s: tuple(v.shape) for s, v in ms.items()} == {8: (1, 64, 4), 16: (1, 256, 4), 32: (1, 1024, 4)}


def test_bad_input():
    lf = LocalFeatures()
    with pytest.raises(ValueError, match=r"images: expected shape \[B,3,H,W\]"): lf(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0,1\]"): lf(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(TypeError, match="images"): lf(np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="stride"): LocalFeatures(stride=0)
    with pytest.raises(ValueError, match="grid"): pool_tokens(torch.randn(1, 10, 2), (3, 3), 2)
    with pytest.raises(ValueError, match="tokens"): pool_tokens(torch.randn(10, 2), (2, 5), 2)
