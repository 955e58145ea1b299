"""End-to-end tests of the console scripts, run as a user runs them (subprocesses)."""
import json, os, pathlib, subprocess, sys
import numpy as np
import pytest
import torch
from PIL import Image

BIN = pathlib.Path(sys.executable).parent
SCRIPTS = ['sd_data', 'sd_segment', 'sd_evaluate', 'sd_bench']


def run(*args, check=True):
    p = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0: raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.mark.parametrize('script', SCRIPTS)
def test_help(script):
    p = run(script, '--help')
    assert 'usage' in p.stdout.lower() and script in p.stdout


def test_data_then_segment_then_read_back(tmp_path):
    from spectraldiffusion import data
    from spectraldiffusion.cluster import colour_kmeans_segment
    run('sd_data', '--variant', 'multi_dsprites', '--n', 4, '--seed', 3, '--out', tmp_path / 'ds')
    images = data.list_images(tmp_path / 'ds' / 'images')
    assert len(images) == 4
    run('sd_segment', '--method', 'colour_kmeans', '--k', 5, '--input', tmp_path / 'ds' / 'images', '--out', tmp_path / 'seg')
    for p in images:
        got = data.load_id_png(tmp_path / 'seg' / (p.stem + '.png'))
        ref = colour_kmeans_segment(data.load_image(p)[None], k=5)[0]
        assert torch.equal(got, ref)


def test_segment_spectral(tmp_path):
    pytest.importorskip('spectraldiffusion.spectral')
    from spectraldiffusion import data
    run('sd_data', '--variant', 'textured', '--n', 2, '--seed', 1, '--out', tmp_path / 'ds')
    run('sd_segment', '--method', 'spectral', '--input', tmp_path / 'ds' / 'images', '--out', tmp_path / 'seg')
    for p in data.list_images(tmp_path / 'ds' / 'images'):
        ids = data.load_id_png(tmp_path / 'seg' / (p.stem + '.png'))
        assert ids.shape == data.load_image(p).shape[1:] and ids.min() >= 0


def test_segment_bad_input(tmp_path):
    p = run('sd_segment', '--method', 'colour_kmeans', '--input', tmp_path / 'nope', '--out', tmp_path / 'o', check=False)
    assert p.returncode != 0 and 'nope' in p.stderr
    p = run('sd_segment', '--method', 'magic', '--input', tmp_path, '--out', tmp_path / 'o', check=False)
    assert p.returncode != 0 and 'magic' in p.stderr


def test_evaluate_writes_report(tmp_path):
    run('sd_evaluate', '--out', tmp_path, '--variants', 'multi_dsprites', '--methods', 'one_segment', 'colour_kmeans', '--n', 4)
    m = json.loads((tmp_path / 'metrics.json').read_text())
    r = m['multi_dsprites']
    assert set(r) == {'one_segment', 'colour_kmeans'}
    for k in ('ari', 'fg_ari', 'mbo', 'miou', 'pq', 'sq', 'rq'): assert 0 <= r['colour_kmeans'][k] <= 1
    assert (tmp_path / 'figures' / 'multi_dsprites.png').exists()
    assert 'colour_kmeans' in (tmp_path / 'report.md').read_text()
    p = run('sd_evaluate', '--out', tmp_path, '--variants', 'imagenet', check=False)
    assert p.returncode != 0 and 'imagenet' in p.stderr


def test_bench_metrics_quick(tmp_path):
    run('sd_bench', 'metrics', '--quick', '--json', tmp_path / 'b.json')
    res = json.loads((tmp_path / 'b.json').read_text())
    assert res['benchmark'] == 'metrics' and res['quick'] is True and res['results']


def test_bench_device_option(tmp_path):
    run('sd_bench', 'ssm', '--quick', '--device', 'cpu', '--json', tmp_path / 's.json')
    res = json.loads((tmp_path / 's.json').read_text())['results']
    assert res['device'] == 'cpu' and all(r['gemm_only_s'] > 0 for c in res['cases'] for r in c['ssd'])
    p = run('sd_bench', 'metrics', '--device', 'cpu', check=False)
    assert p.returncode != 0 and 'runs on the CPU only' in p.stderr


def test_segment_large_image_at_max_side(tmp_path):
    "A 1200×1600 photo is segmented at 768×1024 by default and its map written at full size; --max-side 0 keeps it whole."
    from spectraldiffusion import data
    rng = np.random.default_rng(0)
    img = np.zeros((1200, 1600, 3), np.uint8); img[:] = (30, 60, 90); img[300:700, 200:900] = (220, 40, 40)
    img = (img + rng.integers(0, 8, img.shape)).astype(np.uint8)
    (tmp_path / 'in').mkdir(); Image.fromarray(img).save(tmp_path / 'in' / 'photo.png')
    run('sd_segment', '--method', 'colour_kmeans', '--k', 2, '--input', tmp_path / 'in', '--out', tmp_path / 'a')
    run('sd_segment', '--method', 'colour_kmeans', '--k', 2, '--max-side', 0, '--input', tmp_path / 'in', '--out', tmp_path / 'b')
    a, b = data.load_id_png(tmp_path / 'a' / 'photo.png'), data.load_id_png(tmp_path / 'b' / 'photo.png')
    assert a.shape == b.shape == (1200, 1600)
    red = torch.zeros(1200, 1600, dtype=torch.bool); red[300:700, 200:900] = True
    for m in (a, b):                                                  # both find the red box (to a pixel or two at the edges)
        inside = torch.mode(m[red]).values
        assert ((m == inside) == red).float().mean() > 0.999
    p = run('sd_segment', '--method', 'colour_kmeans', '--max-side', -1, '--input', tmp_path / 'in', '--out', tmp_path / 'c', check=False)
    assert p.returncode != 0 and '--max-side' in p.stderr


def test_evaluate_data_respects_n(tmp_path):
    run('sd_data', '--variant', 'multi_dsprites', '--n', 3, '--out', tmp_path / 'ds')
    for extra, want in (([], 3), (['--n', 2], 2)):
        run('sd_evaluate', '--out', tmp_path / f'ev{want}', '--data', tmp_path / 'ds', '--methods', 'one_segment', *extra)
        assert json.loads((tmp_path / f'ev{want}' / 'metrics.json').read_text())['ds']['one_segment']['n_images'] == want
