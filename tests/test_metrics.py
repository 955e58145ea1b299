"""Tests of spectraldiffusion.metrics: bad input, numpy/torch equivalence, invariances, references, the benchmark."""
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from spectraldiffusion import metrics as M

PER_IMAGE = [M.ari, M.fg_ari, M.mbo, M.miou]
ALL = PER_IMAGE + [M.panoptic_quality, M.contingency]


def _maps(seed=0, B=4, H=12, W=10, kp=5, kt=4):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, kt, (B, H, W))
    t[:, 0, 0] = 1                                           # every image has foreground
    p = np.where(rng.random(t.shape) < 0.6, t + 2, rng.integers(0, kp, t.shape))
    return p, t


# ---------------------------------------------------------------- bad input: one clear error naming the argument
@pytest.mark.parametrize('fn', ALL, ids=lambda f: f.__name__)
@pytest.mark.parametrize('which', ['pred', 'target'])
def test_float_labels_rejected(fn, which):
    p, t = _maps()
    args = dict(pred=torch.from_numpy(p), target=torch.from_numpy(t))
    args[which] = args[which].float()
    with pytest.raises(TypeError, match=f'{which}: expected integer label ids'):
        fn(args['pred'], args['target'])
    args[which] = args[which].numpy()
    with pytest.raises(TypeError, match=f'{which}: expected integer label ids, got numpy dtype float32'):
        fn(args['pred'], args['target'])


@pytest.mark.parametrize('fn', ALL, ids=lambda f: f.__name__)
@pytest.mark.parametrize('which', ['pred', 'target'])
def test_bad_ndim_negative_and_type(fn, which):
    p, t = _maps()
    good = dict(pred=p, target=t)
    for bad, err, msg in [(p[0, 0], ValueError, 'expected a label map'),            # 1-D
                          (p[None], ValueError, 'expected a label map'),            # 4-D
                          (-p - 1, ValueError, 'ids must be non-negative'),
                          (p.tolist(), TypeError, 'expected a torch.Tensor or numpy array'),
                          (np.zeros((2, 0, 3), int), ValueError, 'expected at least one image with at least one pixel')]:
        args = dict(good, **{which: bad})
        with pytest.raises(err, match=f'{which}: {msg}'):
            fn(args['pred'], args['target'])


@pytest.mark.parametrize('fn', ALL, ids=lambda f: f.__name__)
def test_mismatched_shapes(fn):
    p, t = _maps()
    with pytest.raises(ValueError, match=r'pred, target: shapes differ, \(4, 12, 10\) vs \(4, 12, 9\)'):
        fn(p, t[..., :9])
    with pytest.raises(ValueError, match='shapes differ'):
        fn(p[:3], t)


@pytest.mark.parametrize('fn', [M.fg_ari, M.mbo, M.miou], ids=lambda f: f.__name__)
def test_empty_foreground_policy(fn):
    p, t = _maps()
    t[2] = 0
    with pytest.raises(ValueError, match=r'target: image\(s\) \[2\] have no foreground'):
        fn(p, t)
    v = fn(p, t, empty='nan')
    assert v.isnan().tolist() == [False, False, True, False]
    ok = fn(np.delete(p, 2, 0), np.delete(t, 2, 0))
    assert torch.equal(torch.cat([v[:2], v[3:]]), ok)
    with pytest.raises(ValueError, match="empty: expected 'raise' or 'nan', got 'omit'"):
        fn(p, t, empty='omit')


def test_panoptic_quality_bad_classes():
    p, t = _maps()
    with pytest.raises(ValueError, match='pred_classes: pred_classes and target_classes must be given together'):
        M.panoptic_quality(p, t, target_classes=t)
    with pytest.raises(TypeError, match='pred_classes: expected integer'):
        M.panoptic_quality(p, t, p.astype(float), t)
    with pytest.raises(ValueError, match='target_classes, target: shapes differ'):
        M.panoptic_quality(p, t, p, t[:, :5])
    with pytest.raises(TypeError, match='stuffs: expected a collection'):
        M.panoptic_quality(p, t, p, t, things={1}, stuffs=3)
    with pytest.raises(ValueError, match='things: expected non-negative int class ids'):
        M.panoptic_quality(p, t, p, t, things=[1.5])


def test_cluster_matcher_bad_input():
    with pytest.raises(ValueError, match='n_classes: expected a positive int'):
        M.ClusterMatcher(3, 0)
    with pytest.raises(ValueError, match='thing_clusters: ids must lie in'):
        M.ClusterMatcher(3, 2, things={0}, stuffs={1}, thing_clusters={5}, stuff_clusters={0, 1, 2})
    with pytest.raises(ValueError, match='thing_clusters, stuff_clusters: must split'):
        M.ClusterMatcher(3, 2, things={0}, stuffs={1}, thing_clusters={0}, stuff_clusters={1})
    cm = M.ClusterMatcher(3, 2)
    with pytest.raises(TypeError, match='target: expected integer'):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 2)))
    with pytest.raises(ValueError, match='pred: cluster ids must lie in'):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 2), int)).relabel(np.full((2, 2), 3))


# ---------------------------------------------------------------- numpy / torch / dtype / 2-D equivalence
@pytest.mark.parametrize('fn', PER_IMAGE, ids=lambda f: f.__name__)
def test_numpy_torch_equivalence(fn):
    p, t = _maps(1)
    ref = fn(torch.from_numpy(p), torch.from_numpy(t))
    assert ref.dtype == torch.float64 and ref.shape == (4,)
    for pp, tt in [(p, t), (p.astype(np.uint8), t.astype(np.int32)), (torch.from_numpy(p).int(), t.astype(np.uint16)),
                   (np.asfortranarray(p), t[:, ::-1].copy()[:, ::-1])]:
        assert torch.equal(fn(pp, tt), ref)
    assert torch.equal(fn(p[1], t[1]), ref[1:2])                # [H,W] is a batch of one


def test_panoptic_numpy_torch_equivalence():
    p, t = _maps(2)
    assert M.panoptic_quality(p, t) == M.panoptic_quality(torch.from_numpy(p).short(), torch.from_numpy(t))
    assert M.panoptic_quality(p, t, p % 3, t % 3) == M.panoptic_quality(torch.from_numpy(p), t, torch.from_numpy(p % 3), t % 3)


def test_bool_maps_are_labels():
    t = np.zeros((6, 6), bool); t[2:4] = True
    assert M.ari(t, t.astype(int) * 7).item() == 1.0


# ---------------------------------------------------------------- invariances and batch consistency
@pytest.mark.parametrize('fn', PER_IMAGE, ids=lambda f: f.__name__)
def test_batch_equals_per_image_loop(fn):
    p, t = _maps(3, B=7)
    batched = fn(p, t)
    looped = torch.stack([fn(p[b], t[b])[0] for b in range(7)])
    assert torch.equal(batched, looped)


@pytest.mark.parametrize('fn', PER_IMAGE + [lambda p, t: torch.tensor(M.panoptic_quality(p, t)['pq'])],
                         ids=['ari', 'fg_ari', 'mbo', 'miou', 'pq'])
def test_invariant_to_renaming_predicted_ids(fn):
    p, t = _maps(4)
    rename = np.random.default_rng(0).permutation(1000)[:p.max() + 1] * 977
    torch.testing.assert_close(fn(rename[p], t), fn(p, t), rtol=0, atol=1e-12)


def test_fg_ari_ignores_background_prediction():
    p, t = _maps(5)
    q = p.copy(); q[t == 0] = np.random.default_rng(1).integers(0, 50, (t == 0).sum())
    assert torch.equal(M.fg_ari(p, t), M.fg_ari(q, t))
    assert not torch.equal(M.ari(p, t), M.ari(q, t))


def test_ari_large_images_match_sklearn():
    rng = np.random.default_rng(6)
    t = np.kron(rng.integers(0, 8, (2, 16, 16)), np.ones((32, 32), int))          # 512x512
    p = np.where(rng.random(t.shape) < 0.3, rng.integers(0, 12, t.shape), t)
    for b, v in enumerate(M.ari(p, t)):
        assert abs(v.item() - adjusted_rand_score(t[b].ravel(), p[b].ravel())) < 1e-9


def test_metrics_on_perfect_and_trivial_predictions():
    _, t = _maps(7)
    for fn in PER_IMAGE:
        assert torch.equal(fn(t * 3 + 1, t), torch.ones(4, dtype=torch.float64))
    whole = np.zeros_like(t)                                             # one segment: chance level
    for b, v in enumerate(M.fg_ari(whole, t)):
        fg = t[b].ravel() > 0
        assert abs(v.item() - adjusted_rand_score(t[b].ravel()[fg], whole[b].ravel()[fg])) < 1e-12 and abs(v.item()) < 1e-12
    assert M.panoptic_quality(t, t)['pq'] == 1.0


# ---------------------------------------------------------------- references on benchmark scenes
def test_references_on_synthetic_scenes():
    tm = pytest.importorskip('torchmetrics.detection')
    pred, target = M.bench_maps(24, 48, seed=3)
    for b, v in enumerate(M.fg_ari(pred, target)):
        fg = target[b].flatten() > 0
        assert abs(v.item() - adjusted_rand_score(target[b].flatten()[fg], pred[b].flatten()[fg])) < 1e-9
    ours = M.panoptic_quality(pred, target)
    m = tm.PanopticQuality(things={1}, stuffs=set(), return_sq_and_rq=True)
    m.update(torch.stack([torch.ones_like(pred), pred], -1), torch.stack([(target > 0).long(), target], -1))
    torch.testing.assert_close(m.compute().double(), torch.tensor([ours['pq'], ours['sq'], ours['rq']], dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_colour_baseline_on_benchmark_scenes():
    data = pytest.importorskip('spectraldiffusion.data')
    from spectraldiffusion.cluster import colour_kmeans_segment
    scenes = [data.make_scene(v, s) for v in ('multi_dsprites', 'textured') for s in range(2)]
    for sc in scenes:
        pred = colour_kmeans_segment(sc['image'][None])
        inst = sc['instances'][None]
        fg = inst.flatten() > 0
        assert abs(M.fg_ari(pred, inst).item() - adjusted_rand_score(inst.flatten()[fg], pred.flatten()[fg])) < 1e-9
        assert abs(M.ari(pred, inst).item() - adjusted_rand_score(inst.flatten(), pred.flatten())) < 1e-9
        assert M.ari(inst, inst).item() == 1.0 and M.panoptic_quality(inst, inst)['pq'] == 1.0


# ---------------------------------------------------------------- cluster matching
def test_cluster_matcher_accumulates_and_relabels_lazily():
    rng = np.random.default_rng(8)
    t = rng.integers(0, 3, (6, 8, 8)); p = np.where(rng.random(t.shape) < 0.8, (t + 1) % 3, 3)
    one = M.ClusterMatcher(4, 3).update(p, t)
    many = M.ClusterMatcher(4, 3)
    for b in range(6): many.update(p[b], t[b])
    assert torch.equal(one.confusion, many.confusion)
    lazy = M.ClusterMatcher(4, 3).update(p, t)
    assert torch.equal(lazy.relabel(p), one.relabel(p))                  # relabel computes the mapping if needed
    assert one.compute()['mapping'][:3].tolist() == [2, 0, 1]
    before = one.compute()['miou']
    one.update(np.zeros((4, 4), int), np.ones((4, 4), int))               # new data invalidates the cached result
    assert one.compute()['miou'] != before


# ---------------------------------------------------------------- benchmark
def test_bench_quick_returns_finite_ratios():
    threads = torch.get_num_threads()
    r = M.bench(quick=True, repeats=1)
    assert torch.get_num_threads() == threads                             # bench restores the thread setting
    json.dumps(r)
    assert r['n_images'] == 100 and r['height'] == r['width'] == 64
    for k in ('ari_speedup', 'fg_ari_speedup', 'ari_s', 'sklearn_ari_loop_s', 'pq'):
        assert math.isfinite(r[k]) and r[k] > 0, k
    assert r['ari_max_abs_diff'] < 1e-9 and r['fg_ari_max_abs_diff'] < 1e-9
