"Tests of spectraldiffusion.ssm: the SSD scan against the step-by-step recurrence, the Mamba-2 block, token orders."
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spectraldiffusion.ssm as ssm_mod
from spectraldiffusion.ssm import (FACTOR_MAX, MAMBA2_KEYS, Mamba2, RMSNormGated, Scan2D, bench, scan_orders,
                                   segsum, ssd, ssd_sequential)


def rand_ssd(b=2, l=100, h=4, p=3, n=5, g=None, dtype=torch.float64, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    A = -F.softplus(r(b, l, h)) * 0.5 * scale
    return r(b, l, h, p), A, r(b, l, g or h, n), r(b, l, g or h, n), r(b, h, p, n)


def rel(u, v):
    return float((u.detach().double() - v.detach().double()).abs().max() / v.detach().double().abs().max())


# ---------------------------------------------------------------- ssd vs the recurrence

@pytest.mark.parametrize("l,chunk", [(1, 64), (7, 3), (63, 64), (100, 16), (129, 32), (200, 64)])
@pytest.mark.parametrize("scale", [1.0, 40.0])          # factorised path / exact-difference path
def test_ssd_float64_values_and_final_state(l, chunk, scale):
    X, A, B, C, S0 = rand_ssd(l=l, seed=l, scale=scale)
    Y, fin = ssd(X, A, B, C, chunk, S0, return_final_states=True)
    Yr, finr = ssd_sequential(X, A, B, C, S0, return_final_states=True)
    assert Y.shape == (2, l, 4, 3) and fin.shape == (2, 4, 3, 5)
    assert (Y - Yr).abs().max() < 1e-10
    assert (fin - finr).abs().max() < 1e-10


def test_ssd_without_initial_state_and_groups():
    X, A, B, C, _ = rand_ssd(l=77, h=6, g=3, seed=1)
    assert (ssd(X, A, B, C, 16) - ssd_sequential(X, A, B, C)).abs().max() < 1e-10
    # grouping is the same as repeating each group's B, C over its heads
    Bh, Ch = B.repeat_interleave(2, 2), C.repeat_interleave(2, 2)
    assert (ssd(X, A, B, C, 16) - ssd(X, A, Bh, Ch, 16)).abs().max() < 1e-12


def test_ssd_equals_materialised_semiseparable_matrix():
    X, A, B, C, _ = rand_ssd(b=1, l=50, h=2, seed=2)
    Y = ssd(X, A, B, C, 8)
    for hh in range(2):
        M = segsum(A[0, :, hh]).exp() * (C[0, :, hh] @ B[0, :, hh].T)
        assert (Y[0, :, hh] - M @ X[0, :, hh]).abs().max() < 1e-10


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_ssd_gradients_match_recurrence(scale):
    X, A, B, C, S0 = (t.requires_grad_() for t in rand_ssd(l=53, h=2, seed=3, scale=scale))
    with torch.no_grad(): A[:, 10:14] = 0                  # steps without decay
    gY = torch.randn(2, 53, 2, 3, dtype=torch.float64)
    Y, fin = ssd(X, A, B, C, 16, S0, return_final_states=True)
    Yr, finr = ssd_sequential(X, A, B, C, S0, return_final_states=True)
    gF = torch.randn_like(fin)
    g1 = torch.autograd.grad((Y * gY).sum() + (fin * gF).sum(), (X, A, B, C, S0))
    g2 = torch.autograd.grad((Yr * gY).sum() + (finr * gF).sum(), (X, A, B, C, S0))
    for u, v in zip(g1, g2):
        assert (u - v).abs().max() < 1e-10


def test_ssd_gradcheck():
    ins = [t.requires_grad_() for t in rand_ssd(b=1, l=9, h=2, p=2, n=2, seed=4)]
    assert torch.autograd.gradcheck(lambda x, a, b, c, s: ssd(x, a, b, c, 4, s), ins)


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_ssd_float32_relative_error(scale):
    X, A, B, C, S0 = rand_ssd(b=2, l=1000, h=2, p=8, n=8, seed=5, scale=scale)
    truth = ssd_sequential(X, A, B, C, S0)
    f = [t.float() for t in (X, A, B, C, S0)]
    for chunk in (32, 64, 100):
        Y = ssd(*f[:4], chunk, f[4])
        assert Y.dtype == torch.float32
        assert rel(Y, truth) < 1e-4
    assert rel(ssd_sequential(*f[:4], f[4]), truth) < 1e-4


def test_ssd_float32_gradients_relative_error():
    X, A, B, C, S0 = rand_ssd(b=1, l=300, h=2, p=4, n=4, seed=6)
    gY = torch.randn(1, 300, 2, 4, dtype=torch.float64)
    ins64 = [t.clone().requires_grad_() for t in (X, A, B, C)]
    ins32 = [t.float().requires_grad_() for t in (X, A, B, C)]
    g64 = torch.autograd.grad((ssd_sequential(*ins64) * gY).sum(), ins64)
    g32 = torch.autograd.grad((ssd(*ins32, chunk_size=64) * gY.float()).sum(), ins32)
    for u, v in zip(g32, g64):
        assert rel(u, v) < 1e-4


def test_ssd_chunk_size_does_not_change_result():
    X, A, B, C, S0 = rand_ssd(l=150, seed=7)
    ys = [ssd(X, A, B, C, q, S0) for q in (1, 5, 16, 64, 150, 1000)]
    for y in ys[1:]:
        assert (y - ys[0]).abs().max() < 1e-10


@pytest.mark.parametrize("l,chunk,scale", [(200, 16, 1.0), (203, 16, 1.0), (150, 8, 40.0), (37, 64, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssd_segmented_no_grad_path_equals_autograd_path(monkeypatch, l, chunk, scale, dtype):
    "Without autograd, `ssd` runs a few chunks at a time into reused buffers: same numbers, bit for bit."
    X, A, B, C, S0 = (t.to(dtype) for t in rand_ssd(l=l, seed=11, scale=scale))
    monkeypatch.setattr(ssm_mod, "SEGMENT_BYTES", 3000)          # forces segments of 1-2 chunks
    with torch.no_grad():
        Y, fin = ssd(X, A, B, C, chunk, S0, return_final_states=True)
    Xg = X.clone().requires_grad_()
    Yg, fing = ssd(Xg, A, B, C, chunk, S0, return_final_states=True)   # one segment, autograd graph
    assert torch.equal(Y, Yg.detach()) and torch.equal(fin, fing.detach())
    Yr, finr = ssd_sequential(X.double(), A.double(), B.double(), C.double(), S0.double(), return_final_states=True)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel(Y, Yr) < tol and rel(fin, finr) < tol


def test_ssd_default_chunk():
    assert [ssm_mod._auto_chunk(n, p) for n, p in [(16, 32), (64, 64), (4, 4), (128, 128)]] == [32, 64, 16, 64]
    X, A, B, C, S0 = rand_ssd(l=90, seed=12)
    assert (ssd(X, A, B, C, initial_states=S0) - ssd_sequential(X, A, B, C, S0)).abs().max() < 1e-10


def test_ssd_half_precision_inputs_computed_in_float32():
    X, A, B, C, _ = rand_ssd(l=40, seed=8)
    Y = ssd(X.bfloat16(), A.float(), B.bfloat16(), C.bfloat16(), 16)
    assert Y.dtype == torch.bfloat16
    ref = ssd_sequential(X.bfloat16().double(), A.float().double(), B.bfloat16().double(), C.bfloat16().double())
    assert rel(Y, ref) < 2e-2                            # the bf16 rounding of the output only


def test_ssd_bad_inputs():
    z = torch.zeros
    with pytest.raises(ValueError, match="A: expected shape"): ssd(z(1, 5, 2, 3), z(1, 5, 3), z(1, 5, 2, 4), z(1, 5, 2, 4))
    with pytest.raises(ValueError, match="g dividing"): ssd(z(1, 5, 4, 3), z(1, 5, 4), z(1, 5, 3, 4), z(1, 5, 3, 4))
    with pytest.raises(ValueError, match="B, C: expected equal shapes"): ssd(z(1, 5, 2, 3), z(1, 5, 2), z(1, 5, 2, 4), z(1, 5, 2, 5))
    with pytest.raises(ValueError, match="X: expected 4 dimensions"): ssd(z(5, 2, 3), z(1, 5, 2), z(1, 5, 2, 4), z(1, 5, 2, 4))
    with pytest.raises(TypeError, match="X: expected a floating point"): ssd(z(1, 5, 2, 3, dtype=torch.long), z(1, 5, 2), z(1, 5, 2, 4), z(1, 5, 2, 4))
    with pytest.raises(TypeError, match="B: expected a torch.Tensor"): ssd(z(1, 5, 2, 3), z(1, 5, 2), np.zeros((1, 5, 2, 4)), z(1, 5, 2, 4))
    with pytest.raises(ValueError, match="chunk_size"): ssd(z(1, 5, 2, 3), z(1, 5, 2), z(1, 5, 2, 4), z(1, 5, 2, 4), chunk_size=0)
    with pytest.raises(ValueError, match="initial_states"): ssd(z(1, 5, 2, 3), z(1, 5, 2), z(1, 5, 2, 4), z(1, 5, 2, 4), initial_states=z(1, 2, 4, 3))
    with pytest.raises(ValueError, match="A: expected finite log decays <= 0"): ssd(z(1, 5, 2, 3), torch.full((1, 5, 2), .5), z(1, 5, 2, 4), z(1, 5, 2, 4))
    with pytest.raises(ValueError, match="A: expected finite"): ssd(z(1, 5, 2, 3), torch.full((1, 5, 2), -math.inf), z(1, 5, 2, 4), z(1, 5, 2, 4))
    with pytest.raises(ValueError, match="sequence length"): ssd(z(1, 0, 2, 3), z(1, 0, 2), z(1, 0, 2, 4), z(1, 0, 2, 4))


def test_factor_threshold_is_a_safe_float32_exponent():
    assert 0 < FACTOR_MAX < math.log(torch.finfo(torch.float32).max) / 2


def test_segsum_definition():
    x = torch.randn(3, 9, dtype=torch.float64)
    s = segsum(x)
    for t in range(9):
        for u in range(9):
            if u <= t: assert abs(float(s[1, t, u] - x[1, u + 1:t + 1].sum())) < 1e-12
            else: assert s[1, t, u] == -math.inf


# ---------------------------------------------------------------- gated RMSNorm and the Mamba-2 block

def test_rmsnorm_gated_against_numpy():
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=(2, 5, 12)), rng.normal(size=(2, 5, 12))
    w = rng.uniform(.5, 1.5, size=12)
    silu = lambda v: v / (1 + np.exp(-v))
    def ref(v):
        g = v.reshape(2, 5, 3, 4)
        return (g / np.sqrt((g ** 2).mean(-1, keepdims=True) + 1e-5)).reshape(2, 5, 12) * w
    for before in (False, True):
        m = RMSNormGated(12, group_size=4, norm_before_gate=before).double()
        with torch.no_grad(): m.weight.copy_(torch.tensor(w))
        out = m(torch.tensor(x), torch.tensor(z)).detach().numpy()
        expect = ref(x) * silu(z) if before else ref(x * silu(z))
        np.testing.assert_allclose(out, expect, rtol=1e-12, atol=1e-12)
    assert list(dict(m.named_parameters())) == ['weight']


def mamba2_step_reference(m, u):
    "The block decoded one token at a time in float64 (rolling conv state), following mamba-ssm's Mamba2.step."
    Bsz, L, _ = u.shape
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    W = {k: v.detach().double() for k, v in m.state_dict().items()}
    w = W['conv1d.weight'][:, 0]
    conv_state = torch.zeros(Bsz, w.shape[0], m.d_conv, dtype=torch.float64)
    state = torch.zeros(Bsz, H, P, N, dtype=torch.float64)
    A = -torch.exp(W['A_log'])
    D = W['D'].view(H, P) if m.D_has_hdim else W['D'][:, None]
    outs = []
    for t in range(L):
        zxbcdt = u[:, t].double() @ W['in_proj.weight'].T
        d_mlp = (zxbcdt.shape[-1] - 2 * m.d_ssm - 2 * G * N - H) // 2
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, m.d_ssm, m.d_ssm + 2 * G * N, H], -1)
        conv_state = torch.cat([conv_state[..., 1:], xBC[..., None]], -1)
        xBC = (conv_state * w).sum(-1) + W['conv1d.bias']
        xBC = xBC * torch.sigmoid(xBC)
        x, Bt, Ct = torch.split(xBC, [m.d_ssm, G * N, G * N], -1)
        dt = F.softplus(dt + W['dt_bias'])
        x = x.view(Bsz, H, P)
        Bt = Bt.view(Bsz, G, N).repeat_interleave(H // G, 1)
        Ct = Ct.view(Bsz, G, N).repeat_interleave(H // G, 1)
        state = state * torch.exp(dt * A)[..., None, None] + (dt[..., None] * x)[..., None] * Bt[:, :, None]
        y = torch.einsum('bhpn,bhn->bhp', state, Ct) + D * x
        y = y.reshape(Bsz, -1)
        if m.rmsnorm:
            if not m.norm_before_gate: y = y * F.silu(z)
            yg = y.view(Bsz, G, -1)
            y = (yg / torch.sqrt((yg ** 2).mean(-1, keepdim=True) + m.norm.eps)).reshape(Bsz, -1) * W['norm.weight']
            if m.norm_before_gate: y = y * F.silu(z)
        else:
            y = y * F.silu(z)
        if d_mlp > 0: y = torch.cat([F.silu(z0) * x0, y], -1)
        outs.append(y @ W['out_proj.weight'].T)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("kw", [dict(), dict(ngroups=2), dict(d_ssm=16), dict(D_has_hdim=True),
                                dict(rmsnorm=False), dict(norm_before_gate=True), dict(d_conv=2, expand=1)])
def test_mamba2_matches_stepwise_reference(kw):
    torch.manual_seed(1)
    m = Mamba2(16, d_state=8, headdim=8, chunk_size=8, **kw)
    with torch.no_grad():
        m.conv1d.bias.normal_(); m.D.normal_()
        if m.rmsnorm: m.norm.weight.uniform_(.5, 1.5)
    u = torch.randn(2, 21, 16)
    assert (m.double()(u.double()) - mamba2_step_reference(m, u)).abs().max() < 1e-10


def test_mamba2_chunk_size_independent_and_causal():
    torch.manual_seed(0)
    m = Mamba2(16, d_state=8, headdim=8, ngroups=2).double()
    u = torch.randn(2, 45, 16, dtype=torch.float64)
    outs = []
    for q in (4, 16, 45, 64):
        m.chunk_size = q
        outs.append(m(u))
    for o in outs[1:]:
        assert (o - outs[0]).abs().max() < 1e-10
    u2 = u.clone(); u2[:, 30:] += 1
    assert (m(u2)[:, :30] - outs[-1][:, :30]).abs().max() < 1e-12


def test_mamba2_float32_close_to_float64_and_backward():
    torch.manual_seed(2)
    m = Mamba2(32, d_state=16, headdim=16)
    u = torch.randn(2, 70, 32, requires_grad=True)
    y = m(u)
    y64 = Mamba2(32, d_state=16, headdim=16).double()
    y64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    assert rel(y, y64(u.double())) < 1e-4
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert torch.isfinite(u.grad).all()
    assert not m.kernels_active(u)                           # CPU tensors never take the CUDA kernels


def test_mamba2_state_dict_names_and_shapes():
    m = Mamba2(32, d_state=16, headdim=16)
    sd = m.state_dict()
    assert list(sd) == MAMBA2_KEYS
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        'dt_bias': (4,), 'A_log': (4,), 'D': (4,), 'in_proj.weight': (2 * 64 + 2 * 16 + 4, 32),
        'conv1d.weight': (96, 1, 4), 'conv1d.bias': (96,), 'norm.weight': (64,), 'out_proj.weight': (32, 64)}
    m2 = Mamba2(32, d_state=16, headdim=16, bias=True, D_has_hdim=True, ngroups=2)
    sd2 = m2.state_dict()
    assert set(sd2) == set(MAMBA2_KEYS) | {'in_proj.bias', 'out_proj.bias'}
    assert sd2['D'].shape == (64,) and sd2['in_proj.weight'].shape == (2 * 64 + 2 * 2 * 16 + 4, 32)
    # a state dict saved by one block loads into a freshly built one and gives the same output
    m3 = Mamba2(32, d_state=16, headdim=16)
    m3.load_state_dict(sd)
    u = torch.randn(1, 10, 32)
    assert torch.equal(m(u), m3(u))


def test_mamba2_initialisation_ranges():
    m = Mamba2(64, d_state=16, headdim=8, dt_min=0.01, dt_max=0.05, A_init_range=(2, 3))
    dt = F.softplus(m.dt_bias.detach())
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    A = m.A_log.detach().exp()
    assert A.min() >= 2 and A.max() <= 3
    assert torch.equal(m.D.detach(), torch.ones(16))


def test_mamba2_dt_limit_clamps():
    torch.manual_seed(3)
    m = Mamba2(16, d_state=8, headdim=8, dt_limit=(0.0, 1e-9)).double()
    with torch.no_grad(): m.D.zero_()
    # with Δ ≈ 0 the scan input xΔ vanishes: the SSM adds nothing and, with D = 0, y = 0 before the norm
    u = torch.randn(1, 12, 16, dtype=torch.float64)
    zxbcdt = m.in_proj(u)
    x = m._scan(*[t for t in _split_for_scan(m, zxbcdt)])
    assert x.abs().max() < 1e-6


def _split_for_scan(m, zxbcdt):
    L, G, N, H, P = zxbcdt.shape[1], m.ngroups, m.d_state, m.nheads, m.headdim
    z, xBC, dt = torch.split(zxbcdt, [m.d_ssm, m.d_ssm + 2 * G * N, H], -1)
    xBC = m.act(m.conv1d(xBC.transpose(1, 2))[..., :L].transpose(1, 2))
    x, B, C = torch.split(xBC, [m.d_ssm, G * N, G * N], -1)
    return x.unflatten(-1, (H, P)), dt, -torch.exp(m.A_log), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)), None


def test_mamba2_bad_arguments():
    with pytest.raises(ValueError, match="headdim"): Mamba2(16, headdim=12)
    with pytest.raises(ValueError, match="ngroups"): Mamba2(16, headdim=8, ngroups=3)
    with pytest.raises(ValueError, match="d_model"): Mamba2(0)
    with pytest.raises(ValueError, match="A_init_range"): Mamba2(16, headdim=8, A_init_range=(0, 1))
    m = Mamba2(16, headdim=8)
    with pytest.raises(ValueError, match=r"u: expected a float tensor \[B, L, 16\]"): m(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="u: expected"): m(torch.randn(5, 16))
    with pytest.raises(TypeError, match="u: expected dtype torch.float32"): m(torch.randn(2, 5, 16, dtype=torch.float64))


# ---------------------------------------------------------------- 2-D token orders

def test_scan_orders_hand_counted():
    assert scan_orders(2, 3, 'raster').tolist() == [[0, 1, 2, 3, 4, 5]]
    assert scan_orders(2, 3, 'bidirectional').tolist() == [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]
    assert scan_orders(2, 3, 'cross').tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5],
                                                   [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]


@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (6, 1), (4, 5), (8, 8)])
@pytest.mark.parametrize("mode", ['raster', 'bidirectional', 'cross'])
def test_scan_orders_are_permutations_with_inverse(h, w, mode):
    o = scan_orders(h, w, mode)
    N = h * w
    assert o.shape == ({'raster': 1, 'bidirectional': 2, 'cross': 4}[mode], N) and o.dtype == torch.long
    assert torch.equal(o.sort(1).values, torch.arange(N).expand_as(o))
    inv = o.argsort(1)
    assert torch.equal(o.gather(1, inv), torch.arange(N).expand_as(o))
    assert torch.equal(inv.gather(1, o), torch.arange(N).expand_as(o))
    grid = np.arange(N).reshape(h, w)
    if mode == 'cross':                                     # column-major = NumPy's Fortran order
        assert o[1].tolist() == grid.ravel(order='F').tolist()
        assert o[3].tolist() == grid.ravel(order='F')[::-1].tolist()


def test_scan_orders_bad_arguments():
    with pytest.raises(ValueError, match="mode"): scan_orders(2, 2, 'spiral')
    with pytest.raises(ValueError, match="w: expected a positive int"): scan_orders(2, 0)
    with pytest.raises(ValueError, match="h: expected a positive int"): scan_orders(2.5, 2)


class CumSum(torch.nn.Module):
    def forward(self, x): return x.cumsum(1)


def test_scan2d_against_numpy_prefix_sums():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(2, 3, 4, 5))                      # [B, h, w, D]
    x = torch.tensor(vals.reshape(2, 12, 5))
    pre = np.cumsum(vals.reshape(2, 12, 5), 1)
    suf = np.cumsum(vals.reshape(2, 12, 5)[:, ::-1], 1)[:, ::-1]
    colT = vals.transpose(0, 2, 1, 3).reshape(2, 12, 5)       # column-major sequence
    colpre = np.cumsum(colT, 1).reshape(2, 4, 3, 5).transpose(0, 2, 1, 3).reshape(2, 12, 5)
    colsuf = np.cumsum(colT[:, ::-1], 1)[:, ::-1].reshape(2, 4, 3, 5).transpose(0, 2, 1, 3).reshape(2, 12, 5)
    np.testing.assert_allclose(Scan2D(CumSum(), 'raster')(x, (3, 4)).numpy(), pre, atol=1e-12)
    np.testing.assert_allclose(Scan2D(CumSum(), 'bidirectional')(x, (3, 4)).numpy(), pre + suf, atol=1e-12)
    np.testing.assert_allclose(Scan2D(CumSum(), 'cross', 'mean')(x, (3, 4)).numpy(),
                               (pre + suf + colpre + colsuf) / 4, atol=1e-12)
    per = Scan2D([torch.nn.Identity(), CumSum(), torch.nn.Identity(), torch.nn.Identity()], 'cross')
    np.testing.assert_allclose(per(x, (3, 4)).numpy(), 3 * vals.reshape(2, 12, 5) + colpre, atol=1e-12)


def test_scan2d_shared_model_equals_per_order_copies():
    torch.manual_seed(0)
    blk = Mamba2(16, d_state=8, headdim=8).double()
    x = torch.randn(2, 36, 16, dtype=torch.float64)
    shared = Scan2D(blk, 'cross')(x)                          # square grid inferred
    copies = Scan2D([blk] * 4, 'cross')(x, (6, 6))
    assert (shared - copies).abs().max() < 1e-12


def test_scan2d_bad_arguments():
    with pytest.raises(ValueError, match="merge"): Scan2D(CumSum(), merge='max')
    with pytest.raises(ValueError, match="a list of 2 modules"): Scan2D([CumSum()], 'bidirectional')
    with pytest.raises(ValueError, match="not a square grid"): Scan2D(CumSum())(torch.zeros(1, 12, 2))
    with pytest.raises(ValueError, match="hw: expected h\\*w = N = 12"): Scan2D(CumSum())(torch.zeros(1, 12, 2), (3, 5))
    with pytest.raises(ValueError, match="x: expected a tensor"): Scan2D(CumSum())(torch.zeros(12, 2))


# ---------------------------------------------------------------- benchmark smoke run

def test_bench_quick_is_json_and_consistent():
    threads = torch.get_num_threads()
    r = bench(quick=True, repeat=1)
    assert torch.get_num_threads() == threads                 # restored
    json.dumps(r)
    assert [c['L'] for c in r['cases']] == [512, 512]
    for c in r['cases']:
        assert c['fwd_seq_s'] > 0 and c['fwd_bwd_seq_s'] > 0
        for row in c['ssd']:
            assert row['max_rel_diff'] < 1e-4
            assert row['fwd_s'] > 0 and row['fwd_bwd_s'] > 0
            assert abs(row['fwd_speedup'] - c['fwd_seq_s'] / row['fwd_s']) < 1e-9


@pytest.mark.parametrize("l,chunk,segment_bytes,own", [(200, 16, 3000, True), (203, 16, 3000, True), (203, 16, 1 << 20, False),
                                                        (37, 64, 3000, False), (130, 8, 9000, True), (37, 64, 1 << 20, False)])
def test_ssd_own_backward_matches_recurrence(monkeypatch, l, chunk, segment_bytes, own):
    "Scans in several segments use the own backward (one segment: autograd); either equals autograd through the recurrence."
    X, A, B, C, S0 = (t.requires_grad_() for t in rand_ssd(l=l, h=4, g=2, seed=21))
    monkeypatch.setattr(ssm_mod, "SEGMENT_BYTES", segment_bytes)
    calls = []
    real = ssm_mod._ssd_backward
    monkeypatch.setattr(ssm_mod, "_ssd_backward", lambda *a: calls.append(1) or real(*a))
    Y, fin = ssd(X, A, B, C, chunk, S0, return_final_states=True)
    Yr, finr = ssd_sequential(X, A, B, C, S0, return_final_states=True)
    gY, gF = torch.randn_like(Y), torch.randn_like(fin)
    g1 = torch.autograd.grad((Y * gY).sum() + (fin * gF).sum(), (X, A, B, C, S0))
    g2 = torch.autograd.grad((Yr * gY).sum() + (finr * gF).sum(), (X, A, B, C, S0))
    assert calls == ([1] if own else [])
    for u, v in zip(g1, g2):
        assert (u - v).abs().max() < 1e-10
    # only Y used (no gradient reaches the final state), no initial state
    g3 = torch.autograd.grad((ssd(X, A, B, C, chunk) * gY).sum(), (X, A, B, C))
    g4 = torch.autograd.grad((ssd_sequential(X, A, B, C) * gY).sum(), (X, A, B, C))
    for u, v in zip(g3, g4):
        assert (u - v).abs().max() < 1e-10


def test_ssd_strong_decays_fall_back_to_autograd(monkeypatch):
    "A chunk whose decay cannot be factorised takes the exact-difference path under autograd."
    X, A, B, C, S0 = (t.requires_grad_() for t in rand_ssd(l=64, seed=22, scale=40.0))
    monkeypatch.setattr(ssm_mod, "_ssd_backward", lambda *a: pytest.fail("own backward used"))
    g1 = torch.autograd.grad(ssd(X, A, B, C, 16, S0).sum(), (X, A, B, C, S0))
    g2 = torch.autograd.grad(ssd_sequential(X, A, B, C, S0).sum(), (X, A, B, C, S0))
    for u, v in zip(g1, g2):
        assert (u - v).abs().max() < 1e-10


def test_ssd_own_backward_gradcheck(monkeypatch):
    monkeypatch.setattr(ssm_mod, "SEGMENT_BYTES", 300)           # one chunk per segment: the own backward
    calls = []
    real = ssm_mod._ssd_backward
    monkeypatch.setattr(ssm_mod, "_ssd_backward", lambda *a: calls.append(1) or real(*a))
    ins = [t.requires_grad_() for t in rand_ssd(b=1, l=11, h=2, p=2, n=3, seed=23)]
    assert torch.autograd.gradcheck(lambda x, a, b, c, s: ssd(x, a, b, c, 4, s, return_final_states=True), ins)
    assert calls


@pytest.mark.parametrize("l,segment_bytes", [(300, 1 << 20), (300, 3000)])   # autograd path / own backward
def test_ssd_under_autocast_computes_in_float32(monkeypatch, l, segment_bytes):
    "Mixed precision (Accelerate's bf16 on the CPU) must not reach the scan: same numbers as without autocast."
    monkeypatch.setattr(ssm_mod, "SEGMENT_BYTES", segment_bytes)
    X, A, B, C, _ = (t.float() for t in rand_ssd(l=l, seed=31))
    gY = torch.randn(2, l, 4, 3)
    def run(autocast):                                  # forward under autocast, backward outside it (the AMP recipe)
        ins = [t.clone().requires_grad_() for t in (X, A, B, C)]
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            Y = ssd(*ins, 16)
        (Y.float() * gY).sum().backward()
        return Y.detach(), [t.grad for t in ins]
    Y0, g0 = run(False)
    Y1, g1 = run(True)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad(): Y2 = ssd(X, A, B, C, 16)
    assert Y1.dtype == torch.float32 and torch.equal(Y0, Y1) and torch.equal(Y0, Y2)
    for u, v in zip(g0, g1):
        assert torch.equal(u, v)
