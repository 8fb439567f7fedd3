"The experiments and the `ranger-fastai` command on fastai's architectures: resnets, xresnets, unet_learner, teachers and weights from files, their errors"
import subprocess, sys, time
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.vision.models import resnet18
from fastai.vision.models.xresnet import xresnet18
from ranger_fastai.cli import main
from ranger_fastai.data import write_image_folder, write_camvid, camvid_dls
from ranger_fastai.presets import OPTIMIZER_NAMES, BACKBONES, ACTIVATIONS, CLASSIFIERS, SEGMENTERS
from ranger_fastai.models import ARCHS, ACTS, SegNet, classifier_learner, segmentation_learner, load_teacher
from ranger_fastai.experiments import OPTIMIZERS, _n_params
from ranger_fastai.report import show_predictions

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves this module out

torch.set_num_threads(1)
ONE = ['--epochs', '1', '--seeds', '1']

from conftest import results as _results

@pytest.fixture(scope='module')
def image_folder(tmp_path_factory): return write_image_folder(tmp_path_factory.mktemp('digits'), size=16)

@pytest.fixture(scope='module')
def camvid(tmp_path_factory): return write_camvid(tmp_path_factory.mktemp('camvid'), n_train=8, n_valid=4, size=64)

@pytest.fixture(scope='module')
def files(tmp_path_factory, camvid):
    "A resnet18 state dict and a resnet18 U-Net teacher, exported and saved, neither trained"
    d = tmp_path_factory.mktemp('files')
    torch.manual_seed(0)
    torch.save(resnet18().state_dict(), d/'resnet18.pth')
    t = segmentation_learner(camvid_dls(camvid, bs=4), 'resnet18')
    t.export(d/'teacher.pkl')
    torch.save(t.model.state_dict(), d/'teacher.pth')
    torch.save({'not': 'a learner'}, d/'other.pkl')
    plain = Learner(camvid_dls(camvid, bs=4), nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 11, 1)), loss_func=CrossEntropyLossFlat(axis=1))
    plain.export(d/'plain.pkl') # a segmentation model with no decoder layer to pair
    (d/'notes.pth').write_text('not a state dict')
    return d

# ---- one source for the names the command shows

def test_names_match_the_objects():
    assert list(OPTIMIZERS) == OPTIMIZER_NAMES and list(ARCHS) == BACKBONES and list(ACTS) == ACTIVATIONS
    assert CLASSIFIERS == ['small_cnn', *BACKBONES] and SEGMENTERS == ['segnet', *BACKBONES]

def test_help_is_fast_and_shows_defaults():
    "`--help` in a fresh process: no torch, no fastai, under 5 s (seen: 0.1-0.2 s), with the presets' defaults"
    start = time.perf_counter()
    r = subprocess.run([sys.executable, '-m', 'ranger_fastai', 'leaderboard', '--help'], capture_output=True, text=True, timeout=60)
    secs = time.perf_counter() - start
    assert r.returncode == 0 and secs < 5, (secs, r.stderr)
    out = ' '.join(r.stdout.split())
    assert '(default: small_cnn)' in out and '(default: 5)' in out and '(default: 3)' in out and 'xresnet50' in out and '--sa' in out
    demo = ' '.join(subprocess.run([sys.executable, '-m', 'ranger_fastai', 'demo', '--help'], capture_output=True, text=True, timeout=60).stdout.split())
    assert '(default: 3 leaderboard, 8 distill)' in demo
    code = 'import sys; from ranger_fastai.cli import _parser; _parser(); print(sorted(m for m in ("torch", "fastai") if m in sys.modules))'
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60).stdout.strip() == '[]'

# ---- the leaderboard on fastai's classifiers

def test_leaderboard_xresnet18_mish_sa(tmp_path, image_folder):
    main(['leaderboard', '--data', str(image_folder), '--arch', 'xresnet18', '--act', 'mish', '--sa', *ONE, '--lr', '0.01',
          '--optimizers', 'ranger', '--bs', '128', '--out', str(tmp_path)])
    (r,) = _results(tmp_path)['runs']
    assert r['model'] == 'xresnet18 (Mish, self-attention)' and 0 <= r['accuracy'] <= 1
    assert r['params'] == _n_params(xresnet18(n_out=10, act_cls=torch.nn.Mish, sa=True)) != _n_params(xresnet18(n_out=10))
    assert '`xresnet18 (Mish, self-attention)`' in (tmp_path/'report.md').read_text()

def test_leaderboard_resnet18_weights(tmp_path, image_folder, files):
    main(['leaderboard', '--data', str(image_folder), '--arch', 'resnet18', '--weights', str(files/'resnet18.pth'), *ONE, '--lr', '0.01',
          '--optimizers', 'Adam', '--bs', '128', '--out', str(tmp_path)])
    res = _results(tmp_path)
    assert res['runs'][0]['model'] == 'resnet18 (vision_learner, weights from a file)'
    assert res['config']['weights'] == str(files/'resnet18.pth') and res['config']['leaderboard']['arch'] == 'resnet18'
    assert '`resnet18 (vision_learner, weights from a file)`' in (tmp_path/'report.md').read_text()

def test_weights_are_loaded_into_the_body(image_folder, files):
    from ranger_fastai.data import image_folder_dls
    dls = image_folder_dls(image_folder, bs=8)
    sd = torch.load(files/'resnet18.pth')
    learn = classifier_learner(dls, 'resnet18', weights=files/'resnet18.pth')
    body = learn.model[0]
    assert torch.equal(body[0].weight, sd['conv1.weight']) and torch.equal(body[7][1].conv2.weight, sd['layer4.1.conv2.weight'])
    assert torch.equal(body[1].running_var, sd['bn1.running_var'])
    assert any(type(t).__name__ == 'Normalize' for t in dls.after_batch.fs) # ImageNet statistics, as for pretrained weights
    unet = segmentation_learner(_scenes64(), 'resnet18', weights=sd).model
    assert torch.equal(unet[0][4][0].conv1.weight, sd['layer1.0.conv1.weight'])

def _scenes64():
    from ranger_fastai.data import digit_scenes_dls
    return digit_scenes_dls(4, 4, size=64, bs=4)

# ---- distillation between unet_learner models

def test_distill_unet_resnet34_into_resnet18(tmp_path, camvid):
    main(['distill', '--data', str(camvid), '--teacher-arch', 'resnet34', '--student-arch', 'resnet18', *ONE, '--teacher-epochs', '1',
          '--bs', '4', '--variants', 'student', '+ pair-wise', '--out', str(tmp_path)])
    res = _results(tmp_path)
    assert [(r['variant'], r['model']) for r in res['runs']] == [('teacher', 'resnet34 U-Net (unet_learner)'),
        ('student', 'resnet18 U-Net (unet_learner)'), ('+ pair-wise', 'resnet18 U-Net (unet_learner)')]
    assert res['runs'][0]['params'] > res['runs'][1]['params'] and all(0 <= r['miou'] <= 1 for r in res['runs'])
    md = (tmp_path/'report.md').read_text()
    assert 'Teacher `resnet34 U-Net (unet_learner)`, students `resnet18 U-Net (unet_learner)`' in md and (tmp_path/'predictions.png').exists()

@pytest.mark.parametrize('name,arch', [('teacher.pkl', None), ('teacher.pth', 'resnet18')])
def test_distill_with_a_teacher_file(tmp_path, camvid, files, name, arch):
    main(['distill', '--data', str(camvid), '--teacher', str(files/name), *(['--teacher-arch', arch] if arch else []), '--student-arch', 'segnet',
          *ONE, '--bs', '4', '--variants', '+ pixel-wise', '--out', str(tmp_path)])
    res = _results(tmp_path)
    teacher = res['runs'][0]
    assert teacher['model'] == 'DynamicUnet (given, not trained)' and teacher['epochs'] == 0 and teacher['train_loss'] == []
    assert teacher['params'] == _n_params(load_teacher(files/name, camvid_dls(camvid, bs=4), arch or 'segnet'))
    assert res['config']['teacher'] == str(files/name) and [r['variant'] for r in res['runs']] == ['teacher', '+ pixel-wise']

def test_teacher_file_keeps_its_weights(camvid, files):
    dls = camvid_dls(camvid, bs=4)
    want = torch.load(files/'teacher.pth')
    for f,arch in (('teacher.pkl', 'segnet'), ('teacher.pth', 'resnet18')):
        got = load_teacher(files/f, dls, arch).state_dict()
        assert all(torch.equal(got[k].cpu(), v) for k,v in want.items())

# ---- every error: one line, exit status 2, nothing trained or written

def _class_mismatch(tmp_path, camvid):
    import shutil
    d = shutil.copytree(camvid, tmp_path/'more_codes')
    (d/'codes.txt').write_text((camvid/'codes.txt').read_text() + 'extra\n')
    return d

def test_errors(tmp_path, fails, camvid, image_folder, files):
    out, f = tmp_path/'out', lambda n: str(files/n)
    lb, ds = ['leaderboard', '--data', str(image_folder), '--out', str(out)], ['distill', '--data', str(camvid), '--bs', '4', '--out', str(out)]
    cases = [
        (['leaderboard', '--arch', 'resnet19'], "argument --arch: invalid choice: 'resnet19'"),
        (['distill', '--student-arch', 'unet'], "argument --student-arch: invalid choice: 'unet'"),
        ([*lb, '--arch', 'resnet18', '--sa'], 'error: --sa: options of the xresnet archs, not of --arch resnet18'),
        ([*lb, '--act', 'mish'], 'error: --act mish: options of the xresnet archs, not of --arch small_cnn'),
        ([*lb, '--arch', 'resnet18', '--weights', f('nope.pth')], f"error: --weights {f('nope.pth')}: no such file"),
        ([*lb, '--arch', 'resnet18', '--weights', f('notes.pth')], f"error: --weights {f('notes.pth')}: not a PyTorch state dict file"),
        ([*lb, '--arch', 'resnet34', '--weights', f('resnet18.pth')], f"error: --weights {f('resnet18.pth')} does not fit the body of resnet34: 96 missing keys"),
        ([*lb, '--weights', f('resnet18.pth')], f"error: --weights {f('resnet18.pth')}: small_cnn has no pretrained body"),
        ([*lb, '--arch', 'xresnet18', '--sa', '--weights', f('resnet18.pth')], "does not fit the body of xresnet18"),
        ([*ds, '--student-arch', 'resnet34', '--student-weights', f('resnet18.pth')], f"error: --student-weights {f('resnet18.pth')} does not fit the body of resnet34"),
        ([*ds, '--teacher-weights', f('resnet18.pth')], f"error: --teacher-weights {f('resnet18.pth')}: segnet has no pretrained body"),
        ([*ds, '--teacher', f('nope.pkl')], f"error: --teacher {f('nope.pkl')}: no such file"),
        ([*ds, '--teacher', f('other.pkl')], f"error: --teacher {f('other.pkl')}: not an exported fastai Learner"),
        ([*ds, '--teacher', f('resnet18.pth')], f"error: --teacher {f('resnet18.pth')} does not fit a segnet teacher"),
        ([*ds, '--teacher', f('teacher.pth'), '--teacher-arch', 'resnet34'], f"error: --teacher {f('teacher.pth')} does not fit a resnet34 teacher"),
        (['distill', '--data', str(_class_mismatch(tmp_path, camvid)), '--bs', '4', '--teacher', f('teacher.pkl')], f"error: --teacher {f('teacher.pkl')} predicts 11 classes, the data has 12"),
        ([*ds, '--teacher', f('teacher.pkl'), '--teacher-arch', 'resnet18'], f"error: --teacher-arch resnet18 with --teacher {f('teacher.pkl')}: an exported Learner holds its own model"),
        ([*ds, '--teacher', f('teacher.pkl'), '--teacher-epochs', '3'], f"error: --teacher-epochs 3 with --teacher {f('teacher.pkl')}: a given teacher is not trained again"),
        ([*ds, '--teacher', f('teacher.pth'), '--teacher-weights', f('resnet18.pth')], "error: --teacher-weights"),
        ([*ds, '--teacher', f('plain.pkl')], f"error: --teacher {f('plain.pkl')}: no decoder layer to pair in its Sequential for the pair-wise term"),
    ]
    for argv,want in cases:
        err = fails(argv)
        assert want in err, (argv, err)
    assert not out.exists()

# ---- the legend of the predictions

def test_predictions_legend():
    from matplotlib.colors import Normalize
    dls = _scenes64()
    fig = show_predictions({'teacher': SegNet(11, 4), 'student': SegNet(11, 2)}, dls, n=2)
    leg = fig.legends[0]
    assert [t.get_text() for t in leg.get_texts()] == list(dls.vocab)
    colours = [tuple(h.get_facecolor()) for h in leg.legend_handles]
    cmap, norm = plt.get_cmap('tab20'), Normalize(0, 19)
    assert colours == [tuple(cmap(norm(i))) for i in range(11)] and len(set(colours)) == 11
    img = fig.axes[1].images[0] # the truth of the first row, drawn with the same colours
    assert img.cmap.name == 'tab20' and (img.norm.vmin, img.norm.vmax) == (0, 19)
    plt.close(fig)
