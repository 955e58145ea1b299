"""Spectral module: affinities, Laplacian, eigensolvers against SciPy, clustering against scikit-learn,
degenerate inputs, the training-free segmenter and its benchmark."""
import json
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from scipy.linalg import subspace_angles
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import kneighbors_graph

from spectraldiffusion.spectral import (knn_affinity, affinity, grid_affinity, normalized_affinity, normalized_laplacian,
                                        laplacian_eigs, subspace_eigs, spectral_clusters, eigengap_k, segment_prototypes,
                                        spectral_slots, multiscale_slots, split_components, merge_similar,
                                        refine_segments, spectral_segment, scale_segments, SOLVERS, bench, BlockCSR,
                                        chebyshev_filter, _topk)


def blobs(seed=2, n=150, sd=0.5, centres=((0, 0), (3, 0), (0, 3))):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(c, sd, (n, 2)) for c in centres])


@pytest.mark.parametrize('bandwidth', ['local', 'global'])
def test_knn_against_sklearn(bandwidth):
    pts = np.random.default_rng(0).normal(size=(3, 80, 4))
    W = knn_affinity(torch.tensor(pts), 7, bandwidth=bandwidth).to_dense().numpy()
    for b in range(3):
        G = kneighbors_graph(pts[b], 7, mode='distance').toarray()
        sig = G.max(1)
        s = np.outer(sig, sig) if bandwidth == 'local' else (sig ** 2).mean()
        ref = np.where(G > 0, np.exp(-G ** 2 / s), 0)
        assert np.allclose(W[b], (ref + ref.T) / 2, atol=1e-9)


def test_block_topk_and_row_chunks_against_sklearn():
    sim = torch.randn(3, 50, 1024, generator=torch.Generator().manual_seed(0))       # no ties
    v, i = _topk(sim, 10); v0, i0 = sim.topk(10, dim=-1)
    assert torch.equal(v, v0) and torch.equal(i, i0)
    pts = np.random.default_rng(1).normal(size=(2, 1024, 5))                           # N = 1024: the block path
    G = [kneighbors_graph(p, 10, mode='distance').toarray() for p in pts]
    for chunk in (2 ** 20, 2 ** 16):                                                   # whole images; 64 rows at once
        W = knn_affinity(torch.tensor(pts), 10, bandwidth='global', chunk=chunk).to_dense().numpy()
        for b in range(2):
            ref = np.where(G[b] > 0, np.exp(-G[b] ** 2 / (G[b].max(1) ** 2).mean()), 0)
            assert np.allclose(W[b], (ref + ref.T) / 2, atol=1e-9)


def test_block_csr_and_chebyshev_against_dense():
    from numpy.polynomial.chebyshev import chebval
    from scipy.linalg import block_diag
    x = torch.tensor(np.stack([blobs(n=60), blobs(seed=5, n=60)]))
    A, _ = normalized_affinity(knn_affinity(x, 8))
    Ad = A.to_dense().numpy()
    op = BlockCSR(A)
    c, e = torch.tensor([0.1, -0.2], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    ref = block_diag(*[(Ad[b] - c[b].item() * np.eye(180)) / e[b].item() for b in range(2)])
    assert np.allclose(op.matrix(c, e).to_dense().numpy(), ref, atol=1e-12)
    X = torch.randn(2, 180, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert np.allclose(op(X).numpy(), Ad @ X.numpy(), atol=1e-12)
    lo, cut = torch.full((2,), -1.0, dtype=torch.float64), torch.tensor([0.5, 0.8], dtype=torch.float64)
    Y = chebyshev_filter(op, X, 7, lo, cut).numpy()
    for b in range(2):
        cb, eb = (cut[b].item() - 1) / 2, (cut[b].item() + 1) / 2
        w, Q = np.linalg.eigh((Ad[b] - cb * np.eye(180)) / eb)
        assert np.allclose(Y[b], Q @ (chebval(w, [0] * 7 + [1])[:, None] * (Q.T @ X[b].numpy())), rtol=1e-9, atol=1e-9)
    # a graph with self loops takes the sorting path; the matrix is the same
    Ws = knn_affinity(x, 8) + torch.sparse_coo_tensor(torch.stack([torch.zeros(180, dtype=torch.long), torch.arange(180), torch.arange(180)]),
                                                      torch.full((180,), 0.3, dtype=torch.float64), (2, 180, 180), check_invariants=False)
    assert np.allclose(BlockCSR(Ws).matrix().to_dense().numpy(), block_diag(*Ws.to_dense().numpy()), atol=1e-12)


def test_default_subspace_on_scene_graphs_against_scipy():
    from spectraldiffusion.data import make_scene
    from spectraldiffusion.features import LocalFeatures
    bb = LocalFeatures(stride=4)
    imgs = torch.stack([make_scene('clevr_like', s)['image'] for s in range(3)])
    tok, g = bb(imgs)
    W = affinity(tok, 10, 'euclidean', 'global', 0.02, 1e-3, grid=g, grid_weight=1.0)
    lam, V = laplacian_eigs(W, 6)                                                       # defaults: tol 1e-3, float32
    A, _ = normalized_affinity(W)
    _, _, n_new = subspace_eigs(A, 6)
    _, _, n_old = subspace_eigs(A, 6, degree=8, cut=0.0, adaptive=False)               # the former settings
    assert n_new < n_old
    for b in range(3):
        Wb = sp.csr_matrix(W.to_dense()[b].double().numpy())
        L = sp.csgraph.laplacian(Wb, normed=True)
        v = V[b].double().numpy()
        assert np.linalg.norm(L @ v - v * lam[b].double().numpy(), axis=0).max() <= 1.1e-3
        lam_ref, V_ref = spla.eigsh(L, k=7, sigma=-1e-3, which='LM')
        o = np.argsort(lam_ref); lam_ref, V_ref = lam_ref[o], V_ref[:, o]
        assert np.allclose(lam[b].numpy(), lam_ref[:6], atol=1e-4)
        parts = int((lam_ref < 1e-5).sum())                        # objects linked only by floor-weight edges
        if parts < 7 and lam_ref[parts] > 1e-4:                   # a clear gap: their indicator space is determined
            R = L @ v[:, :parts] - v[:, :parts] * lam[b, :parts].double().numpy()
            bound = np.linalg.norm(R) / (lam_ref[parts] - float(lam[b, parts - 1]))   # Davis–Kahan sin Θ theorem
            assert np.sin(subspace_angles(v[:, :parts], V_ref[:, :parts]).max()) <= bound
            assert subspace_angles(v[:, :parts], V_ref[:, :parts]).max() < 0.1


def test_laplacian_against_scipy():
    W = affinity(torch.tensor(blobs()[None]), 8)
    ref = sp.csgraph.laplacian(sp.csr_matrix(W.to_dense()[0].numpy()), normed=True).toarray()
    assert np.allclose(normalized_laplacian(W)[0].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize('solver', SOLVERS)
def test_eigenvectors_against_eigsh(solver):
    x = torch.tensor(np.stack([blobs(), blobs(seed=5)]))
    W = knn_affinity(x, 10)
    for b in range(2):
        Wb = sp.csr_matrix(W.to_dense()[b].numpy())
        assert sp.csgraph.connected_components(Wb)[0] == 1
        L = sp.csgraph.laplacian(Wb, normed=True)
        lam_ref, V_ref = spla.eigsh(L, k=3, sigma=-1e-3, which='LM')
        dense = np.linalg.eigvalsh(L.toarray())
        assert dense[3] > 5 * dense[2]                                          # well separated clusters
        lam, V = laplacian_eigs(W, 3, solver, dense_below=0, tol=1e-6)
        assert np.allclose(lam[b].numpy(), np.sort(lam_ref), atol=1e-6)
        assert subspace_angles(V[b].numpy(), V_ref).max() <= 1e-3
        assert subspace_angles(V[b].numpy(), np.linalg.eigh(L.toarray())[1][:, :3]).max() <= 1e-3


def test_plain_shifted_iteration_and_float32():
    x = torch.tensor(blobs()[None])
    A, _ = normalized_affinity(knn_affinity(x, 10))
    _, V_ref = laplacian_eigs(knn_affinity(x, 10), 3, 'eigh')
    lam1, V1, n1 = subspace_eigs(A, 3, degree=1, tol=1e-6, max_iter=5000)                 # no Chebyshev
    lam8, V8, n8 = subspace_eigs(A, 3, degree=8, tol=1e-6)
    assert subspace_angles(V1[0].numpy(), V_ref[0].numpy()).max() <= 1e-3
    assert subspace_angles(V8[0].numpy(), V_ref[0].numpy()).max() <= 1e-3
    assert n8 < n1                                                                         # acceleration pays off
    lam32, V32, _ = subspace_eigs(A.float(), 3, tol=1e-4)
    assert subspace_angles(V32[0].double().numpy(), V_ref[0].numpy()).max() <= 1e-2


def test_power_iteration_on_L_goes_to_the_wrong_end():
    from spectraldiffusion.spectral import power_iteration, affinity_operator
    W = knn_affinity(torch.tensor(blobs()[None]), 8)
    L = normalized_laplacian(W)
    lam = torch.linalg.eigvalsh(L)[0]
    x0 = torch.randn(1, 450, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, rq = power_iteration(lambda v: L @ v, x0, 300)
    assert abs(float(rq[-1, 0]) - float(lam[-1])) < 1e-3 and float(lam[-1]) > 1
    op = affinity_operator(normalized_affinity(W)[0])
    _, rq = power_iteration(lambda v: (v + op(v)) / 2, x0, 300)
    assert abs(2 * (1 - float(rq[-1, 0])) - float(lam[0])) < 1e-3


def test_disconnected_graph_documented_result():
    far = torch.tensor(blobs(sd=0.3, n=100, centres=((0, 0), (50, 0), (0, 50)))[None])
    W = knn_affinity(far, 8)
    assert sp.csgraph.connected_components(sp.csr_matrix(W.to_dense()[0].numpy()))[0] == 3
    truth = np.repeat([0, 1, 2], 100)
    for solver in SOLVERS:
        lam, V = laplacian_eigs(W, 3, solver, dense_below=0, tol=1e-6)
        assert float(lam.abs().max()) < 1e-8
        assert adjusted_rand_score(truth, spectral_clusters(V, 3)[0].numpy()) == 1.0


def test_clusters_against_sklearn_and_eigengap():
    W = knn_affinity(torch.tensor(blobs()[None]), 10)
    lam, V = laplacian_eigs(W, 6, 'eigh')
    ours = spectral_clusters(V, 3)[0].numpy()
    ref = SpectralClustering(3, affinity='precomputed', random_state=0).fit(W.to_dense()[0].numpy()).labels_
    assert adjusted_rand_score(ref, ours) == 1.0
    assert eigengap_k(lam).tolist() == [3]


def test_degenerate_and_bad_inputs():
    W = knn_affinity(torch.randn(1, 20, 3), 5)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, N\]"): laplacian_eigs(W, 21)
    with pytest.raises(ValueError, match="solver"): laplacian_eigs(W, 2, 'arpack')
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, N-1\]"): knn_affinity(torch.randn(1, 5, 2), 5)
    with pytest.raises(ValueError, match="metric"): knn_affinity(torch.randn(1, 5, 2), 2, metric='l1')
    with pytest.raises(ValueError, match="NaN"): knn_affinity(torch.full((1, 5, 2), float('nan')), 2)
    with pytest.raises(ValueError, match="non-negative"):
        normalized_affinity(torch.sparse_coo_tensor(torch.tensor([[0], [0], [1]]), torch.tensor([-1.]), (1, 2, 2), check_invariants=False))
    with pytest.raises(ValueError, match="sparse COO"): normalized_affinity(torch.eye(3)[None])
    with pytest.raises(ValueError, match="grid"): grid_affinity(torch.randn(1, 10, 2), (3, 3), 1.0)
    with pytest.raises(ValueError, match="k: expected an int in"): spectral_slots(torch.randn(1, 16, 3), (4, 4), 17)
    # identical points (a constant image's tokens): a valid graph, no NaN
    lam, V = laplacian_eigs(knn_affinity(torch.zeros(1, 30, 3), 5, bandwidth='global', jitter=1e-3), 3, 'eigh')
    assert torch.isfinite(lam).all() and torch.isfinite(V).all()


def test_helpers():
    lab = np.zeros((6, 6), int); lab[:2, :2] = 1; lab[4:, 4:] = 1; lab[3, 0] = 2
    seg = split_components(lab, min_size=2)
    assert len(np.unique(seg)) == 3 and seg[3, 0] == seg[5, 0] and seg[0, 0] != seg[5, 5]
    assert merge_similar(torch.tensor([[[0.], [0.01], [1.], [1.02]]]), torch.tensor([[0, 1, 2, 3]]), 0.05).tolist() == [[0, 0, 2, 2]]
    pix = torch.zeros(1, 16, 16); pix[0, 3:11, 5:13] = 1.0
    assert torch.equal(refine_segments((pix[0, 2::4, 2::4] > 0.5).long().numpy(), pix), (pix[0] > 0.5).long())
    tok = torch.randn(2, 10, 3, dtype=torch.float64); lab = torch.tensor([[0] * 4 + [1] * 6, [2] * 10])
    proto, cnt = segment_prototypes(tok, lab, 3)
    assert torch.allclose(proto[0, 0], tok[0, :4].mean(0)) and cnt[1].tolist() == [0, 0, 10]


def squares_image(seed=0, size=64):
    "Hand-made scene: flat background, three flat squares, two of them the same colour (known instances)."
    rng = np.random.default_rng(seed)
    img = np.ones((3, size, size), np.float32) * rng.uniform(0.2, 0.4, (3, 1, 1)).astype(np.float32)
    inst = np.zeros((size, size), np.int64)
    same = rng.uniform(0.6, 1.0, 3).astype(np.float32)
    for i, (y, x, c) in enumerate([(8, 8, same), (40, 36, same), (10, 42, np.array([0.9, 0.1, 0.1], np.float32))], 1):
        img[:, y:y + 14, x:x + 14] = c[:, None, None]; inst[y:y + 14, x:x + 14] = i
    return torch.tensor(img), torch.tensor(inst)


def test_spectral_segment_recovers_instances():
    imgs, insts = zip(*[squares_image(s) for s in range(3)])
    imgs, insts = torch.stack(imgs), torch.stack(insts)
    pred = spectral_segment(imgs)
    assert pred.shape == (3, 64, 64) and pred.dtype == torch.long
    for b in range(3):
        fg = insts[b] > 0
        assert adjusted_rand_score(insts[b][fg].numpy(), pred[b][fg].numpy()) == 1.0    # same-colour squares split
        ids = pred[b].unique()
        assert ids.min() == 1 and torch.equal(ids, torch.arange(1, len(ids) + 1))
    assert torch.equal(spectral_segment(imgs), pred)                                     # deterministic
    from spectraldiffusion.features import LocalFeatures
    nopos = LocalFeatures(position_weight=0.0)                 # the two same-colour squares now look identical
    # k = 3 colours (background, the pair, red): with the default k = 6 k-means must also cut flat regions, which
    # way is arbitrary (the exact eigenvectors and the old solver each cut a square on some of these scenes)
    for b in range(3):
        fg = insts[b] > 0
        nosplit = spectral_segment(imgs[b:b + 1], k=3, backbone=nopos, split=False)
        assert adjusted_rand_score(insts[b][fg].numpy(), nosplit[0][fg].numpy()) < 1.0  # they share a cluster …
        split = spectral_segment(imgs[b:b + 1], k=3, backbone=nopos)
        assert adjusted_rand_score(insts[b][fg].numpy(), split[0][fg].numpy()) == 1.0  # … and become two instances


def test_spectral_segment_edge_cases():
    const = torch.full((2, 3, 20, 24), 0.5)
    assert torch.equal(spectral_segment(const), torch.ones(2, 20, 24, dtype=torch.long))  # documented: one segment
    tiny = spectral_segment(torch.rand(1, 3, 4, 4), k=6)                                    # 2×2 tokens < k
    assert tiny.shape == (1, 4, 4) and 1 <= int(tiny.max()) <= 4
    one = spectral_segment(torch.rand(1, 3, 1, 1))
    assert one.tolist() == [[[1]]]
    big = spectral_segment(torch.rand(1, 3, 96, 80), solver='lobpcg')
    assert big.shape == (1, 96, 80)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"): spectral_segment(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0,1\]"): spectral_segment(torch.full((1, 3, 8, 8), -1.0))
    with pytest.raises(ValueError, match="k: expected a positive int"): spectral_segment(torch.rand(1, 3, 8, 8), k=0)
    with pytest.raises(ValueError, match="solver"): spectral_segment(torch.rand(1, 3, 16, 16), solver='qr')


def test_multiscale_slots_and_view():
    img, _ = squares_image(1)
    from spectraldiffusion.features import LocalFeatures
    tok, g = LocalFeatures()(img[None])
    aff = dict(metric='euclidean', bandwidth='global', min_scale=0.02, jitter=1e-3, grid_weight=1.0)
    slots, active = multiscale_slots(tok, g, dedup=0.99, **aff)
    assert slots.shape == (1, 12, tok.shape[-1]) and active[0, :4].all()
    u = torch.nn.functional.normalize(slots[0][active[0]], dim=-1)
    assert ((u @ u.T).fill_diagonal_(0) <= 0.99).all()
    assert active.sum() < 12                                     # a scene of 4 flat regions repeats across scales
    seg = scale_segments(img, 3, 8)
    assert seg.shape == (8, 8) and set(np.unique(seg)) <= {0, 1, 2}


def test_bench_quick():
    res = bench(quick=True)
    json.dumps(res)
    assert set(res['quality']) == {'multi_dsprites', 'clevr_like', 'textured', 'moving'}
    for v in res['quality'].values():
        assert -1 <= v['spectral_fg_ari'] <= 1 and v['spectral_s_per_image'] > 0
    row = res['speed']['32x32']
    assert row['tokens'] == [32, 32] and {'subspace', 'lobpcg', 'eigh', 'sklearn'} <= set(row)
    assert row['subspace']['speedup_vs_sklearn'] > 0


# ---------------------------------------------------------------- one image, one answer, whatever its batch

def _bench_images(variant, n):
    from spectraldiffusion.data import BenchmarkDataset
    ds = BenchmarkDataset(variant, 'test')
    return torch.stack([ds[i]['image'] for i in range(n)])


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('variant', ['multi_dsprites', 'textured'])
def test_spectral_segment_is_batch_invariant(solver, variant):
    "The instance map of an image is the same in a batch of 5 and alone, bit for bit, with every solver."
    img = _bench_images(variant, 5)
    kw = dict(solver=solver, grid=16)
    batch = spectral_segment(img, **kw)
    assert torch.equal(batch, torch.cat([spectral_segment(img[i:i + 1], **kw) for i in range(len(img))]))


def test_subspace_eigs_batch_invariant_and_frozen_when_converged():
    "Per-image degrees and freezing: each image's eigenpairs equal those of a batch of one, bit for bit."
    img = _bench_images('clevr_like', 4)
    from spectraldiffusion.features import LocalFeatures
    bb = LocalFeatures(stride=4)
    x, grid = bb(img)[0], bb.grid(img.shape[-2:])
    W = affinity(x, 10, 'euclidean', 'global', 0.02, 1e-3, 0, grid=grid, grid_weight=1.0)
    A, _ = normalized_affinity(W)
    lam, V, _ = subspace_eigs(A, 6)
    for b in range(4):
        Wb = affinity(x[b:b + 1], 10, 'euclidean', 'global', 0.02, 1e-3, 0, grid=grid, grid_weight=1.0)
        assert torch.equal(W[b].coalesce().to_dense(), Wb[0].coalesce().to_dense())
        l1, V1, _ = subspace_eigs(normalized_affinity(Wb)[0], 6)
        assert torch.equal(lam[b], l1[0]) and torch.equal(V[b], V1[0])


def test_colour_kmeans_is_batch_invariant():
    from spectraldiffusion.cluster import colour_kmeans_segment
    img = _bench_images('clevr_like', 4)
    assert torch.equal(colour_kmeans_segment(img), torch.cat([colour_kmeans_segment(img[i:i + 1]) for i in range(4)]))
