"""The built-in benchmark: `sd_data` end to end (called as `main([...])`), file round trips and bad input."""
import hashlib, json, subprocess, sys
import numpy as np
import pytest
import torch
from PIL import Image

from spectraldiffusion import data
from spectraldiffusion.data import (BACKGROUND_SEGMENT_ID, BenchmarkDataset, main, make_loader, make_scene,
                                    read_coco_panoptic, write_coco_panoptic)


def cli(tmp_path, *args):
    return main(['--out', str(tmp_path), *map(str, args)])


# ----------------------------------------------------------------------------------------------------------------
# sd_data end to end

@pytest.mark.parametrize('variant', ['multi_dsprites', 'clevr_like', 'textured'])
def test_cli_writes_coco_panoptic_that_reads_back(tmp_path, variant):
    assert cli(tmp_path, '--variant', variant, '--n', 3, '--seed', 5, '--split', 'val') == 0
    ds = BenchmarkDataset(variant, 'val', seed=5)
    names = [p.name for p in data.list_images(tmp_path / 'images')]
    assert names == ['val_000000.png', 'val_000001.png', 'val_000002.png']
    assert [p.name for p in data.list_images(tmp_path / 'panoptic')] == names
    back = read_coco_panoptic(tmp_path)
    assert len(back) == 3
    for i, b in enumerate(back):
        for k in ('image', 'instances', 'classes'): assert torch.equal(b[k], ds[i][k]), (i, k)
    meta = json.loads((tmp_path / 'panoptic.json').read_text())
    cats = {c['id']: c for c in meta['categories']}
    assert [c['name'] for c in meta['categories'] if c['isthing']] == list(data.CLASS_NAMES[variant][1:])
    assert [c['name'] for c in meta['categories'] if not c['isthing']] == ['background']
    for e, a in zip(meta['images'], meta['annotations']):
        assert a['image_id'] == e['id'] and (e['width'], e['height']) == (ds.options['size'],) * 2
        # recount every segment from the panoptic PNG itself (id = R + 256 G + 256² B)
        rgb = np.asarray(Image.open(tmp_path / 'panoptic' / a['file_name'])).astype(np.int64)
        pan = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert sorted(np.unique(pan).tolist()) == sorted(s['id'] for s in a['segments_info'])
        assert sum(s['area'] for s in a['segments_info']) == pan.size
        for s in a['segments_info']:
            assert s['iscrowd'] == 0 and s['area'] == (pan == s['id']).sum()
            assert cats[s['category_id']]['isthing'] == (s['id'] != BACKGROUND_SEGMENT_ID)


def test_cli_moving_writes_frames(tmp_path):
    cli(tmp_path, '--variant', 'moving', '--n', 2, '--frames', 3, '--size', 40)
    names = [p.name for p in data.list_images(tmp_path / 'images')]
    assert names == [f'test_{v:06d}_f{t:02d}.png' for v in range(2) for t in range(3)]
    meta = json.loads((tmp_path / 'panoptic.json').read_text())
    assert [(e['video_id'], e['frame_id']) for e in meta['images']] == [(v, t) for v in range(2) for t in range(3)]
    ds = BenchmarkDataset('moving', 'test', image_size=40, frames=3)
    back = read_coco_panoptic(tmp_path)
    assert len(back) == 2
    for b, ref in zip(back, (ds[0], ds[1])):
        assert b['image'].shape == (3, 3, 40, 40)
        for k in ('image', 'instances', 'classes'): assert torch.equal(b[k], ref[k])


def test_cli_overwrite(tmp_path, capsys):
    cli(tmp_path, '--variant', 'multi_dsprites', '--n', 3)
    (tmp_path / 'notes.txt').write_text('keep me')
    with pytest.raises(SystemExit) as e: cli(tmp_path, '--variant', 'multi_dsprites', '--n', 2)
    assert e.value.code == 2 and '--out' in capsys.readouterr().err
    cli(tmp_path, '--variant', 'textured', '--n', 2, '--overwrite')
    assert len(data.list_images(tmp_path / 'images')) == 2 and (tmp_path / 'notes.txt').read_text() == 'keep me'
    assert json.loads((tmp_path / 'panoptic.json').read_text())['info']['variant'] == 'textured'


def test_console_script_help():
    p = subprocess.run([sys.executable, '-c', 'from spectraldiffusion.data import main; main(["--help"])'],
                       capture_output=True, text=True)
    assert p.returncode == 0 and '--variant' in p.stdout and 'multi_dsprites' in p.stdout


@pytest.mark.parametrize('args, needle', [
    (['--variant', 'imagenet', '--n', 2], "--variant: invalid choice: 'imagenet'"),
    (['--variant', 'textured', '--n', 0], '--n: expected a positive number'),
    (['--variant', 'textured', '--n', -3], '--n: expected a positive number'),
    (['--variant', 'textured', '--n', 2, '--size', 8], '--size: expected an int in [32'),
    (['--variant', 'textured', '--n', 2, '--seed', -1], '--seed: expected an int ≥ 0'),
    (['--variant', 'textured', '--n', 2, '--frames', 4], '--frames: only the moving variant'),
    (['--variant', 'moving', '--n', 2, '--frames', 0], '--frames: expected an int in [1'),
    (['--variant', 'textured', '--n', 2, '--split', 'holdout'], "--split: invalid choice"),
])
def test_cli_bad_arguments(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as e: cli(tmp_path / 'out', *args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_cli_out_is_a_file(tmp_path, capsys):
    (tmp_path / 'f').write_text('x')
    with pytest.raises(SystemExit): cli(tmp_path / 'f', '--variant', 'textured', '--n', 1)
    assert 'is not a directory' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# generators: determinism without global state

def _digest(sc): return hashlib.sha256(b''.join(sc[k].numpy().tobytes() for k in ('image', 'instances', 'classes'))).hexdigest()


def test_same_seed_same_scene_in_another_process():
    here = {v: _digest(make_scene(v, 123)) for v in data.VARIANTS}
    code = ('import hashlib, json, numpy as np, torch; np.random.seed(7); torch.manual_seed(7)\n'
            'from spectraldiffusion.data import make_scene, VARIANTS\n'
            'd = lambda sc: hashlib.sha256(b"".join(sc[k].numpy().tobytes() for k in ("image", "instances", "classes"))).hexdigest()\n'
            'print(json.dumps({v: d(make_scene(v, 123)) for v in VARIANTS}))')
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert json.loads(p.stdout) == here


def test_generators_leave_global_random_state_alone():
    np.random.seed(0); torch.manual_seed(0)
    a_np, a_t = np.random.random(), torch.rand(1)
    np.random.seed(0); torch.manual_seed(0)
    for v in data.VARIANTS: make_scene(v, 1)
    assert np.random.random() == a_np and torch.equal(torch.rand(1), a_t)


def test_different_seeds_give_different_scenes():
    for v in data.VARIANTS:
        assert len({_digest(make_scene(v, s)) for s in range(10)}) == 10


def test_loader_workers_match_main_process():
    ds = BenchmarkDataset('multi_dsprites', 'train', n=12)
    a = [b['instances'] for b in make_loader(ds, 4, shuffle=True, seed=3)]
    b = [b['instances'] for b in make_loader(ds, 4, shuffle=True, seed=3, num_workers=2)]
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------
# reading a COCO panoptic folder written by someone else

def test_read_foreign_coco_panoptic(tmp_path):
    """Arbitrary segment ids (colours), two stuff categories and void pixels: things → 1..m, the rest → 0."""
    (tmp_path / 'images').mkdir(); (tmp_path / 'panoptic').mkdir()
    Image.fromarray(np.full((4, 6, 3), 200, np.uint8)).save(tmp_path / 'images' / 'a.jpg')
    pan = np.array([[0, 0, 9000, 9000, 77, 77],
                    [5, 5, 9000, 9000, 77, 77],
                    [5, 5, 123456, 123456, 77, 77],
                    [5, 5, 123456, 123456, 0, 0]])
    data.save_id_png(tmp_path / 'panoptic' / 'a.png', pan)
    segs = [dict(id=9000, category_id=3, area=4, bbox=[2, 0, 2, 2], iscrowd=0),
            dict(id=123456, category_id=1, area=4, bbox=[2, 2, 2, 2], iscrowd=0),
            dict(id=77, category_id=92, area=6, bbox=[4, 0, 2, 3], iscrowd=0),
            dict(id=5, category_id=93, area=6, bbox=[0, 1, 2, 3], iscrowd=0)]
    cats = [dict(id=1, name='person', isthing=1), dict(id=3, name='car', isthing=1),
            dict(id=92, name='sky', isthing=0), dict(id=93, name='road', isthing=0)]
    (tmp_path / 'panoptic.json').write_text(json.dumps(dict(
        images=[dict(id=7, file_name='a.jpg', width=6, height=4)],
        annotations=[dict(image_id=7, file_name='a.png', segments_info=segs)], categories=cats)))
    (item,) = read_coco_panoptic(tmp_path)
    assert item['instances'].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 2, 2, 0, 0], [0, 0, 2, 2, 0, 0]]
    assert item['classes'].tolist() == [[0, 0, 3, 3, 0, 0], [0, 0, 3, 3, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert torch.allclose(item['image'], torch.full((3, 4, 6), 200 / 255), atol=2 / 255)


# ----------------------------------------------------------------------------------------------------------------
# bad input of the library functions

def test_make_scene_bad_input():
    with pytest.raises(ValueError, match='variant: expected one of'): make_scene('coco', 0)
    with pytest.raises(TypeError, match='seed: expected an int'): make_scene('textured', '3')
    with pytest.raises(TypeError, match='seed: expected an int'): make_scene('textured', True)
    with pytest.raises(ValueError, match='n_objects: expected an int in \\[3, 6\\]'): make_scene('clevr_like', 0, n_objects=2)
    with pytest.raises(TypeError, match='n_objects: expected an int'): make_scene('clevr_like', 0, n_objects=3.0)
    with pytest.raises(ValueError, match='min_area: expected an int ≥ 1'): make_scene('textured', 0, min_area=0)
    with pytest.raises(TypeError, match='colour: not an option'): make_scene('textured', 0, colour='red')


def test_dataset_and_loader_bad_input():
    with pytest.raises(ValueError, match='split: expected one of'): BenchmarkDataset('textured', 'dev')
    with pytest.raises(ValueError, match='n: expected an int in \\[1'): BenchmarkDataset('textured', n=-1)
    with pytest.raises(ValueError, match='size: expected an int'): BenchmarkDataset('clevr_like', image_size=10_000)
    with pytest.raises(TypeError, match='frames: not an option'): BenchmarkDataset('textured', frames=3)
    ds = BenchmarkDataset('textured', n=2)
    with pytest.raises(IndexError, match='index: 2 out of range'): ds[2]
    with pytest.raises(TypeError, match='index: expected an int'): ds[0.5]
    with pytest.raises(TypeError, match='dataset: expected a map-style dataset'): make_loader(3, 2)
    with pytest.raises(ValueError, match='batch_size: expected an int ≥ 1'): make_loader(ds, -1)
    with pytest.raises(ValueError, match='num_workers: expected an int ≥ 0'): make_loader(ds, 1, num_workers=-2)


def test_id_png_bad_input(tmp_path):
    with pytest.raises(ValueError, match='ids: expected values in'): data.id_to_rgb(np.array([[256**3]]))
    with pytest.raises(TypeError, match='ids: expected an integer array'): data.save_id_png(tmp_path / 'a.png', np.zeros((2, 2)))
    with pytest.raises(ValueError, match='ids: expected shape \\[H,W\\]'): data.save_id_png(tmp_path / 'a.png', np.zeros((1, 2, 2), int))
    with pytest.raises(TypeError, match='ids: expected a torch.Tensor or numpy array'): data.save_id_png(tmp_path / 'a.png', [[1]])
    with pytest.raises(TypeError, match='rgb: expected uint8'): data.rgb_to_id(np.zeros((2, 2, 3), np.int32))
    with pytest.raises(ValueError, match='rgb: expected shape'): data.rgb_to_id(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match='no such file'): data.load_id_png(tmp_path / 'missing.png')
    Image.fromarray(np.zeros((2, 2), np.uint8)).convert('P').save(tmp_path / 'p.png')
    with pytest.raises(ValueError, match='mode P'): data.load_id_png(tmp_path / 'p.png')
    (tmp_path / 'broken.png').write_bytes(b'not a png')
    with pytest.raises(ValueError, match='cannot read'): data.load_image(tmp_path / 'broken.png')


def test_list_images_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'): data.list_images(tmp_path / 'nowhere')
    with pytest.raises(ValueError, match=r'holds no images \(.png'): data.list_images(tmp_path)
    (tmp_path / 'x.png').write_bytes(b'')
    with pytest.raises(ValueError, match='expected a directory'): data.list_images(tmp_path / 'x.png')


def _item(**change):
    it = dict(make_scene('multi_dsprites', 0)); it.update(change); return it


@pytest.mark.parametrize('item, exc, needle', [
    (_item(image=torch.full((3, 64, 64), float('nan'))), ValueError, 'finite and in [0,1]'),
    (_item(image=torch.full((3, 64, 64), 2.0)), ValueError, 'finite and in [0,1]'),
    (_item(image=torch.zeros(3, 64, 64, dtype=torch.uint8)), TypeError, 'expected floats'),
    (_item(image=torch.zeros(64, 64)), ValueError, "['image']: expected shape [3,H,W]"),
    (_item(instances=-torch.ones(64, 64, dtype=torch.long)), ValueError, 'ids must be ≥ 0'),
    (_item(instances=torch.zeros(32, 32, dtype=torch.long)), ValueError, 'to match the image'),
    (_item(classes=torch.zeros(64, 64)), TypeError, "['classes']: expected integers"),
    (_item(classes=torch.full((64, 64), 9)), ValueError, 'instance 1 has class 9, expected 1..4'),
    (_item(classes=torch.where(make_scene('multi_dsprites', 0)['instances'] == 1, torch.arange(64)[:, None] % 2 + 1, 0)),
     ValueError, 'instance 1 has several classes [1, 2]'),
    (_item(classes=torch.ones(64, 64, dtype=torch.long)), ValueError, 'background pixels (instance 0) must have class 0'),
    ({'image': torch.zeros(3, 4, 4)}, ValueError, "missing key 'instances'"),
    ([1, 2], TypeError, 'expected a dict'),
])
def test_write_coco_bad_items(tmp_path, item, exc, needle):
    with pytest.raises(exc) as e: write_coco_panoptic([item], tmp_path / 'o', variant='multi_dsprites')
    assert needle in str(e.value) and 'items[0]' in str(e.value)


def test_write_coco_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='variant: expected one of'): write_coco_panoptic([_item()], tmp_path / 'o')
    with pytest.raises(ValueError, match='items: nothing to write'): write_coco_panoptic([], tmp_path / 'e', variant='textured')
    with pytest.raises(ValueError, match="\\['image'\\]: expected shape \\[T,3,H,W\\]"):
        write_coco_panoptic([_item()], tmp_path / 'm', variant='moving')


def test_read_coco_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such directory'): read_coco_panoptic(tmp_path / 'none')
    with pytest.raises(FileNotFoundError, match='panoptic.json'): read_coco_panoptic(tmp_path)
    (tmp_path / 'panoptic.json').write_text('{broken')
    with pytest.raises(ValueError, match='not valid JSON'): read_coco_panoptic(tmp_path)
    (tmp_path / 'panoptic.json').write_text('{"images": []}')
    with pytest.raises(ValueError, match="no 'annotations' list"): read_coco_panoptic(tmp_path)
    d = tmp_path / 'ds'
    write_coco_panoptic(BenchmarkDataset('multi_dsprites', n=1), d)
    meta = json.loads((d / 'panoptic.json').read_text())
    segs = meta['annotations'][0]['segments_info']
    dropped = segs.pop(0)
    (d / 'panoptic.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='missing from segments_info'): read_coco_panoptic(d)
    segs.insert(0, dict(dropped, category_id=999))
    (d / 'panoptic.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='unknown category 999'): read_coco_panoptic(d)
    segs[0]['category_id'] = dropped['category_id']
    (d / 'panoptic.json').write_text(json.dumps(meta))
    (d / 'images' / meta['images'][0]['file_name']).unlink()
    with pytest.raises(FileNotFoundError, match='no such file'): read_coco_panoptic(d)


# ----------------------------------------------------------------------------------------------------------------
# benchmark entry point

def test_bench_quick_is_json():
    res = data.bench(quick=True)
    json.dumps(res)
    assert set(res['generators']) == set(data.VARIANTS)
    for r in res['generators'].values(): assert r['seconds'] > 0 and r['ratio_to_goal'] > 0
    assert res['coco']['items'] == 10
