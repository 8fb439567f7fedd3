"The `ranger-fastai` command in tiny configurations: both experiments and the demo, --data folders, every error path, Ctrl-C"
import subprocess, sys
import matplotlib; matplotlib.use('Agg')
import numpy as np
import pytest
import torch
from PIL import Image
from fastai.callback.core import Callback
from ranger_fastai import experiments
from ranger_fastai.cli import main
from ranger_fastai.experiments import SCENES, VARIANTS, run_experiments, leaderboard_data, distill_data
from ranger_fastai.data import write_image_folder, write_camvid

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves this module out

torch.set_num_threads(1)
TINY_LB = ['--epochs', '1', '--seeds', '2', '--lr', '0.01']
TINY_DS = ['--epochs', '1', '--teacher-epochs', '1', '--seeds', '1', '--scenes', '48', '16', '--bs', '16']

from conftest import results as _results

# ---- the three commands

def test_leaderboard(tmp_path):
    out = tmp_path/'lb'
    main(['leaderboard', *TINY_LB, '--optimizers', 'ranger', 'fastai ranger', '--out', str(out)])
    res = _results(out)
    assert sorted((r['optimizer'], r['seed']) for r in res['runs']) == [('fastai ranger', 0), ('fastai ranger', 1), ('ranger', 0), ('ranger', 1)]
    assert all(r['experiment'] == 'leaderboard' and r['lr'] == 0.01 and len(r['curve']) == 1 and 0 <= r['accuracy'] <= 1 and r['time'] > 0 for r in res['runs'])
    rows = res['tables']['leaderboard']
    assert [(r['optimizer'], r['seeds']) for r in rows] == [('fastai ranger', 2), ('ranger', 2)]
    for row in rows:
        accs = [r['accuracy'] for r in res['runs'] if r['optimizer'] == row['optimizer']]
        assert row['accuracy'] == pytest.approx(np.mean(accs)) and row['std'] == pytest.approx(np.std(accs, ddof=1))
    assert res['tables']['ranger_agreement']['pairs'] == 2
    assert res['interrupted'] is False and res['config']['command'].startswith('ranger-fastai leaderboard')
    md = (out/'report.md').read_text()
    assert '| optimizer | lr |' in md and '](leaderboard.png)' in md and (out/'leaderboard.png').stat().st_size > 0

def test_ranger_matches_fastai_ranger(tmp_path):
    "Same seed, same batches, same math: our ranger and fastai's end at nearly the same accuracy"
    main(['leaderboard', '--epochs', '2', '--seeds', '1', '--lr', '0.01', '--optimizers', 'ranger', 'fastai ranger', '--out', str(tmp_path)])
    assert _results(tmp_path)['tables']['ranger_agreement']['max_diff'] <= 0.01

def test_distill(tmp_path):
    main(['distill', *TINY_DS, '--out', str(tmp_path)])
    res = _results(tmp_path)
    assert [r['variant'] for r in res['runs']] == ['teacher', *VARIANTS]
    assert all(r['experiment'] == 'distill' and 0 <= r['miou'] <= 1 for r in res['runs'])
    rows = res['tables']['distill']
    assert [r['variant'] for r in rows] == ['teacher', *VARIANTS]
    base, full = rows[1]['miou'], rows[-1]['miou']
    gap = rows[0]['miou'] - base
    assert rows[-1]['gap_closed'] == (pytest.approx((full - base)/gap) if gap > 0 else None)  # no gap to close: none reported
    md = (tmp_path/'report.md').read_text()
    assert '| variant | seeds |' in md and '](predictions.png)' in md and (tmp_path/'predictions.png').exists()

def test_demo(tmp_path):
    main(['demo', *TINY_DS, '--lr', '0.01', '--optimizers', 'ranger', '--out', str(tmp_path)])
    res = _results(tmp_path)
    assert {r['experiment'] for r in res['runs']} == {'leaderboard', 'distill'}
    assert res['tables']['leaderboard'] and [r['variant'] for r in res['tables']['distill']] == ['teacher', *VARIANTS]  # all three terms
    assert (tmp_path/'report.md').exists()

def test_python_m():
    r = subprocess.run([sys.executable, '-m', 'ranger_fastai', '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'leaderboard' in r.stdout and 'distill' in r.stdout

# ---- --data on folders written from the built-in data

@pytest.fixture(scope='module')
def image_folder(tmp_path_factory): return write_image_folder(tmp_path_factory.mktemp('digits'), size=16)

@pytest.fixture
def camvid(tmp_path): return write_camvid(tmp_path/'camvid', n_train=24, n_valid=8, size=32)

def test_leaderboard_data(tmp_path, image_folder):
    main(['leaderboard', '--data', str(image_folder), '--epochs', '1', '--seeds', '1', '--lr', '0.01', '--optimizers', 'Adam', '--out', str(tmp_path)])
    res = _results(tmp_path)
    assert len(res['runs']) == 1 and res['config']['leaderboard_data'] == str(image_folder)

def test_distill_data(tmp_path, camvid):
    main(['distill', '--data', str(camvid), '--epochs', '1', '--teacher-epochs', '1', '--seeds', '1', '--bs', '8',
          '--variants', 'student', '+ pixel-wise', '--out', str(tmp_path/'out')])
    res = _results(tmp_path/'out')
    assert [r['variant'] for r in res['runs']] == ['teacher', 'student', '+ pixel-wise']

# ---- error paths: one line, exit status 2, nothing trained

def test_missing_folder(tmp_path, fails):
    for cmd in ('leaderboard', 'distill'):
        err = fails([cmd, '--data', str(tmp_path/'nope'), '--out', str(tmp_path/'out')])
        assert err == f"ranger-fastai {cmd}: error: Data folder not found: {tmp_path/'nope'}"
    assert not (tmp_path/'out').exists()

def test_empty_split(tmp_path, fails, image_folder, camvid):
    import shutil
    lb = tmp_path/'lb'
    shutil.copytree(image_folder, lb)
    for f in (lb/'valid').rglob('*.png'): f.unlink()
    assert 'Empty valid split' in fails(['leaderboard', '--data', str(lb)])
    (camvid/'valid.txt').write_text('\n'.join(f.name for f in (camvid/'images').iterdir()))
    assert 'Empty train split' in fails(['distill', '--data', str(camvid)])
    (camvid/'valid.txt').write_text('')
    assert 'Empty valid split' in fails(['distill', '--data', str(camvid)])

def test_mask_not_matching_image(camvid, fails):
    m = sorted((camvid/'labels').iterdir())[0]
    Image.open(m).resize((16, 16)).save(m)
    assert f'Mask {m.name} is 16x16 but image' in fails(['distill', '--data', str(camvid)])

def test_missing_mask(camvid, fails):
    sorted((camvid/'labels').iterdir())[3].unlink()
    assert 'have no mask' in fails(['distill', '--data', str(camvid)])

def test_messages_name_the_options(image_folder, tmp_path, fails):
    "The library says `size=`, the command `--size`"
    import shutil
    d = shutil.copytree(image_folder, tmp_path/'mixed')
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(d/'train'/'0'/'big.png')
    assert fails(['leaderboard', '--data', str(d)]).endswith('pass --size N to resize them')
    with pytest.raises(ValueError, match='pass size=N to resize them'): leaderboard_data(d)

def test_folder_gaps(image_folder, camvid, tmp_path, fails):
    "An empty class folder and a corrupt image: one line, naming the folder or file"
    import shutil
    d = shutil.copytree(image_folder, tmp_path/'gaps')
    (d/'valid'/'7b').mkdir()
    assert fails(['leaderboard', '--data', str(d)]).endswith(f"Empty class folder: no images in {d/'valid'/'7b'}")
    (d/'valid'/'7b').rmdir()
    bad = sorted((d/'train'/'3').iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:40]) # truncated
    assert f'Cannot read image {bad}' in fails(['leaderboard', '--data', str(d)])
    img = sorted((camvid/'images').iterdir())[2]
    img.write_bytes(b'garbage')
    assert f'Cannot read image {img}' in fails(['distill', '--data', str(camvid)])

def test_labels_outside_codes(camvid, fails):
    m = sorted((camvid/'labels').iterdir())[0]
    a = np.array(Image.open(m)); a[0, 0] = 42
    Image.fromarray(a).save(m)
    assert 'holds labels [42] outside codes.txt' in fails(['distill', '--data', str(camvid)])

def test_bad_options(tmp_path, fails, capsys):
    if not torch.cuda.is_available(): assert 'CUDA is not available' in fails(['leaderboard', '--device', 'cuda'])
    if not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        assert 'MPS (Apple GPU) is not available' in fails(['distill', '--device', 'mps'])
    assert 'one learning rate' in fails(['distill', '--lr', '0.1', '0.2'])
    with pytest.raises(SystemExit) as e: main(['leaderboard', '--epochs', '0'])
    assert e.value.code == 2 and 'expected a number > 0' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(['demo', '--data', str(tmp_path)])
    assert e.value.code == 2

# ---- Ctrl-C keeps what finished

class _CtrlC(Callback):
    "Raises `KeyboardInterrupt` when the second fit starts (as Ctrl-C would)"
    def __init__(self): self.fits = 0
    def before_fit(self):
        self.fits += 1
        if self.fits == 2: raise KeyboardInterrupt

def test_interrupted_run_keeps_finished_runs(tmp_path):
    dls = leaderboard_data(bs=128, size=16)
    res = run_experiments(tmp_path, dict(dls=dls, optimizers=['ranger', 'Adam'], lrs=[1e-2], seeds=[0], epochs=1, width=4),
                          dict(dls=distill_data(bs=16, scenes=dict(SCENES, n_train=32, n_valid=16)), seeds=[0], epochs=1, teacher_epochs=1),
                          cbs=[_CtrlC()], bar=False, log=None)
    assert res['interrupted'] is True
    saved = _results(tmp_path)
    assert saved['interrupted'] is True and [(r['optimizer'], r['seed']) for r in saved['runs']] == [('ranger', 0)]
    assert [r['optimizer'] for r in saved['tables']['leaderboard']] == ['ranger'] and saved['tables']['distill'] == []
    md = (tmp_path/'report.md').read_text()
    assert 'Interrupted' in md and '| ranger | 0.01 | 1 |' in md and '| Adam |' not in md

def test_interrupted_command_exits_130(tmp_path, monkeypatch):
    run = experiments.run_experiments
    monkeypatch.setattr(experiments, 'run_experiments', lambda *a, cbs=(), **k: run(*a, cbs=[*cbs, _CtrlC()], **k))
    with pytest.raises(SystemExit) as e: main(['leaderboard', *TINY_LB, '--optimizers', 'ranger', '--out', str(tmp_path)])
    assert e.value.code == 130
    saved = _results(tmp_path)
    assert saved['interrupted'] and len(saved['runs']) == 1 and 'Interrupted' in (tmp_path/'report.md').read_text()
