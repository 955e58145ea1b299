"""Slot modules: contract shared by the three variants, reference cross-checks, pruning, identifiability tools."""
import json, math, warnings
import numpy as np
import pytest
import torch
import torch.distributions as td
import torch.nn.functional as F
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture

from spectraldiffusion import slots as S
from spectraldiffusion.ssm import Mamba2

VARIANTS = {
    'sa': lambda **kw: S.SlotAttention(16, 4, in_dim=8, **kw),
    'psa': lambda **kw: S.ProbabilisticSlotAttention(16, 4, in_dim=8, **kw),
    'psa_gru': lambda **kw: S.ProbabilisticSlotAttention(16, 4, in_dim=8, update='gru', **kw),
    'mamba': lambda **kw: S.MambaSlotAttention(16, 4, in_dim=8, d_state=8, chunk_size=8, **kw),
}


def make(name, **kw):
    torch.manual_seed(0)
    return VARIANTS[name](**kw).double()


@pytest.fixture
def x():
    return torch.randn(3, 12, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize('name', list(VARIANTS))
def test_attention_sums_to_one_over_slots(name, x):
    out = make(name)(x)
    assert out.slots.shape == (3, 4, 16) and len(out.attn) == 3
    for a in out.attn:
        assert a.shape == (3, 4, 12)
        torch.testing.assert_close(a.sum(1), torch.ones(3, 12, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize('name', list(VARIANTS))
def test_permutation_equivariance_in_initial_slots(name, x):
    m = make(name)
    init = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    perm = torch.tensor([3, 1, 0, 2])
    o1, o2 = m(x, init), m(x, init[:, perm])
    torch.testing.assert_close(o2.slots, o1.slots[:, perm], atol=1e-10, rtol=0)
    for a1, a2 in zip(o1.attn, o2.attn):
        torch.testing.assert_close(a2, a1[:, perm], atol=1e-10, rtol=0)
    if o1.pi is not None:
        torch.testing.assert_close(o2.pi, o1.pi[:, perm], atol=1e-10, rtol=0)
        torch.testing.assert_close(o2.var, o1.var[:, perm], atol=1e-10, rtol=0)


@pytest.mark.parametrize('name', list(VARIANTS))
def test_single_slot(name, x):
    out = make(name)(x, num_slots=1)
    assert out.slots.shape == (3, 1, 16)
    torch.testing.assert_close(out.attn[-1], torch.ones(3, 1, 12, dtype=torch.float64))
    assert torch.isfinite(out.slots).all()


@pytest.mark.parametrize('name', list(VARIANTS))
def test_bad_shapes_raise_clear_errors(name, x):
    m = make(name)
    with pytest.raises(ValueError, match=r'inputs: expected shape \[B,N,8\]'): m(x[0])
    with pytest.raises(ValueError, match=r'inputs: expected shape \[B,N,8\]'): m(x[..., :5])
    with pytest.raises(ValueError, match=r'init: expected shape \[3,K,16\]'): m(x, torch.randn(3, 4, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match='init'): m(x, torch.randn(2, 4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match='NaN'): m(torch.full_like(x, float('nan')))
    with pytest.raises(TypeError, match='floating point'): m(x.long())
    with pytest.raises(ValueError, match='num_slots'): m(x, num_slots=0)


def test_constructor_errors():
    with pytest.raises(ValueError, match='init_mode'): S.SlotAttention(8, 3, init_mode='kmeans')
    with pytest.raises(ValueError, match='grad'): S.SlotAttention(8, 3, grad='none')
    with pytest.raises(ValueError, match='dim'): S.ProbabilisticSlotAttention(0, 3)
    with pytest.raises(ValueError, match="init_mode='given'"): S.SlotAttention(8, 3, init_mode='given')(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match='num_slots'): S.SlotAttention(8, 3, init_mode='learned')(torch.randn(1, 4, 8), num_slots=5)


def test_slot_attention_matches_loop_reference(x):
    """The module against a slot-by-slot, token-by-token transcription of Locatello et al.'s equations."""
    m = make('sa')
    with torch.no_grad():
        out = m(x)
        ln = lambda t, mod: F.layer_norm(t, t.shape[-1:], mod.weight, mod.bias, mod.eps)
        for b in range(x.shape[0]):
            xs = ln(x[b], m.norm_inputs); k = xs @ m.to_k.weight.T; v = xs @ m.to_v.weight.T
            s = out.init[b]
            for _ in range(m.iters):
                q = ln(s, m.norm_slots) @ m.to_q.weight.T
                logits = np.array([[float(q[i] @ k[n]) / math.sqrt(16) for n in range(12)] for i in range(4)])
                A = np.exp(logits - logits.max(0)); A /= A.sum(0)
                W = (A + m.eps) / (A + m.eps).sum(1, keepdims=True)
                u = torch.tensor(W) @ v
                s = m.gru(u, s); s = s + m.mlp(ln(s, m.norm_mlp))
            torch.testing.assert_close(out.slots[b], s, atol=1e-10, rtol=0)
            np.testing.assert_allclose(out.attn[-1][b].numpy(), A, atol=1e-10)


def test_gradient_modes_same_values_and_expected_gradients(x):
    res = {}
    for mode in ('full', 'implicit', 'bilevel'):
        torch.manual_seed(0)
        m = S.SlotAttention(16, 4, in_dim=8, init_mode='learned', grad=mode).double()
        xx = x.clone().requires_grad_()
        o = m(xx); o.slots.square().sum().backward()
        res[mode] = (m, xx.grad, o.slots.detach())
    torch.testing.assert_close(res['implicit'][2], res['full'][2]); torch.testing.assert_close(res['bilevel'][2], res['full'][2])
    assert res['implicit'][0].slots_init.grad is None
    # the implicit gradient is that of one step on the detached slots of iteration T-1
    m = res['implicit'][0]
    with torch.no_grad():
        st = (m.initial_slots(3),)
        for _ in range(2): st, _ = m._step(st, m._prepare(x))
    xx = x.clone().requires_grad_(); s_in = st[0].clone().requires_grad_()
    (sT,), _ = m._step((s_in,), m._prepare(xx)); sT.square().sum().backward()
    torch.testing.assert_close(res['implicit'][1], xx.grad)
    torch.testing.assert_close(res['bilevel'][1], xx.grad)
    torch.testing.assert_close(res['bilevel'][0].slots_init.grad, s_in.grad.sum(0, keepdim=True))


def _loop_prune(u, tau, lo, hi):
    B, K = u.shape
    out = torch.zeros(B, K, dtype=torch.bool)
    for b in range(B):
        order = sorted(range(K), key=lambda k: (-u[b, k].item(), k))
        n = min(max(sum(u[b, k].item() >= tau for k in range(K)), lo), K if hi is None else hi)
        out[b, order[:n]] = True
    return out


def test_prune_respects_bounds_and_matches_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        K = int(torch.randint(1, 10, (1,), generator=g))
        u = torch.rand(4, K, generator=g) ** 4; u = u / u.sum(1, keepdim=True)
        lo = int(torch.randint(0, K + 1, (1,), generator=g))
        hi = None if torch.rand(1, generator=g) < 0.3 else int(torch.randint(max(lo, 1), K + 1, (1,), generator=g))
        tau = float(torch.rand(1, generator=g)) * 0.5
        m = S.prune(u, tau, lo, hi)
        assert (m.sum(1) >= lo).all() and (hi is None or (m.sum(1) <= hi).all())
        assert torch.equal(m, _loop_prune(u, tau, lo, hi))


def test_prune_errors_and_module_integration(x):
    u = torch.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match='min_keep'): S.prune(u, min_keep=4)
    with pytest.raises(ValueError, match='max_keep'): S.prune(u, min_keep=2, max_keep=1)
    with pytest.raises(ValueError, match='tau'): S.prune(u, tau=2)
    with pytest.raises(ValueError, match='utilisation'): S.prune(-u)
    for name in VARIANTS:
        o = make(name, prune_tau=0.3, min_keep=2, max_keep=3)(x)
        assert o.active.dtype == torch.bool and ((o.active.sum(1) >= 2) & (o.active.sum(1) <= 3)).all()
        assert torch.equal(o.active, S.prune(o.utilisation().detach(), 0.3, 2, 3))
        ma = S.masked_attention(o.attn[-1], o.active)
        torch.testing.assert_close(ma.sum(1), torch.ones(3, 12, dtype=torch.float64))
        assert (ma[~o.active] == 0).all()


def _numpy_em_step(Xk, Xv, mq, var, pi, reg=0.0):
    dens = np.stack([pi[k] * multivariate_normal(mq[k], np.diag(var[k])).pdf(Xk) for k in range(len(pi))], 1)
    R = dens / dens.sum(1, keepdims=True)
    Nk = R.sum(0)
    mu = (R.T @ Xv) / Nk[:, None]
    v = np.stack([(R[:, k:k + 1] * (Xv - mu[k]) ** 2).sum(0) / Nk[k] for k in range(len(pi))]) + reg
    return R, mu, v, Nk / len(Xk)


def test_gmm_em_step_equals_numpy_and_sklearn():
    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal(c, s, size=(n, 3)) for c, s, n in (([0, 0, 0], .5, 40), ([3, 1, 0], .8, 25), ([0, 4, 2], .3, 35))])
    mu0 = rng.normal(size=(3, 3)) + X[[0, 50, 80]]; var0 = rng.uniform(0.5, 2, size=(3, 3)); pi0 = np.array([.5, .2, .3])
    T = lambda a: torch.tensor(a)[None]
    R = S.gmm_e_step(T(X), T(mu0), T(var0), T(pi0))
    mu, var, pi = S.gmm_m_step(R, T(X), var_eps=1e-6)
    Rn, mun, varn, pin = _numpy_em_step(X, X, mu0, var0, pi0, 1e-6)
    np.testing.assert_allclose(R[0].T.numpy(), Rn, atol=1e-12)
    np.testing.assert_allclose(mu[0].numpy(), mun, atol=1e-12)
    np.testing.assert_allclose(var[0].numpy(), varn, atol=1e-12)
    np.testing.assert_allclose(pi[0].numpy(), pin, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        gm = GaussianMixture(3, covariance_type='diag', max_iter=1, means_init=mu0, weights_init=pi0,
                             precisions_init=1 / var0, reg_covar=1e-6, tol=0).fit(X)
    np.testing.assert_allclose(mu[0].numpy(), gm.means_, atol=1e-9)
    np.testing.assert_allclose(var[0].numpy(), gm.covariances_, atol=1e-9)
    np.testing.assert_allclose(pi[0].numpy(), gm.weights_, atol=1e-9)


def test_probabilistic_module_is_em_on_projected_tokens():
    torch.manual_seed(0)
    m = S.ProbabilisticSlotAttention(3, 3, iters=4, in_dim=5, eps=0.0, var_eps=1e-6, temperature=1.0).double()
    x = torch.randn(2, 30, 5, dtype=torch.float64); init = torch.randn(2, 3, 3, dtype=torch.float64)
    o = m(x, init)
    with torch.no_grad():
        for b in range(2):
            xn = m.norm_inputs(x[b])
            Kn, Vn, Wq = (xn @ m.to_k.weight.T).numpy(), (xn @ m.to_v.weight.T).numpy(), m.to_q.weight.numpy()
            mu, var, pi = init[b].numpy(), np.ones((3, 3)), np.full(3, 1 / 3)
            for _ in range(4): R, mu, var, pi = _numpy_em_step(Kn, Vn, mu @ Wq.T, var, pi, 1e-6)
            np.testing.assert_allclose(o.slots[b].numpy(), mu, atol=1e-10)
            np.testing.assert_allclose(o.var[b].numpy(), var, atol=1e-10)
            np.testing.assert_allclose(o.pi[b].numpy(), pi, atol=1e-10)
            np.testing.assert_allclose(o.attn[-1][b].T.numpy(), R, atol=1e-10)


def _psa_outputs():
    torch.manual_seed(0)
    m = S.ProbabilisticSlotAttention(4, 3, in_dim=6).double()
    return m, [m(torch.randn(5, 20, 6, dtype=torch.float64)) for _ in range(2)]


def test_aggregate_posterior_log_prob_and_sampling():
    _, outs = _psa_outputs()
    agg = S.aggregate_posterior(outs)
    assert agg.mu.shape == (30, 4)
    # weights: π_ik / M
    torch.testing.assert_close(agg.weight, torch.cat([o.pi.flatten() for o in outs]) / 10)
    ref = td.MixtureSameFamily(td.Categorical(probs=agg.weight), td.Independent(td.Normal(agg.mu, agg.var.sqrt()), 1))
    pts = torch.randn(64, 4, dtype=torch.float64)
    torch.testing.assert_close(agg.log_prob(pts), ref.log_prob(pts))
    n = 50000
    smp = agg.sample(n, torch.Generator().manual_seed(0))
    mean = (agg.weight[:, None] * agg.mu).sum(0)
    var = (agg.weight[:, None] * (agg.var + agg.mu ** 2)).sum(0) - mean ** 2
    assert ((smp.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((smp.var(0) / var - 1).abs() < 0.05).all()
    assert S.sample_slots(agg, 2, 5, torch.Generator().manual_seed(0)).shape == (2, 5, 4)
    with pytest.raises(TypeError, match='ProbabilisticSlotAttention'): S.aggregate_posterior(S.SlotAttention(4, 3)(torch.randn(1, 5, 4)))


def test_identifiability_kl_zero_for_identical_distributions_and_exact_for_gaussians():
    g = torch.Generator().manual_seed(0)
    mu, var = 3 * torch.randn(5, 6, generator=g, dtype=torch.float64), 0.2 * torch.rand(5, 6, generator=g, dtype=torch.float64) + 0.05
    w = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    perms = [torch.arange(5), torch.tensor([4, 2, 0, 1, 3]), torch.tensor([1, 0, 3, 4, 2])]
    same = S.SlotOutput(slots=torch.stack([mu[p] for p in perms]), attn=[], pi=torch.stack([w[p] for p in perms]),
                        var=torch.stack([var[p] for p in perms]))
    assert abs(float(S.identifiability_kl(same))) < 1e-12
    f = S.SlotMixture(mu, var, w)
    assert abs(float(S.gmm_kl(f, f))) < 1e-12
    # single Gaussians: the exact KL
    a = S.SlotMixture(mu[:1], var[:1], torch.ones(1, dtype=torch.float64)); b = S.SlotMixture(mu[1:2], var[1:2], torch.ones(1, dtype=torch.float64))
    ref = td.kl_divergence(td.Independent(td.Normal(mu[0], var[0].sqrt()), 1), td.Independent(td.Normal(mu[1], var[1].sqrt()), 1))
    torch.testing.assert_close(S.gmm_kl(a, b), ref)
    # well separated mixtures: near a large Monte-Carlo estimate
    gg = S.SlotMixture(mu + 0.2, var * 1.3, w.flip(0))
    mf = td.MixtureSameFamily(td.Categorical(probs=f.weight), td.Independent(td.Normal(f.mu, f.var.sqrt()), 1))
    mg = td.MixtureSameFamily(td.Categorical(probs=gg.weight), td.Independent(td.Normal(gg.mu, gg.var.sqrt()), 1))
    torch.manual_seed(0); z = mf.sample((200000,))
    mc = float((mf.log_prob(z) - mg.log_prob(z)).mean())
    assert abs(float(S.gmm_kl(f, gg)) - mc) < 0.02 * mc


def test_identifiability_kl_has_finite_gradients():
    torch.manual_seed(0)
    m = S.ProbabilisticSlotAttention(8, 5, in_dim=6, prune_tau=0.1)
    loss = S.identifiability_kl(m(torch.randn(4, 40, 6)))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    # a learnable prior gets gradients too, and detach_prior=False lets gradients through the default prior
    prior = S.SlotMixture(torch.zeros(3, 8, requires_grad=True), torch.ones(3, 8), torch.full((3,), 1 / 3))
    S.identifiability_kl(m(torch.randn(2, 40, 6)), prior).backward()
    assert torch.isfinite(prior.mu.grad).all() and prior.mu.grad.abs().sum() > 0
    assert torch.isfinite(S.identifiability_kl(m(torch.randn(2, 40, 6)), detach_prior=False))


def test_smcc_is_one_for_identical_runs_up_to_permutation():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(30, 6, 5, generator=g, dtype=torch.float64)
    attnA = torch.softmax(4 * torch.randn(30, 6, 40, generator=g, dtype=torch.float64), 1)
    perms = [torch.randperm(6, generator=g) for _ in range(30)]
    B = torch.stack([A[i, p] for i, p in enumerate(perms)]); attnB = torch.stack([attnA[i, p] for i, p in enumerate(perms)])
    assert abs(S.smcc(A, B) - 1) < 1e-12
    assert abs(S.smcc(A, -B[..., [4, 0, 3, 1, 2]], attnA, attnB) - 1) < 1e-12
    M = torch.randn(5, 5, generator=g, dtype=torch.float64)
    assert abs(S.smcc(A, B @ M - 1, attnA, attnB, affine=True) - 1) < 1e-9
    R = torch.randn(30, 6, 5, generator=g, dtype=torch.float64)
    attnR = torch.softmax(4 * torch.randn(30, 6, 40, generator=g, dtype=torch.float64), 1)
    assert S.smcc(A, R, attnA, attnR) < 0.25
    with pytest.raises(ValueError, match='attn_a, attn_b'): S.smcc(A, B, attnA)
    with pytest.raises(ValueError, match='slots_b'): S.smcc(A, B[:, :5])


def test_diagnostics_hand_cases():
    s = torch.tensor([[[1., 0.], [2., 0.], [0., 3.]]])
    torch.testing.assert_close(S.slot_similarity(s), torch.tensor([1 / 3]))
    torch.testing.assert_close(S.slot_similarity(s, torch.tensor([[False, True, True]])), torch.tensor([0.]))
    assert float(S.slot_similarity(s[:, :1])) == 0.0
    torch.testing.assert_close(S.mean_max_attention(torch.tensor([[[1., .25, .5], [0., .75, .5]]])), torch.tensor([0.75]))
    # collapse: identical slots have similarity 1
    torch.testing.assert_close(S.slot_similarity(torch.ones(2, 4, 3)), torch.ones(2))


def test_mamba2_branch_equals_block_on_full_sequences():
    torch.manual_seed(0)
    blk = Mamba2(16, d_state=8, headdim=8, ngroups=2, chunk_size=4).double()
    for N in (1, 3, 17):
        pre = torch.randn(2, N, 16, dtype=torch.float64); br = torch.randn(2, 3, 16, dtype=torch.float64)
        seqs = torch.cat([pre[:, None].expand(-1, 3, -1, -1), br[:, :, None]], 2).flatten(0, 1)
        torch.testing.assert_close(S.mamba2_branch(blk, pre, br), blk(seqs)[:, -1].view(2, 3, 16), atol=1e-10, rtol=0)


def test_attention_maps_and_tokens():
    img = torch.zeros(2, 3, 32, 32); img[:, 1, :16] = 1
    tok = S.image_tokens(img, 8)
    assert tok.shape == (2, 64, 7)
    torch.testing.assert_close(tok[0, :32, :3], torch.tensor([0., 1., 0.]).expand(32, 3))
    outs = S.run_variants(img, 3, iters=2)
    assert set(outs) == {'Slot Attention', 'Mamba slots', 'Probabilistic'}
    for o in outs.values():
        maps = S.attention_maps(o, 2, (16, 16))
        torch.testing.assert_close(maps.sum(1), torch.ones(2, 16, 16), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match='iteration'): S.attention_maps(o, 0, (16, 16))


def test_bench_quick_is_json():
    r = S.bench(quick=True)
    json.dumps(r)
    assert r['name'] == 'slots' and len(r['rows']) == 2 and r['threads'] == 1
    for row in r['rows']:
        assert row['slot_attention_fwd_s'] > 0 and row['mamba_fwd_bwd_s'] > 0
        assert row['mamba_over_sa_fwd'] == pytest.approx(row['mamba_fwd_s'] / row['slot_attention_fwd_s'])


def test_mamba_slot_attention_under_cpu_bf16_autocast():
    "Accelerate's mixed_precision='bf16' wraps the forward in autocast: the Mamba blocks run and stay close to float32."
    from spectraldiffusion.slots import MambaSlotAttention
    torch.manual_seed(0)
    m = MambaSlotAttention(64, 5)
    x, init = torch.randn(2, 256, 64), torch.randn(2, 5, 64)
    ref = m(x, init).slots
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(x, init).slots
    out.float().sum().backward()                        # backward outside autocast, as Accelerate does
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    assert float((out.float() - ref).norm() / ref.norm()) < 0.02
