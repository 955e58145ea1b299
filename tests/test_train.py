"""Training end to end: the sd_train CLI, a real kill and resume, a 2-process Accelerate run, bad configs and checkpoints."""
import json, os, pathlib, signal, subprocess, sys, time
import pytest
import torch
from safetensors.torch import load_file

BIN = pathlib.Path(sys.executable).parent
TINY = ['slots.num_slots=4', 'slots.dim=32', 'decoder.hidden=32', 'decoder.layers=1', 'data.variant=multi_dsprites',
        'data.n_train=16', 'data.n_val=4', 'optim.batch_size=4', 'optim.warmup=2', 'log.tensorboard=false', 'log.progress=false']


def sd(*args, check=True, **kw):
    p = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=900, **kw)
    if check and p.returncode: raise AssertionError(f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def weights(run):
    from spectraldiffusion.train import find_checkpoint
    return load_file(find_checkpoint(run) / 'model.safetensors')


def test_train_cli_then_segment_and_evaluate(tmp_path):
    run = tmp_path / 'run'
    sd('sd_train', '--config', 'demo', '--out', run, *TINY, 'optim.steps=6', 'log.checkpoint_every=3', 'log.tensorboard=true')
    res = json.loads((run / 'train_result.json').read_text())
    assert res['step'] == 6 and all(map(lambda v: v == v, res['train'].values()))  # finite, not NaN
    assert list((run / 'tensorboard').glob('events.*'))
    sd('sd_data', '--variant', 'multi_dsprites', '--n', 2, '--seed', 5, '--out', tmp_path / 'ds')
    sd('sd_segment', '--method', 'checkpoint', '--checkpoint', run, '--input', tmp_path / 'ds' / 'images', '--out', tmp_path / 'seg')
    assert len(list((tmp_path / 'seg').glob('*.png'))) == 2
    sd('sd_evaluate', '--out', tmp_path / 'ev', '--checkpoint', f'tiny={run}', '--methods', 'one_segment', '--n', 3)
    m = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
    assert set(m['multi_dsprites']) == {'one_segment', 'tiny'}


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    """SIGKILL a run after its first checkpoint, resume it, and compare with a run that was never interrupted."""
    args = [*TINY, 'optim.steps=12', 'log.checkpoint_every=2']
    sd('sd_train', '--config', 'demo', '--out', tmp_path / 'full', *args)
    p = subprocess.Popen([str(BIN / 'sd_train'), '--config', 'demo', '--out', str(tmp_path / 'killed'), *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ptr = tmp_path / 'killed' / 'checkpoint.json'
    t0 = time.time()
    while not ptr.exists() and p.poll() is None and time.time() - t0 < 600: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    killed_at = json.loads(ptr.read_text())['step']
    assert not (tmp_path / 'killed' / 'train_result.json').exists() or killed_at == 12
    out = sd('sd_train', '--config', 'demo', '--out', tmp_path / 'killed', *args)
    a, b = weights(tmp_path / 'full'), weights(tmp_path / 'killed')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / 'full' / 'train_result.json').read_text())
    rb = json.loads((tmp_path / 'killed' / 'train_result.json').read_text())
    assert ra['val/fg_ari'] == rb['val/fg_ari'] and ra['train'] == rb['train']


def test_two_process_accelerate_run(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([str(BIN / 'accelerate'), 'launch', '--cpu', '--num_processes', '2', '--num_machines', '1',
                        '--mixed_precision', 'no', '--dynamo_backend', 'no', '-m', 'spectraldiffusion.train',
                        '--config', 'demo', '--out', str(tmp_path / 'ddp'), *TINY, 'optim.steps=4', 'log.checkpoint_every=4'],
                       capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = sorted((tmp_path / 'ddp' / 'checkpoints').glob('step_*'))
    assert [c.name for c in ck] == ['step_00000004']
    res = json.loads((tmp_path / 'ddp' / 'train_result.json').read_text())
    assert res['step'] == 4 and all(v == v and abs(v) < float('inf') for v in res['train'].values())


def test_unknown_config_key_and_bad_value(tmp_path):
    p = sd('sd_train', '--config', 'demo', '--out', tmp_path, 'slots.num_slot=3', check=False)
    assert p.returncode != 0 and 'slots.num_slot' in p.stderr
    p = sd('sd_train', '--config', 'demo', '--out', tmp_path, 'optim.lr=fast', check=False)
    assert p.returncode != 0 and 'optim.lr' in p.stderr
    p = sd('sd_train', '--config', 'nope', '--out', tmp_path, check=False)
    assert p.returncode != 0 and 'nope' in p.stderr


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run = tmp_path / 'run'
    sd('sd_train', '--config', 'demo', '--out', run, *TINY, 'optim.steps=2')
    from spectraldiffusion.train import find_checkpoint, load_model
    (find_checkpoint(run) / 'model.safetensors').write_bytes(b'\x00' * 64)
    with pytest.raises(ValueError, match='corrupt'): load_model(run)
    (run / 'checkpoint.json').write_text('{not json')
    with pytest.raises(ValueError, match='corrupt'): load_model(run)


def test_train_on_a_dataset_folder_then_evaluate_there(tmp_path):
    """sd_train reads an sd_data export (any open_dataset format) with data.root; sd_evaluate scores the run there."""
    sd('sd_data', '--variant', 'clevr_like', '--split', 'train', '--n', 10, '--out', tmp_path / 'tr')
    sd('sd_data', '--variant', 'clevr_like', '--split', 'val', '--n', 3, '--out', tmp_path / 'va')
    run = tmp_path / 'run'
    sd('sd_train', '--config', 'demo', '--out', run, *[t for t in TINY if not t.startswith('data.')], 'optim.steps=3',
       f'data.root={tmp_path / "tr"}', f'data.val_root={tmp_path / "va"}', 'data.image_size=48', 'data.n_val=3')
    res = json.loads((run / 'train_result.json').read_text())
    assert res['step'] == 3 and 0 <= res['val/fg_ari'] <= 1
    p = sd('sd_evaluate', '--out', tmp_path / 'ev0', '--checkpoint', run, '--methods', 'one_segment', check=False)
    assert p.returncode != 0 and 'pass --data' in p.stderr
    sd('sd_evaluate', '--out', tmp_path / 'ev', '--checkpoint', f'tiny={run}', '--data', tmp_path / 'va', '--methods', 'one_segment', '--n', 3)
    m = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
    assert set(m['va']) == {'one_segment', 'tiny'} and 0 <= m['va']['tiny']['fg_ari'] <= 1


def test_cityscapes_preset_reads_a_cityscapes_folder(tmp_path):
    "The cityscapes preset with data.root: train split for training, val split for validation, resized and cropped."
    from test_readers import cityscapes_tree
    from spectraldiffusion.model import load_config
    from spectraldiffusion.train import training_data
    cityscapes_tree(tmp_path, 'train'); cityscapes_tree(tmp_path, 'val')
    cfg = load_config('cityscapes', [f'data.root={tmp_path}', 'data.image_size=16', 'data.n_val=3'])
    tr, va = training_data(cfg)
    assert (len(tr), len(va)) == (4, 3)
    assert tr[0]['image'].shape == (3, 16, 16) and va[2]['instances'].shape == (16, 16)
    assert va[0]['name'].startswith('aachen/') and tr[3]['name'].startswith('zurich/')


def test_train_on_unlabelled_images(tmp_path):
    "A plain folder of images trains (the first n_val held out, no mask metrics); sd_evaluate refuses to score on it."
    sd('sd_data', '--variant', 'multi_dsprites', '--split', 'train', '--n', 10, '--out', tmp_path / 'tr')
    run = tmp_path / 'run'
    sd('sd_train', '--config', 'demo', '--out', run, *[t for t in TINY if not t.startswith('data.')], 'optim.steps=2',
       f'data.root={tmp_path / "tr" / "images"}', 'data.n_val=2')
    res = json.loads((run / 'train_result.json').read_text())
    assert res['step'] == 2 and not any(k.startswith('val/') for k in res)
    p = sd('sd_evaluate', '--out', tmp_path / 'ev', '--checkpoint', run, '--data', tmp_path / 'tr' / 'images', check=False)
    assert p.returncode != 0 and 'no instance masks' in p.stderr


def test_mamba_slots_train_in_bf16(tmp_path):
    "optim.mixed_precision=bf16 (the GPU presets' setting; Accelerate autocasts on the CPU too) with Mamba slot attention."
    sd('sd_train', '--config', 'demo', '--out', tmp_path / 'run', *TINY, 'slots.variant=mamba', 'optim.mixed_precision=bf16', 'optim.steps=3')
    res = json.loads((tmp_path / 'run' / 'train_result.json').read_text())
    assert res['step'] == 3 and all(v == v for v in res['train'].values()) and 0 <= res['val/fg_ari'] <= 1


def test_resume_with_another_configuration_is_refused(tmp_path):
    sd('sd_train', '--config', 'demo', '--out', tmp_path, *TINY, 'optim.steps=2')
    p = sd('sd_train', '--config', 'demo', '--out', tmp_path, *TINY, 'optim.steps=3', 'slots.dim=48', check=False)
    assert p.returncode == 2 and 'slots.dim: 32 → 48' in p.stderr and '--no-resume' in p.stderr and 'Traceback' not in p.stderr
    sd('sd_train', '--config', 'demo', '--out', tmp_path, *TINY, 'optim.steps=3')          # same settings, longer: resumes
    assert json.loads((tmp_path / 'train_result.json').read_text())['step'] == 3
