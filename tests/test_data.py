"Longer checks of the built-in data: determinism, no leakage, labels, balance, show_batch, disk round trips, error paths"
import shutil
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image
from fastai.torch_core import set_seed
from ranger_fastai import data as D
from ranger_fastai.data import (SCENE_CODES, DIGIT_CLASSES, digit_split, digit_scenes, digit_scenes_dls, digit_images,
                                digits_dls, write_camvid, camvid_dls, write_image_folder, image_folder_dls)

TARGETS = D._digits()[1]

# ---- determinism and leakage

def test_scenes_deterministic_by_seed():
    a, b, c = digit_scenes(40, size=48, seed=5), digit_scenes(40, size=48, seed=5), digit_scenes(40, size=48, seed=6)
    for x,y in zip(a, b): np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, c.images) and not np.array_equal(a.masks, c.masks)
    assert not np.array_equal(a.images, digit_scenes(40, size=48, seed=5, split='valid').images)
    # a prefix of a longer draw is not promised, but the same call is: chunking must not change results
    big = digit_scenes(600, size=64, seed=1)
    np.testing.assert_array_equal(big.images, digit_scenes(600, size=64, seed=1).images)

def test_split_disjoint_and_stratified():
    for s in range(3):
        trn, val = digit_split(split_seed=s)
        assert len(np.intersect1d(trn, val)) == 0 and len(trn) + len(val) == 1797
        counts = np.bincount(TARGETS[val], minlength=10)
        assert np.all(np.abs(counts - 0.2*np.bincount(TARGETS)) <= 1)
    assert not np.array_equal(digit_split(split_seed=0)[1], digit_split(split_seed=1)[1])
    assert len(digit_split(0.5)[1]) > len(digit_split(0.2)[1])

def test_scenes_no_leakage_across_seeds():
    trn_pool, val_pool = digit_split()
    trn = digit_scenes(500, size=32, seed=0, split='train').sources
    val = digit_scenes(500, size=32, seed=7, split='valid').sources
    trn, val = trn[trn >= 0], val[val >= 0]
    assert set(trn) <= set(trn_pool) and set(val) <= set(val_pool)
    assert len(np.intersect1d(trn, val)) == 0
    dls = digit_scenes_dls(20, 10, size=32, bs=4, seed=3)
    assert len(np.intersect1d(dls.sources['train'][dls.sources['train'] >= 0], dls.sources['valid'])) == 0

def test_digits_dls_no_leakage():
    dls = digits_dls(bs=16, augment=False)
    trn, val = digit_split()
    assert sorted(dls.train.items) == trn.tolist() and sorted(dls.valid.items) == val.tolist()
    # the labels served are the source images' labels
    for k in (0, 5, 100):
        x, y = dls.valid_ds[k]
        i = dls.valid.items[k]
        assert int(y) == TARGETS[i] and np.array_equal(np.asarray(x), digit_images()[i])

def test_digits_dls_reproducible_with_set_seed():
    res = []
    for _ in range(2):
        set_seed(11)
        dls = digits_dls(bs=16)
        res.append(dls.one_batch())
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])

# ---- labels and balance

def test_label_range_and_consistency():
    sc = digit_scenes(300, size=48, seed=2, n_digits=(0, 5))
    assert sc.masks.dtype == np.int64 and sc.masks.min() >= 0 and sc.masks.max() <= 10
    assert sc.sources.shape == (300, 5)
    for m,s in zip(sc.masks, sc.sources):
        allowed = {0} | {TARGETS[i] + 1 for i in s if i >= 0}
        assert set(np.unique(m)) <= allowed
    empty = (sc.sources < 0).all(1)
    assert empty.any() and (sc.masks[empty] == 0).all()

def test_topmost_digit_wins():
    "Two digits of different classes at the same place: the later one's label covers the overlap"
    rng = np.random.default_rng(0)
    trn = digit_split()[0]
    i0, i1 = trn[TARGETS[trn] == 3][0], trn[TARGETS[trn] == 8][0]
    r = D._draws(rng, 1, 32, trn, (2, 2), (0.5, 0.5), (0, 1), 0.)
    r['cl_on'].zero_()
    r['centre'][0, 1] = r['centre'][0, 0]; r['side'][0, 1] = r['side'][0, 0]; r['angle'][0] = 0
    for order,top in (((i0, i1), 9), ((i1, i0), 4)):
        r['src'] = np.array([order])
        _, m = D._draw_scenes(r, 32, 0.)
        assert top in np.unique(m) and (m[0] == top).sum() > (m[0] == 13 - top).sum()

def test_class_balance():
    sc = digit_scenes(2000, size=48, seed=0)
    placed = np.bincount(TARGETS[sc.sources[sc.sources >= 0]], minlength=10)
    assert np.all(np.abs(placed/placed.mean() - 1) < 0.2), placed
    px = np.bincount(sc.masks.ravel(), minlength=11)
    assert 0.6 < px[0]/px.sum() < 0.95
    assert np.all(px[1:]/px[1:].mean() > 0.5), px
    d = digits_dls(bs=64, augment=False)
    assert np.all(np.bincount([TARGETS[i] for i in d.valid.items], minlength=10) >= 35)

def test_argument_errors():
    with pytest.raises(ValueError, match='n=-1'): digit_scenes(-1)
    with pytest.raises(ValueError, match='size=4'): digit_scenes(2, size=4)
    with pytest.raises(ValueError, match='n_digits'): digit_scenes(2, n_digits=(3, 1))
    with pytest.raises(ValueError, match='scale'): digit_scenes(2, scale=(0.5, 2))
    with pytest.raises(ValueError, match='noise=2'): digit_scenes(2, noise=2)
    with pytest.raises(ValueError, match='valid_pct=0'): digit_split(0)
    with pytest.raises(ValueError, match='size=2'): digit_images(2)

# ---- DataLoaders and show_batch

def _check_show(dls, n=4):
    plt.close('all')
    dls.show_batch(max_n=n)
    fig = plt.gcf()
    assert sum(len(a.images) for a in fig.axes) >= n
    plt.close('all')

def test_scene_batches_and_show():
    dls = digit_scenes_dls(24, 8, size=32, bs=8)
    x, y = dls.one_batch()
    assert type(x).__name__ == 'TensorImage' and type(y).__name__ == 'TensorMask'
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8, 32, 32) and y.dtype == torch.int64
    assert list(dls.vocab) == SCENE_CODES
    _check_show(dls)

def test_digits_batches_and_show():
    dls = digits_dls(size=24, bs=8)
    x, y = dls.one_batch()
    assert x.shape == (8, 3, 24, 24) and y.shape == (8,) and list(dls.vocab) == DIGIT_CLASSES
    _check_show(dls)
    xv, _ = dls.valid.one_batch()     # valid batches are not augmented: pixels of the stored images
    assert torch.allclose(xv[0].cpu(), torch.from_numpy(digit_images(24)[dls.valid.items[0]]).permute(2, 0, 1).float()/255, atol=1e-5)

# ---- disk round trips

@pytest.fixture
def camvid(tmp_path):
    return write_camvid(tmp_path/'cv', n_train=6, n_valid=3, size=16, seed=4)

@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path/'if', size=12)

def test_camvid_round_trip(camvid):
    dls = camvid_dls(camvid, bs=3)
    assert list(dls.vocab) == SCENE_CODES
    for split,ds in (('train', dls.train_ds), ('valid', dls.valid_ds)):
        mem = digit_scenes(len(ds), size=16, seed=4, split=split)
        assert [f.stem for f in ds.items] == [f'{split}_{i:05d}' for i in range(len(ds))]
        for i in range(len(ds)):
            x, y = ds[i]
            np.testing.assert_array_equal(np.asarray(x), mem.images[i])
            np.testing.assert_array_equal(np.asarray(y), mem.masks[i])
    _check_show(dls, 3)
    assert camvid_dls(camvid, bs=3, size=8).one_batch()[0].shape == (3, 3, 8, 8)

def test_image_folder_round_trip(folder):
    dls = image_folder_dls(folder, bs=8)
    assert list(dls.vocab) == DIGIT_CLASSES
    trn, val = digit_split()
    imgs = digit_images(12)
    for ds,idx in ((dls.train_ds, trn), (dls.valid_ds, val)):
        assert sorted(int(f.stem) for f in ds.items) == idx.tolist()
        for k in range(0, len(ds), 97):
            x, y = ds[k]
            i = int(ds.items[k].stem)
            np.testing.assert_array_equal(np.asarray(x), imgs[i])
            assert int(y) == TARGETS[i]
    _check_show(dls)

def test_image_folder_val_name(folder):
    (folder/'valid').rename(folder/'val')
    assert len(image_folder_dls(folder, bs=8).valid_ds) == len(digit_split()[1])

# ---- error paths

def test_camvid_errors(camvid, tmp_path):
    with pytest.raises(FileNotFoundError, match='Data folder not found'): camvid_dls(tmp_path/'missing')
    for name,msg in (('images', 'Image folder'), ('labels', 'Label folder'), ('codes.txt', 'codes.txt'), ('valid.txt', 'valid.txt')):
        p = shutil.copytree(camvid, tmp_path/f'no_{name}')
        (shutil.rmtree if (p/name).is_dir() else lambda q: q.unlink())(p/name)
        with pytest.raises(FileNotFoundError, match=msg): camvid_dls(p)

def _copy(src, dst): return shutil.copytree(src, dst)

def test_camvid_empty_splits(camvid, tmp_path):
    p = _copy(camvid, tmp_path/'a'); (p/'valid.txt').write_text('')
    with pytest.raises(ValueError, match='Empty valid split'): camvid_dls(p)
    p = _copy(camvid, tmp_path/'b'); (p/'valid.txt').write_text('\n'.join(f.name for f in (p/'images').iterdir()))
    with pytest.raises(ValueError, match='Empty train split'): camvid_dls(p)
    p = _copy(camvid, tmp_path/'c'); shutil.rmtree(p/'images'); (p/'images').mkdir()
    with pytest.raises(ValueError, match='No images'): camvid_dls(p)
    p = _copy(camvid, tmp_path/'d'); (p/'valid.txt').write_text('valid_00000.png\nnot_there.png\n')
    with pytest.raises(ValueError, match='not_there.png'): camvid_dls(p)
    p = _copy(camvid, tmp_path/'e'); (p/'codes.txt').write_text('\n')
    with pytest.raises(ValueError, match='names no classes'): camvid_dls(p)

def test_camvid_mask_mismatch(camvid, tmp_path):
    p = _copy(camvid, tmp_path/'a'); (p/'labels'/'valid_00001_P.png').unlink()
    with pytest.raises(ValueError, match=r'1 images have no mask.*valid_00001.png'): camvid_dls(p)
    p = _copy(camvid, tmp_path/'b'); Image.new('L', (16, 12)).save(p/'labels'/'train_00002_P.png')
    with pytest.raises(ValueError, match='train_00002_P.png is 16x12 but image train_00002.png is 16x16'): camvid_dls(p)
    p = _copy(camvid, tmp_path/'c'); Image.new('RGB', (16, 16)).save(p/'labels'/'train_00002_P.png')
    with pytest.raises(ValueError, match="mode 'RGB'"): camvid_dls(p)
    p = _copy(camvid, tmp_path/'d'); Image.new('RGB', (20, 20)).save(p/'images'/'train_00003.png'); Image.new('L', (20, 20)).save(p/'labels'/'train_00003_P.png')
    with pytest.raises(ValueError, match='different sizes'): camvid_dls(p)
    assert camvid_dls(p, size=16, bs=2).one_batch()[0].shape[-2:] == (16, 16)

def test_camvid_labels_outside_codes(camvid, tmp_path):
    p = _copy(camvid, tmp_path/'a')
    m = np.asarray(Image.open(p/'labels'/'train_00001_P.png')).copy(); m[0, :3] = [11, 255, 40]
    Image.fromarray(m).save(p/'labels'/'train_00001_P.png')
    with pytest.raises(ValueError, match=r'train_00001_P.png holds labels \[11, 40, 255\] outside codes.txt \(11 codes'): camvid_dls(p)
    with pytest.raises(ValueError, match=r'\[11, 40\]'): camvid_dls(p, void=255)
    m[0, :3] = [1, 255, 2]; Image.fromarray(m).save(p/'labels'/'train_00001_P.png')
    assert len(camvid_dls(p, void=255, bs=2).train_ds) == 6
    (p/'codes.txt').write_text('background\n0\n')
    with pytest.raises(ValueError, match='outside codes.txt'): camvid_dls(p, void=255)

def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match='Data folder not found'): image_folder_dls(tmp_path/'missing')
    p = _copy(folder, tmp_path/'a'); shutil.rmtree(p/'train')
    with pytest.raises(FileNotFoundError, match='Train folder'): image_folder_dls(p)
    p = _copy(folder, tmp_path/'b'); shutil.rmtree(p/'valid')
    with pytest.raises(FileNotFoundError, match='Valid folder'): image_folder_dls(p)
    p = _copy(folder, tmp_path/'c'); shutil.rmtree(p/'valid'); (p/'valid'/'3').mkdir(parents=True)
    with pytest.raises(ValueError, match='Empty valid split'): image_folder_dls(p)
    p = _copy(folder, tmp_path/'d'); shutil.rmtree(p/'train'); (p/'train').mkdir()
    with pytest.raises(ValueError, match='Empty train split'): image_folder_dls(p)
    p = _copy(folder, tmp_path/'e'); (p/'valid'/'cat').mkdir(); Image.new('L', (12, 12)).save(p/'valid'/'cat'/'x.png')
    with pytest.raises(ValueError, match="Classes in valid/ but not in train/: cat"): image_folder_dls(p)
    p = _copy(folder, tmp_path/'f'); Image.new('L', (20, 20)).save(p/'train'/'3'/'big.png')
    with pytest.raises(ValueError, match='different sizes'): image_folder_dls(p)
    assert image_folder_dls(p, size=12, bs=4).one_batch()[0].shape == (4, 3, 12, 12)

def test_image_folder_empty_class_folder(folder, tmp_path):
    for split in ('valid', 'train'):
        p = _copy(folder, tmp_path/split); (p/split/'4').rename(p/split/'4_old'); (p/split/'4').mkdir()
        shutil.rmtree(p/split/'4_old')
        with pytest.raises(ValueError, match=f"Empty class folder: no images in {p/split/'4'}$"): image_folder_dls(p)

@pytest.mark.parametrize('damage', [lambda f: f.write_bytes(b'not an image'), lambda f: f.write_bytes(f.read_bytes()[:60])], ids=['garbage', 'truncated'])
def test_corrupt_images(folder, camvid, tmp_path, damage):
    p = _copy(folder, tmp_path/'f'); bad = sorted((p/'valid'/'2').iterdir())[1]; damage(bad)
    with pytest.raises(ValueError, match=f'Cannot read image {bad}'): image_folder_dls(p, size=12)
    for sub,k in (('images', 4), ('labels', 5)):
        p = _copy(camvid, tmp_path/sub); bad = sorted((p/sub).iterdir())[k]; damage(bad)
        with pytest.raises(ValueError, match=f'Cannot read image {bad}'): camvid_dls(p)

def test_camvid_masks_whatever_the_image_format(camvid, tmp_path):
    "CamVid-style `.jpg` images with `labels/<stem>_P.png` masks, or plain `labels/<stem>.png`"
    p = _copy(camvid, tmp_path/'jpg')
    for f in sorted((p/'images').iterdir()): Image.open(f).save(f.with_suffix('.jpg'), quality=100); f.unlink()
    (p/'valid.txt').write_text((p/'valid.txt').read_text().replace('.png', '.jpg'))
    (p/'labels'/'train_00000_P.png').rename(p/'labels'/'train_00000.png')
    dls = camvid_dls(p, bs=2)
    i = [f.name for f in dls.train_ds.items].index('train_00000.jpg')
    np.testing.assert_array_equal(np.asarray(dls.train_ds[i][1]), np.asarray(Image.open(p/'labels'/'train_00000.png')))
    assert len(dls.train_ds) + len(dls.valid_ds) == len(list((p/'images').iterdir()))
    (p/'labels'/'train_00000.png').unlink()
    with pytest.raises(ValueError, match=r'1 images have no mask labels/<stem>_P.png or labels/<stem>.png: train_00000.jpg'): camvid_dls(p)
