"""Real-dataset readers of `spectraldiffusion.data`: fixtures written here in each exact on-disk format with PIL,
json, protobuf and tensorboard's TFRecord code (not with the readers' own writers), read back, compared exactly."""
import gzip, json, os
import numpy as np
import pytest
import torch
from PIL import Image

from spectraldiffusion import data
from spectraldiffusion.data import (IGNORE_INDEX, BenchmarkDataset, BytesFeature, CenterCrop, CityscapesPanoptic,
                                    CocoPanoptic, Compose, Crop, MultiObjectTFRecord, RandomCrop, Resize, VideoFolder,
                                    crc32c, decode_example, encode_example, iter_tfrecord, masked_crc32c, open_dataset,
                                    resize_labels, tfrecord_offsets, write_coco_panoptic, write_tfrecord)


def save_rgb(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def pil_rgb(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert('RGB')).transpose(2, 0, 1).astype(np.float32) / 255)


# ----------------------------------------------------------------------------------------------------------------
# transforms

@pytest.mark.parametrize('hw', [(5, 7, 3, 11), (64, 48, 17, 100), (30, 30, 45, 20), (9, 9, 9, 9)])
def test_resize_labels_is_torch_nearest_exact(hw):
    H, W, h, w = hw
    x = torch.randint(0, 10**6, (2, H, W), generator=torch.Generator().manual_seed(H))
    ref = torch.nn.functional.interpolate(x[:, None].double(), size=(h, w), mode='nearest-exact')[:, 0].long()
    assert torch.equal(resize_labels(x, (h, w)), ref)


def test_item_transforms_keep_labels_exact():
    sc = data.make_scene('clevr_like', 4)                                       # 128×128
    up = Resize((256, 384))(sc)
    assert set(up['instances'].unique().tolist()) == set(sc['instances'].unique().tolist())
    assert torch.equal(Resize((128, 128))(up)['instances'], sc['instances'])   # exact back (integer factors)
    assert Resize(64)(dict(sc, image=sc['image'][:, :, :96], instances=sc['instances'][:, :96],
                           classes=sc['classes'][:, :96]))['image'].shape == (3, 85, 64)   # shorter side 96 → 64
    c = Compose(Crop(10, 20, 50, 60), CenterCrop((30, 40)))(sc)
    assert torch.equal(c['classes'], sc['classes'][20:50, 30:70])
    a = RandomCrop(32, seed=3)(dict(sc, index=7)); b = RandomCrop(32, seed=3)(dict(sc, index=7))
    assert torch.equal(a['instances'], b['instances'])
    outs = {RandomCrop(32, seed=3)(dict(sc, index=i))['image'].sum().item() for i in range(8)}
    assert len(outs) > 1                                                       # different items, different windows
    with pytest.raises(ValueError, match='does not fit'): Crop(100, 0, 50, 50)(sc)
    with pytest.raises(ValueError, match='size: expected a positive int'): Resize((0, 3))
    with pytest.raises(TypeError, match="item: expected a dict"): Resize(3)(torch.zeros(3, 4, 4))


# ----------------------------------------------------------------------------------------------------------------
# Cityscapes

def cityscapes_tree(root, split='val'):
    "Two images per city in the exact gtFine layout; label maps built with numpy from a fixed pattern."
    rng = np.random.default_rng(0)
    out = {}
    for city in ('aachen', 'zurich'):
        for j in range(2):
            stem = f"{city}_{j:06d}_{19 + j:06d}"
            H, W = 24, 40
            label = rng.choice(np.arange(0, 34), (H // 4, W // 4)).repeat(4, 0).repeat(4, 1)   # every label id
            raw = label.astype(np.int64).copy()
            k = 0
            for cid in (24, 26, 26, 29, 33):                                   # objects incl. caravan (29)
                y, x = rng.integers(0, H - 6), rng.integers(0, W - 6)
                label[y:y + 6, x:x + 6] = cid; k += 1; raw[y:y + 6, x:x + 6] = cid * 1000 + k
            y, x = 0, 0
            label[y:3, x:5] = 26; raw[y:3, x:5] = 26                          # a car group: no instance id
            img = rng.integers(0, 256, (H, W, 3))
            save_rgb(root / 'leftImg8bit' / split / city / f"{stem}_leftImg8bit.png", img)
            (root / 'gtFine' / split / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(label.astype(np.uint8)).save(root / 'gtFine' / split / city / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(raw.astype(np.uint16)).save(root / 'gtFine' / split / city / f"{stem}_gtFine_instanceIds.png")
            out[f"{city}/{stem}"] = (img, label, raw)
    return out


def expected_cityscapes(label, raw, n):
    "Independent class mapping from torchvision's copy of the cityscapesScripts table."
    from torchvision.datasets import Cityscapes
    lut = np.full(256, IGNORE_INDEX)
    for c in Cityscapes.classes:
        if c.id < 0: continue
        if n == 27 and c.id >= 7: lut[c.id] = c.id - 7
        if n == 19 and not c.ignore_in_eval: lut[c.id] = c.train_id
        if n == 7 and not c.ignore_in_eval: lut[c.id] = c.category_id - 1
    cls = lut[label]
    keep = (raw >= 1000) & (cls != IGNORE_INDEX)
    vals = sorted(set(raw[keep].tolist()))
    inst = np.zeros_like(raw)
    for r, v in enumerate(vals): inst[raw == v] = r + 1
    return cls, inst


@pytest.mark.parametrize('n', [27, 19, 7])
def test_cityscapes_round_trip(tmp_path, n):
    truth = cityscapes_tree(tmp_path)
    ds = CityscapesPanoptic(tmp_path, 'val', classes=n)
    assert len(ds) == 4 and ds.n_classes == n
    for i in range(len(ds)):
        it = ds[i]
        img, label, raw = truth[it['name']]
        cls, inst = expected_cityscapes(label, raw, n)
        assert torch.equal(it['image'], torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255))
        assert np.array_equal(it['classes'].numpy(), cls)
        assert np.array_equal(it['instances'].numpy(), inst)
        assert it['instances'].dtype == it['classes'].dtype == torch.long and it['index'] == i
    things = {27: set(range(17, 27)), 19: set(range(11, 19)), 7: {5, 6}}[n]
    assert set(ds.things) == things and set(ds.stuffs) == set(range(n)) - things


def test_cityscapes_missing_paths(tmp_path):
    cityscapes_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nowhere')): CityscapesPanoptic(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match='gtFine/train'):
        (tmp_path / 'leftImg8bit' / 'train').mkdir(); CityscapesPanoptic(tmp_path, 'train')
    ds = CityscapesPanoptic(tmp_path, 'val')
    os.remove(ds.gt_paths(2)[0])
    with pytest.raises(FileNotFoundError, match='_gtFine_labelIds.png'): ds[2]
    with pytest.raises(ValueError, match='expected 27, 19 or 7'): CityscapesPanoptic(tmp_path, 'val', classes=8)


# ----------------------------------------------------------------------------------------------------------------
# COCO panoptic

def coco_tree(root):
    "Official layout: annotations/panoptic_val2017.json + PNGs (id = R + 256 G + 256² B), JPEG images."
    rng = np.random.default_rng(1)
    cats = [dict(id=1, name='person', isthing=1, supercategory='person'), dict(id=18, name='dog', isthing=1, supercategory='animal'),
            dict(id=149, name='road', isthing=0, supercategory='ground'), dict(id=200, name='rug', isthing=0, supercategory='floor')]
    images, anns, truth = [], [], {}
    for j, (H, W) in enumerate([(20, 30), (33, 17)]):
        pan = np.where(np.arange(H)[:, None] < H // 2, 5_000_000 + j, 123_456) * np.ones((1, W), np.int64)
        segs = [dict(id=5_000_000 + j, category_id=149, iscrowd=0), dict(id=123_456, category_id=200, iscrowd=0)]
        for k, (cat, crowd) in enumerate([(1, 0), (18, 0), (1, 1), (18, 0)]):
            sid = int(rng.integers(1, 256**3 - 1)); y, x = rng.integers(0, H - 5), rng.integers(0, W - 5)
            pan[y:y + 5, x:x + 5] = sid; segs.append(dict(id=sid, category_id=cat, iscrowd=crowd))
        pan[-1, :] = 0                                                          # unlabelled row
        segs = [s for s in segs if (pan == s['id']).any()]
        for s in segs: s['area'] = int((pan == s['id']).sum())
        rgb = np.stack([pan % 256, (pan >> 8) % 256, pan >> 16], -1)
        save_rgb(root / 'annotations' / 'panoptic_val2017' / f"{j:012d}.png", rgb)
        save_rgb(root / 'val2017' / f"{j:012d}.jpg", rng.integers(0, 256, (H, W, 3)))
        images.append(dict(id=100 + j, file_name=f"{j:012d}.jpg", height=H, width=W))
        anns.append(dict(image_id=100 + j, file_name=f"{j:012d}.png", segments_info=segs))
        truth[j] = (pan, segs)
    (root / 'annotations' / 'panoptic_val2017.json').write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return truth


def test_coco_official_layout_round_trip(tmp_path):
    truth = coco_tree(tmp_path)
    for split in ('val2017', 'val', None):
        ds = CocoPanoptic(tmp_path, split)
        assert len(ds) == 2 and ds.things == (1, 18) and ds.stuffs == (149, 200)
    for j, (pan, segs) in truth.items():
        it = ds[j]
        assert torch.equal(it['image'], pil_rgb(tmp_path / 'val2017' / f"{j:012d}.jpg"))
        cat = {s['id']: s['category_id'] for s in segs}
        exp_cls = np.array([[cat.get(v, IGNORE_INDEX) for v in row] for row in pan.tolist()])
        order = sorted(s['id'] for s in segs if s['category_id'] in (1, 18) and not s['iscrowd'])
        exp_inst = np.array([[order.index(v) + 1 if v in order else 0 for v in row] for row in pan.tolist()])
        assert np.array_equal(it['classes'].numpy(), exp_cls)
        assert np.array_equal(it['instances'].numpy(), exp_inst)
        crowd = [s['id'] for s in segs if s['iscrowd']]
        assert (it['instances'].numpy()[np.isin(pan, crowd)] == 0).all()
    t = CocoPanoptic(tmp_path, transform=Resize((10, 10)))[1]
    assert t['image'].shape == (3, 10, 10) and torch.equal(t['classes'], resize_labels(ds[1]['classes'], 10))


def test_coco_sd_data_export_gives_benchmark_items(tmp_path):
    ds = BenchmarkDataset('clevr_like', 'test', n=3, image_size=48)
    write_coco_panoptic(ds, tmp_path)
    back = CocoPanoptic(tmp_path)
    assert back.builtin and back.stuffs == (0,) and back.things == (1, 2, 3)
    for i in range(3):
        for k in ('image', 'instances', 'classes'): assert torch.equal(back[i][k], ds[i][k]), (i, k)


def test_coco_errors_name_the_path(tmp_path):
    coco_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match='panoptic_train2017.json'): CocoPanoptic(tmp_path, 'train2017')
    ds = CocoPanoptic(tmp_path, 'val2017')
    os.remove(tmp_path / 'annotations' / 'panoptic_val2017' / '000000000001.png')
    with pytest.raises(FileNotFoundError, match='000000000001.png'): ds[1]
    meta = json.loads((tmp_path / 'annotations' / 'panoptic_val2017.json').read_text())
    meta['annotations'][0]['segments_info'] = meta['annotations'][0]['segments_info'][1:]
    (tmp_path / 'annotations' / 'panoptic_val2017.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='missing from segments_info'): CocoPanoptic(tmp_path, 'val2017')[0]


# ----------------------------------------------------------------------------------------------------------------
# TFRecord framing and tf.train.Example (checked against tensorboard's TFRecord code and protobuf itself)

def test_crc32c_matches_tensorboard_and_rfc3720():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as tb_crc, masked_crc32c as tb_masked
    assert crc32c(bytes(32)) == 0x8A9136AA and crc32c(b'\xff' * 32) == 0x62A8AB43
    rng = np.random.default_rng(2)
    for n in (0, 1, 7, 4095, 4096, 4097, 20_000, 65_536 + 3):
        d = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(d) == tb_crc(d), n
        assert masked_crc32c(d) == tb_masked(d), n


def test_tfrecord_framing_against_tensorboard(tmp_path):
    from tensorboard.summary.writer.record_writer import RecordWriter
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
    from tensorboard.compat.tensorflow_stub import errors
    recs = [b'', b'x', os.urandom(5000), os.urandom(70_000)]
    for comp in ('raw', 'gzip'):                                              # tensorboard writes, we read
        p = tmp_path / f"tb_{comp}.tfrecord"
        w = RecordWriter(gzip.open(p, 'wb') if comp == 'gzip' else open(p, 'wb'))
        for r in recs: w.write(r)
        w.close()
        assert list(iter_tfrecord(p)) == recs
        assert len(tfrecord_offsets(p)) == 4
    p = write_tfrecord(tmp_path / 'ours.tfrecord', recs)                      # we write, tensorboard reads
    reader, got = PyRecordReader_New(str(p)), []
    while True:
        try: reader.GetNext()
        except errors.OutOfRangeError: break
        got.append(reader.record())
    assert got == recs
    raw = bytearray(p.read_bytes()); raw[-10] ^= 0xFF
    (tmp_path / 'bad.tfrecord').write_bytes(bytes(raw))
    with pytest.raises(ValueError, match='checksum mismatch'): list(iter_tfrecord(tmp_path / 'bad.tfrecord'))
    assert len(list(iter_tfrecord(tmp_path / 'bad.tfrecord', verify=False))) == 4
    with pytest.raises(FileNotFoundError, match='absent.tfrecord'): list(iter_tfrecord(tmp_path / 'absent.tfrecord'))


@pytest.fixture(scope='module')
def Example():
    "tf.train.Example built from its .proto definition with protobuf's descriptor API (no TensorFlow)."
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name='example_test.proto', package='tftest', syntax='proto3')
    def msg(name, fields):
        m = fdp.message_type.add(name=name)
        for fname, num, typ, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=typ, label=label)
            if tname: f.type_name = tname
        return m
    R, O = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    msg('BytesList', [('value', 1, F.TYPE_BYTES, R, None)])
    msg('FloatList', [('value', 1, F.TYPE_FLOAT, R, None)])
    msg('Int64List', [('value', 1, F.TYPE_INT64, R, None)])
    feat = msg('Feature', [('bytes_list', 1, F.TYPE_MESSAGE, O, '.tftest.BytesList'), ('float_list', 2, F.TYPE_MESSAGE, O, '.tftest.FloatList'),
                           ('int64_list', 3, F.TYPE_MESSAGE, O, '.tftest.Int64List')])
    feat.oneof_decl.add(name='kind')
    for f in feat.field: f.oneof_index = 0
    fs = msg('Features', [('feature', 1, F.TYPE_MESSAGE, R, '.tftest.Features.FeatureEntry')])
    e = fs.nested_type.add(name='FeatureEntry'); e.options.map_entry = True
    e.field.add(name='key', number=1, type=F.TYPE_STRING, label=O)
    e.field.add(name='value', number=2, type=F.TYPE_MESSAGE, label=O, type_name='.tftest.Feature')
    msg('Example', [('features', 1, F.TYPE_MESSAGE, O, '.tftest.Features')])
    pool = descriptor_pool.DescriptorPool(); pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName('tftest.Example'))


def test_decode_example_matches_protobuf(Example):
    ex = Example()
    f = ex.features.feature
    f['px'].bytes_list.value.extend([bytes([v % 256]) for v in range(1000)])
    f['s'].bytes_list.value.extend([b'abc', b'', b'z' * 300])
    f['f'].float_list.value.extend([0.5, -1e30, 3.25, float('inf')])
    f['i'].int64_list.value.extend([0, 1, 127, 128, 2**40, -5, -2**63, 2**63 - 1])
    f['empty'].SetInParent()
    d = decode_example(ex.SerializeToString())
    assert np.array_equal(d['px'].decode_raw()[:, 0], np.arange(1000) % 256)
    assert d['s'].tolist() == [b'abc', b'', b'z' * 300]
    assert np.array_equal(d['f'], np.array([0.5, -1e30, 3.25, np.inf], np.float32))
    assert d['i'].tolist() == [0, 1, 127, 128, 2**40, -5, -2**63, 2**63 - 1]
    assert len(d['empty']) == 0
    back = Example(); back.ParseFromString(encode_example(dict(px=BytesFeature.from_array(np.arange(10)), s=[b'abc', b''],
                                                               f=np.array([0.25, -2.0]), i=[-5, 2**40])))
    bf = back.features.feature
    assert list(bf['px'].bytes_list.value) == [bytes([v]) for v in range(10)]
    assert list(bf['s'].bytes_list.value) == [b'abc', b''] and list(bf['f'].float_list.value) == [0.25, -2.0]
    assert list(bf['i'].int64_list.value) == [-5, 2**40]


def test_decode_example_hand_built_bytes():
    # Example{features{feature{key:"k" value{int64_list{value:[2, 150]}}}}} written from the wire-format rules;
    # the int64 list is unpacked (key 0x08 per value), which parsers must accept as well.
    feature = bytes([0x1A, 0x05, 0x08, 0x02, 0x08, 0x96, 0x01])              # Feature.int64_list = {2, 150}
    entry = bytes([0x0A, 0x01]) + b'k' + bytes([0x12, len(feature)]) + feature
    example = bytes([0x0A, len(entry) + 2, 0x0A, len(entry)]) + entry
    assert decode_example(example)['k'].tolist() == [2, 150]
    with pytest.raises(ValueError, match='truncated'): decode_example(example[:-1] + bytes([0x96]))


CLEVR_SHAPE = (240, 320)


def clevr_example(Example, rng, n_obj):
    "One record in the exact clevr_with_masks layout: 1-byte strings, mask [11,240,320,1], shape as bytes."
    H, W = CLEVR_SHAPE
    owner = np.zeros((H, W), np.int64)
    for e in range(1, n_obj + 1):
        y, x = rng.integers(0, H - 40), rng.integers(0, W - 40)
        owner[y:y + 40, x:x + 40] = e
    mask = np.stack([(owner == e) * 255 for e in range(11)]).astype(np.uint8)[..., None]   # [11,H,W,1]
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    shape = np.zeros(11, np.uint8); shape[1:n_obj + 1] = rng.integers(1, 4, n_obj)
    ex = Example(); f = ex.features.feature
    f['image'].bytes_list.value.extend([bytes([v]) for v in img.reshape(-1).tolist()])
    f['mask'].bytes_list.value.extend([bytes([v]) for v in mask.reshape(-1).tolist()])
    f['shape'].bytes_list.value.extend([bytes([v]) for v in shape.tolist()])
    f['visibility'].float_list.value.extend((np.arange(11) <= n_obj).astype(float).tolist())
    f['x'].float_list.value.extend(rng.random(11).tolist())
    return ex.SerializeToString(), img, owner, shape


def test_clevr_with_masks_tfrecord(tmp_path, Example):
    rng = np.random.default_rng(3)
    recs = [clevr_example(Example, rng, n) for n in (3, 6)]
    p = write_tfrecord(tmp_path / 'clevr_with_masks_train.tfrecords', [r[0] for r in recs], compression='gzip')
    ds = MultiObjectTFRecord(p)
    assert ds.dataset == 'clevr_with_masks' and len(ds) == 2
    for i in (1, 0):
        _, img, owner, shape = recs[i]
        it = ds[i]
        assert torch.equal(it['image'], torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255))
        assert np.array_equal(it['instances'].numpy(), owner)                 # entity e ≥ 1 → object e
        assert np.array_equal(it['classes'].numpy(), np.where(owner > 0, 1 + shape[owner].astype(np.int64), 0))
    assert np.array_equal(ds.example(1)['visibility'], (np.arange(11) <= 6).astype(np.float32))
    item = MultiObjectTFRecord(p, transform=Compose(Crop(29, 64, 192, 192), Resize(128)))[0]   # the usual CLEVR crop
    assert item['image'].shape == (3, 128, 128)


@pytest.mark.parametrize('variant,E,C,layout', [('multi_dsprites_colored_on_grayscale', 6, 3, 'hwe'),
                                                ('multi_dsprites_binarized', 4, 1, 'hwe'),
                                                ('objects_room_train', 7, 3, 'ehw'), ('tetrominoes', 4, 3, 'ehw')])
def test_small_multi_object_layouts(tmp_path, Example, variant, E, C, layout):
    H, W = (35, 35) if variant == 'tetrominoes' else (64, 64)
    nb = 4 if variant.startswith('objects_room') else 1
    rng = np.random.default_rng(E)
    owner = rng.integers(0, E, (H // 5 + 1, W // 5 + 1)).repeat(5, 0).repeat(5, 1)[:H, :W]
    masks = np.stack([(owner == e) * 255 for e in range(E)]).astype(np.uint8)         # [E,H,W]
    stored = masks.transpose(1, 2, 0) if layout == 'hwe' else masks
    img = rng.integers(0, 256, (H, W, C), dtype=np.uint8)
    ex = Example(); f = ex.features.feature
    f['image'].bytes_list.value.extend([bytes([v]) for v in img.reshape(-1).tolist()])
    f['mask'].bytes_list.value.extend([bytes([v]) for v in stored.reshape(-1).tolist()])
    shape = rng.integers(0, 4, E).astype(float)
    if not variant.startswith('objects_room'): f['shape'].float_list.value.extend(shape.tolist())
    p = write_tfrecord(tmp_path / f"{variant}.tfrecords", [ex.SerializeToString()])
    ds = MultiObjectTFRecord(p); it = ds[0]
    assert ds.stuffs == (0,) and ds.things == ((1,) if variant.startswith('objects_room') else None)
    assert np.array_equal(it['instances'].numpy(), np.where(owner >= nb, owner - nb + 1, 0))
    cls = np.where(owner >= nb, 1 + (shape[owner].astype(np.int64) if not variant.startswith('objects_room') else 0), 0)
    assert np.array_equal(it['classes'].numpy(), cls)
    exp_img = np.repeat(img, 3, -1) if C == 1 else img
    assert torch.equal(it['image'], torch.from_numpy(exp_img.transpose(2, 0, 1).astype(np.float32) / 255))
    family = variant.split('_colored')[0].split('_binarized')[0].split('_train')[0]
    assert torch.equal(MultiObjectTFRecord(p, dataset=family)[0]['instances'], it['instances'])
    wrong = {'multi_dsprites_colored_on_grayscale': 'multi_dsprites_colored_on_colored', 'multi_dsprites_binarized': 'multi_dsprites_colored_on_colored',
             'objects_room_train': 'objects_room_six_objects', 'tetrominoes': 'multi_dsprites'}[variant]
    with pytest.raises(ValueError, match=r"'(mask|image)' has \d+ bytes, expected"): MultiObjectTFRecord(p, dataset=wrong)[0]


def test_multi_object_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='gone.tfrecords'): MultiObjectTFRecord(tmp_path / 'gone.tfrecords')
    p = write_tfrecord(tmp_path / 'mystery.tfrecords', [encode_example(dict(a=[1]))])
    with pytest.raises(ValueError, match='cannot tell the multi-object dataset'): MultiObjectTFRecord(p)
    with pytest.raises(ValueError, match="has no 'image' feature"): MultiObjectTFRecord(p, 'tetrominoes')[0]


# ----------------------------------------------------------------------------------------------------------------
# DAVIS-style video folders

def davis_tree(root, res='480p'):
    rng = np.random.default_rng(4)
    palette = list(rng.integers(0, 256, 768))
    truth = {}
    for seq, T in (('dog', 3), ('goat', 5)):
        truth[seq] = []
        for t in range(T):
            base = root / 'JPEGImages' / res / seq if res else root / 'JPEGImages' / seq
            ann = root / 'Annotations' / res / seq if res else root / 'Annotations' / seq
            save_rgb(base / f"{t:05d}.jpg", rng.integers(0, 256, (16, 20, 3)))
            idx = rng.integers(0, 4, (4, 5)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
            idx[0, 0] = 255                                                    # void pixel
            if not (seq == 'goat' and t == 3):
                ann.mkdir(parents=True, exist_ok=True)
                im = Image.frombytes('P', (20, 16), idx.tobytes()); im.putpalette(palette); im.save(ann / f"{t:05d}.png")
            truth[seq].append((base / f"{t:05d}.jpg", None if seq == 'goat' and t == 3 else idx))
    (root / 'ImageSets' / '2017').mkdir(parents=True)
    (root / 'ImageSets' / '2017' / 'val.txt').write_text('goat\n')
    return truth


@pytest.mark.parametrize('res', ['480p', None])
def test_video_folder_frames_and_clips(tmp_path, res):
    truth = davis_tree(tmp_path, res)
    fr = VideoFolder(tmp_path)
    assert len(fr) == 3 + 4
    for i, (seq, t) in enumerate([('dog', 0), ('dog', 1), ('dog', 2), ('goat', 0), ('goat', 1), ('goat', 2), ('goat', 4)]):
        it = fr[i]; path, idx = truth[seq][t]
        assert it['name'] == f"{seq}/{t:05d}"
        assert torch.equal(it['image'], pil_rgb(path))
        assert np.array_equal(it['instances'].numpy(), np.where(idx == 255, 0, idx))
        assert np.array_equal(it['classes'].numpy(), np.where(idx == 255, IGNORE_INDEX, idx > 0))
    assert len(VideoFolder(tmp_path, 'val')) == 4
    cl = VideoFolder(tmp_path, 'val', mode='clip', clip_len=2)
    assert len(cl) == 2 and cl[1]['image'].shape == (2, 3, 16, 20)
    assert (cl[1]['classes'][1] == IGNORE_INDEX).all() and (cl[1]['instances'][1] == 0).all()   # goat frame 3: no PNG
    whole = VideoFolder(tmp_path, mode='clip')
    assert [whole[i]['image'].shape[0] for i in range(len(whole))] == [3, 5]


def test_video_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'davis')): VideoFolder(tmp_path / 'davis')
    davis_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match='test.txt'): VideoFolder(tmp_path, 'test')
    with pytest.raises(ValueError, match="mode: expected 'frame' or 'clip'"): VideoFolder(tmp_path, mode='video')
    save_rgb(tmp_path / 'Annotations' / '480p' / 'dog' / '00001.png', np.zeros((16, 20, 3)))
    with pytest.raises(ValueError, match='expected an indexed'): VideoFolder(tmp_path)[1]


# ----------------------------------------------------------------------------------------------------------------
# open_dataset

def test_open_dataset_detects_every_layout(tmp_path):
    cityscapes_tree(tmp_path / 'cs'); coco_tree(tmp_path / 'coco'); davis_tree(tmp_path / 'davis')
    write_coco_panoptic(BenchmarkDataset('multi_dsprites', 'test', n=2), tmp_path / 'sd')
    write_tfrecord(tmp_path / 'tetrominoes_train.tfrecords', [encode_example(dict(a=[1]))])
    cases = {tmp_path / 'cs': CityscapesPanoptic, tmp_path / 'coco': CocoPanoptic, tmp_path / 'davis': VideoFolder,
             tmp_path / 'sd': CocoPanoptic, tmp_path / 'tetrominoes_train.tfrecords': MultiObjectTFRecord,
             'textured': BenchmarkDataset, f"cityscapes:{tmp_path / 'cs'}": CityscapesPanoptic}
    for spec, cls in cases.items(): assert type(open_dataset(spec)) is cls, spec
    assert open_dataset(tmp_path / 'cs', classes=7).n_classes == 7
    assert open_dataset(tmp_path / 'coco', 'val').json_path.name == 'panoptic_val2017.json'
    assert torch.equal(open_dataset(tmp_path / 'sd')[1]['instances'], BenchmarkDataset('multi_dsprites', 'test', n=2)[1]['instances'])
    (tmp_path / 'plain').mkdir()
    with pytest.raises(ValueError, match='looked for a .tfrecord'): open_dataset(tmp_path / 'plain')
    with pytest.raises(FileNotFoundError, match='not_there'): open_dataset(tmp_path / 'not_there')
    with pytest.raises(TypeError, match='path_or_spec'): open_dataset(3)
