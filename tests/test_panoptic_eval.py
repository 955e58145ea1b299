"""The CUPS-style unsupervised panoptic protocol of `spectraldiffusion.panoptic_eval`: hand-counted cases, perfect
predictors with permuted cluster ids, and cross-checks against the dense route and torchmetrics."""
import numpy as np
import pytest
import torch
from PIL import Image

from spectraldiffusion import data, metrics
from spectraldiffusion.panoptic_eval import PanopticEvaluator, bench, dataset_classes, evaluate_panoptic

ROAD, CAR, SKY = 0, 1, 2


def toy():
    "Two 4×4 images (road/sky stuff, car thing) and a prediction with one wrong pixel and two merged cars."
    tA = torch.tensor([[SKY] * 4, [SKY] * 4, [ROAD, CAR, CAR, ROAD], [ROAD, CAR, CAR, ROAD]])
    tB = torch.tensor([[SKY] * 4, [ROAD] * 4, [ROAD, CAR, ROAD, CAR], [ROAD, CAR, ROAD, CAR]])
    iA = (tA == CAR).long()
    iB = torch.tensor([[0] * 4, [0] * 4, [0, 1, 0, 2], [0, 1, 0, 2]])
    cluster = torch.tensor([1, 2, 0])                                         # road → 1, car → 2, sky → 0
    pA, pB = cluster[tA], cluster[tB]
    pA[1, 3] = 1                                                              # one sky pixel predicted as road
    return (torch.stack([pA, pB]), torch.stack([(pA == 2) * 7, (pB == 2) * 3]),   # cars of B merged into one
            torch.stack([tA, tB]), torch.stack([iA, iB]))


def test_hand_counted_case():
    ev = PanopticEvaluator(3, things=[CAR], stuffs=[ROAD, SKY]).update(*toy())
    r = ev.compute()
    # sky: IoU 7/8 and 1 → PQ 0.9375; road: IoU 4/5 and 1 → 0.9; car: 1 TP (IoU 1), 1 FP, 2 FN → PQ 1/2.5
    assert r['mapping'] == {0: SKY, 1: ROAD, 2: CAR}
    assert r['per_class'][SKY]['pq'] == pytest.approx(0.9375)
    assert r['per_class'][ROAD]['pq'] == pytest.approx(0.9)
    assert (r['per_class'][CAR]['tp'], r['per_class'][CAR]['fp'], r['per_class'][CAR]['fn']) == (1, 1, 2)
    assert r['pq'] == pytest.approx((0.9375 + 0.9 + 0.4) / 3)
    assert r['pq_th'] == pytest.approx(0.4) and r['sq_th'] == pytest.approx(1.0) and r['rq_th'] == pytest.approx(0.4)
    assert r['pq_st'] == pytest.approx((0.9375 + 0.9) / 2)
    assert r['miou'] == pytest.approx((11 / 12 + 12 / 13 + 1) / 3) and r['accuracy'] == pytest.approx(31 / 32)
    assert r['n_images'] == 2 and r['matching'] == 'joint'


def test_split_matching_and_leftover_clusters():
    # cluster 3 is a small piece of road; cluster 2 (cars) is declared a thing cluster. Jointly, Hungarian would
    # give road to cluster 1 and leave 3 to argmax (road); with the split, stuff clusters {0,1,3} share road/sky.
    sem, inst, tc, ti = toy()
    sem = sem.clone(); sem[1, 1, 0] = 3
    for kw in ({}, dict(thing_clusters=[2], stuff_clusters=[0, 1, 3])):
        r = PanopticEvaluator(4, things=[CAR], stuffs=[ROAD, SKY], **kw).update(sem, inst, tc, ti).compute()
        assert r['mapping'] == {0: SKY, 1: ROAD, 2: CAR, 3: ROAD}
    # a wrong thing/stuff declaration forces the car cluster onto stuff: cars are then missed entirely
    r = PanopticEvaluator(3, things=[CAR], stuffs=[ROAD, SKY], thing_clusters=[0], stuff_clusters=[1, 2]).update(*toy()).compute()
    assert r['mapping'][0] == CAR and r['per_class'][CAR]['tp'] == 0
    assert r['semantic_mapping'] == {0: SKY, 1: ROAD, 2: CAR}                 # mIoU keeps the joint matching
    assert r['miou'] == pytest.approx((11 / 12 + 12 / 13 + 1) / 3)


def test_crowd_void_or_segment():
    sem, inst, tc, ti = toy()
    ti = ti.clone(); ti[1][ti[1] > 0] = 0                                     # image B's cars: one crowd region
    void = PanopticEvaluator(3, things=[CAR], stuffs=[ROAD, SKY]).update(sem, inst, tc, ti).compute()
    seg = PanopticEvaluator(3, things=[CAR], stuffs=[ROAD, SKY], crowd='segment').update(sem, inst, tc, ti).compute()
    assert (void['per_class'][CAR]['tp'], void['per_class'][CAR]['fp'], void['per_class'][CAR]['fn']) == (1, 0, 0)
    assert (seg['per_class'][CAR]['tp'], seg['per_class'][CAR]['fp'], seg['per_class'][CAR]['fn']) == (2, 0, 0)
    assert void['miou'] == seg['miou']


def random_maps(seed, B=5, H=32, W=40):
    g = torch.Generator().manual_seed(seed)
    tcls = torch.randint(0, 4, (B, H // 8, W // 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2) + 10
    tinst = torch.zeros(B, H, W, dtype=torch.long)
    for k in range(1, 5):
        y, x = torch.randint(0, H - 10, (2,), generator=g)
        tcls[:, y:y + 10, x:x + 9] = 30 + k % 2; tinst[:, y:y + 10, x:x + 9] = k
    sem = (tcls * 3 + tinst) % 7
    sem = torch.where(torch.rand(B, H, W, generator=g) < 0.15, torch.randint(0, 7, (B, H, W), generator=g), sem)
    inst = torch.where(sem >= 5, tinst * 3 + (sem == 6), 0)
    return sem, inst, tcls, tinst


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_equals_dense_route(seed):
    sem, inst, tcls, tinst = random_maps(seed)
    tcls[:, :2] = data.IGNORE_INDEX; tinst[:, :2] = 0                          # void rows
    tinst[0][tinst[0] == 2] = 0                                               # a crowd region
    ids = [10, 11, 12, 13, 30, 31]
    t = torch.full((256,), 6, dtype=torch.long); t[torch.tensor(ids)] = torch.arange(6); t = t[tcls]
    for kw, mk in (({}, {}), (dict(thing_clusters=[5, 6], stuff_clusters=[0, 1, 2, 3, 4]),
                               dict(things=[4, 5], stuffs=[0, 1, 2, 3], thing_clusters=[5, 6], stuff_clusters=[0, 1, 2, 3, 4]))):
        ev = PanopticEvaluator(7, things=[30, 31], stuffs=[10, 11, 12, 13], **kw)
        for b in range(0, 5, 2): ev.update(sem[b:b + 2], inst[b:b + 2], tcls[b:b + 2], tinst[b:b + 2])
        got = ev.compute()
        m = metrics.ClusterMatcher(7, 6, ignore_index=6, **mk).update(sem, t)
        tpq = torch.where((t >= 4) & (t < 6) & (tinst == 0), 6, t)
        ref = metrics.panoptic_quality(inst, tinst, m.relabel(sem), tpq, things=[4, 5], stuffs=[0, 1, 2, 3])
        for k in ('pq', 'sq', 'rq', 'pq_th', 'sq_th', 'rq_th', 'pq_st', 'sq_st', 'rq_st'):
            assert got[k] == pytest.approx(ref[k], abs=1e-12), k
        assert got['miou'] == pytest.approx(m.compute()['miou'], abs=1e-12)


def test_matches_torchmetrics_without_void():
    from torchmetrics.detection import PanopticQuality
    sem, inst, tcls, tinst = random_maps(5)
    ev = PanopticEvaluator(7, things=[30, 31], stuffs=[10, 11, 12, 13]).update(sem, inst, tcls, tinst)
    r = ev.compute()
    lut = torch.tensor([r['mapping'][k] for k in range(7)])
    tm = PanopticQuality(things={30, 31}, stuffs={10, 11, 12, 13}, return_sq_and_rq=True, return_per_class=False)
    tm.update(torch.stack([lut[sem], inst], -1), torch.stack([tcls, tinst], -1))
    pq, sq, rq = tm.compute().tolist()
    assert (r['pq'], r['sq'], r['rq']) == pytest.approx((pq, sq, rq), abs=1e-6)


def write_cityscapes(root, n=3, size=48):
    "A tiny Cityscapes val split (PIL, numpy) with void pixels and a group (crowd) region."
    rng = np.random.default_rng(7)
    for i in range(n):
        d_img, d_gt = root / 'leftImg8bit' / 'val' / 'ulm', root / 'gtFine' / 'val' / 'ulm'
        d_img.mkdir(parents=True, exist_ok=True); d_gt.mkdir(parents=True, exist_ok=True)
        label = np.where(np.arange(size)[:, None] < size // 2, 23, 7) * np.ones((1, size), np.int64)
        label[:2] = 0
        raw = label.copy()
        for k in range(1, 5):
            y, x = rng.integers(2, size - 10, 2); c = (24, 26)[k % 2]
            label[y:y + 10, x:x + 8] = c; raw[y:y + 10, x:x + 8] = c if k == 4 else c * 1000 + k
        stem = f"ulm_{i:06d}_000019"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d_img / f"{stem}_leftImg8bit.png")
        Image.fromarray(label.astype(np.uint8)).save(d_gt / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(raw.astype(np.uint16)).save(d_gt / f"{stem}_gtFine_instanceIds.png")


def test_perfect_predictor_with_permuted_clusters_on_cityscapes(tmp_path):
    write_cityscapes(tmp_path)
    ds = data.CityscapesPanoptic(tmp_path, 'val')
    perm = torch.randperm(27, generator=torch.Generator().manual_seed(0))
    truth = {ds[i]['image'].sum().item(): ds[i] for i in range(len(ds))}

    def oracle(images):
        items = [truth[im.sum().item()] for im in images]
        cls = torch.stack([it['classes'] for it in items])
        return perm[cls.clamp(max=26)], torch.stack([it['instances'] for it in items]) * 5 + 1
    r = evaluate_panoptic(oracle, ds, n_clusters=27, batch_size=2)
    assert (r['pq'], r['sq'], r['rq'], r['pq_th'], r['pq_st'], r['miou'], r['accuracy']) == (1.0,) * 7
    assert r['n_images'] == 3 and r['seconds_per_image'] >= 0
    assert all(r['mapping'][int(perm[c])] == c for c in (0, 16, 17, 19))      # road, sky, person, car


def test_evaluate_on_builtin_benchmark_and_clips():
    ds = data.BenchmarkDataset('moving', 'test', n=2, image_size=32, frames=3)
    assert dataset_classes(ds) == ((1, 2, 3, 4), (0,), data.IGNORE_INDEX)
    frames = {}
    for i in range(2):
        for t in range(3): frames[ds[i]['image'][t].sum().item()] = (ds[i]['classes'][t], ds[i]['instances'][t])
    perm = torch.tensor([3, 0, 4, 1, 2])
    oracle = lambda im: (perm[torch.stack([frames[x.sum().item()][0] for x in im])], torch.stack([frames[x.sum().item()][1] for x in im]))
    r = evaluate_panoptic(oracle, ds, n_clusters=5, batch_size=2)
    assert r['n_images'] == 6 and r['pq'] == 1.0 and r['miou'] == 1.0
    r1 = evaluate_panoptic(oracle, ds, n_clusters=5, limit=1)
    assert r1['n_images'] == 3


def test_bad_input():
    with pytest.raises(ValueError, match='are in both'): PanopticEvaluator(3, things=[1], stuffs=[1, 2])
    with pytest.raises(ValueError, match='ignore_index: 255 is also a class id'): PanopticEvaluator(3, things=[255], stuffs=[0])
    with pytest.raises(ValueError, match='give both or neither'): PanopticEvaluator(3, things=[1], stuffs=[0], stuff_clusters=[1])
    with pytest.raises(ValueError, match='split matching needs thing and stuff classes'):
        PanopticEvaluator(3, things=[], stuffs=[0, 1], thing_clusters=[0], stuff_clusters=[1, 2])
    ev = PanopticEvaluator(3, things=[CAR], stuffs=[ROAD, SKY])
    with pytest.raises(ValueError, match='no image seen yet'): ev.compute()
    sem, inst, tc, ti = toy()
    with pytest.raises(ValueError, match=r'cluster ids must lie in \[0, 3\)'): ev.update(sem + 1, inst, tc, ti)
    with pytest.raises(ValueError, match='shapes differ'): ev.update(sem, inst[:, :2], tc, ti)
    with pytest.raises(ValueError, match='non-negative'): ev.update(sem, inst - 1, tc, ti)
    ds = data.BenchmarkDataset('multi_dsprites', 'test', n=1)
    with pytest.raises(ValueError, match='predict: returned semantic of shape'):
        evaluate_panoptic(lambda im: (torch.zeros(1, 8, 8, dtype=torch.long),) * 2, ds, n_clusters=2)
    with pytest.raises(TypeError, match='predict: expected it to return'): evaluate_panoptic(lambda im: im, ds, n_clusters=2)

    class NoClasses(torch.utils.data.Dataset):
        def __len__(self): return 1
        def __getitem__(self, i): return ds[0]
    with pytest.raises(ValueError, match='pass things= and stuffs='): evaluate_panoptic(lambda im: None, NoClasses(), 2)


def test_bench_quick():
    b = bench(quick=True)
    assert b['pq_abs_diff'] < 1e-12 and b['n_images'] == 8
    assert b['memory_ratio_dense_over_evaluator'] == b['dense_cache_bytes'] / b['evaluator_cache_bytes'] > 10
    assert b['evaluator_s'] > 0 and b['dense_s'] > 0
