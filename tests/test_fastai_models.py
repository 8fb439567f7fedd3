"Distillation of fastai's own models: unet_learner and vision_learner pairs, checks at the call, and an exported student in a fresh process"
import subprocess, sys, warnings
import pytest, torch
from fastai.vision.all import (unet_learner, vision_learner, resnet18, resnet34, xresnet18, SegmentationDataLoaders, CrossEntropyLossFlat,
                               get_image_files, ShortEpochCallback)
from ranger_fastai.data import write_camvid, digits_dls, SCENE_CODES
from ranger_fastai.distill import DistillationCallback
from ranger_fastai.layers import auto_pairs, probe_batch
from ranger_fastai.optimizer import ranger

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves this module out

warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
torch.set_num_threads(1)

def _camvid_dls(path, bs=8):
    "fastai's own CamVid loaders on a folder `write_camvid` wrote (fastai only: the export loads without ranger_fastai)"
    def label(f): return f.parent.parent/'labels'/f'{f.stem}_P.png' # nested: saved by value in an export
    return SegmentationDataLoaders.from_label_func(path, get_image_files(path/'images'), label, codes=SCENE_CODES, bs=bs, seed=0)

@pytest.fixture(scope='module')
def camvid(tmp_path_factory): return write_camvid(tmp_path_factory.mktemp('camvid'), n_train=24, n_valid=8, size=64)

def _unet(dls, arch, **kw): return unet_learner(dls, arch, pretrained=False, n_out=len(SCENE_CODES), loss_func=CrossEntropyLossFlat(axis=1), opt_func=ranger, **kw)

def test_auto_pairs_on_unet_learner_decoder_blocks(camvid):
    dls = _camvid_dls(camvid)
    student, teacher = _unet(dls, resnet18), _unet(dls, resnet34)
    assert auto_pairs(student.model, teacher.model, probe_batch(dls)) == [('layers.5', 'layers.5')]
    layers = student.feature_layers().set_index('layer')
    assert layers.loc['layers.5', 'output'] == (2, 384, 8, 8) and layers.loc['layers.5', 'type'] == 'UnetBlock'
    student.distill(teacher, pairs='auto')
    assert student.distillation.pairs == [('layers.5', 'layers.5')]

def test_auto_pairs_on_vision_learner_bodies():
    dls = digits_dls(size=64, bs=8)
    s, t = vision_learner(dls, resnet18, pretrained=False), vision_learner(dls, xresnet18, pretrained=False)
    assert auto_pairs(s.model, t.model, probe_batch(dls)) == [('0', '0')]
    s.distill(t, pairs='auto', holistic=False)
    s.fit(1, 1e-3, cbs=ShortEpochCallback(0.05)) # a few batches of training and validation
    names = s.recorder.metric_names
    assert 'train_pa_loss' in names and 'valid_pi_loss' in names
    assert s.distillation.avgs.value('train', 'pa_loss') > 0 # a pair-wise term on the bodies

def test_errors_at_the_call(camvid):
    dls = _camvid_dls(camvid)
    student, teacher = _unet(dls, resnet18), _unet(dls, resnet34)
    n_cbs = len(student.cbs)
    with pytest.raises(ValueError, match=r"Layer '4' not found in the student; its decoder blocks: layers.4 \(2, 512, 4, 4\), layers.5 \(2, 384, 8, 8\)"):
        student.distill(teacher, pairs=[('4', '4')])
    with pytest.raises(ValueError, match='The teacher is the student'): student.distill(student)
    other = unet_learner(dls, resnet18, pretrained=False, n_out=3)
    with pytest.raises(ValueError, match='Class counts differ: the student predicts 11 classes'): student.add_cb(DistillationCallback(other))
    with pytest.raises(ValueError, match="the student is a unet_learner model, the teacher a vision_learner model"):
        student.distill(vision_learner(digits_dls(size=64), resnet18, pretrained=False, n_out=11), pairs='auto')
    assert len(student.cbs) == n_cbs and not hasattr(student, 'distillation') # nothing attached

def test_float64_teacher(camvid):
    dls = _camvid_dls(camvid)
    student, teacher = _unet(dls, resnet18), _unet(dls, resnet18)
    teacher.model.double()
    student.distill(teacher, pairs='auto', holistic=False).fit(1, 1e-3)
    assert all(v == v for v in student.recorder.values[-1]) # finite losses and terms

_FRESH = '''
import sys, warnings
warnings.filterwarnings('ignore')
if {block}: sys.modules['ranger_fastai'] = None # as where ranger_fastai is not installed
import torch
from fastai.vision.all import load_learner, get_image_files, SegmentationDataLoaders
from pathlib import Path
path = Path({path!r})
learn = load_learner(path/'student.pkl')
files = sorted(get_image_files(path/'images'))
mask, _, probs = learn.predict(files[0])
preds, _ = learn.get_preds(dl=learn.dls.test_dl(files[:3]))
res = dict(cbs=[type(c).__name__ for c in learn.cbs], mask=list(mask.shape), probs=list(probs.shape), preds=list(preds.shape))
def label(f): return f.parent.parent/'labels'/f'{{f.stem}}_P.png'
learn.dls = SegmentationDataLoaders.from_label_func(path, files, label, codes=(path/'codes.txt').read_text().split(), bs=8, seed=0)
try:
    learn.fit(1, 1e-3)
    res['fit'] = [float(v) for v in learn.recorder.values[-1]]
except ImportError as e: res['fit_error'] = str(e)
print(res)
'''

def _fresh(path, block):
    r = subprocess.run([sys.executable, '-c', _FRESH.format(path=str(path), block=block)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return eval(r.stdout.strip().splitlines()[-1])

def test_exported_student_in_a_fresh_process(camvid):
    dls = _camvid_dls(camvid)
    student, teacher = _unet(dls, resnet18), _unet(dls, resnet34)
    student.distill(teacher, pairs='auto').fit(1, 1e-3)
    student.path = camvid
    student.export('student.pkl')
    assert any(isinstance(c, DistillationCallback) for c in student.cbs) # still distilling here
    res = _fresh(camvid, block=False)
    assert 'DistillationCallback' not in res['cbs'] and res['mask'] == [64, 64] and res['probs'] == [11, 64, 64] and res['preds'] == [3, 11, 64, 64]
    assert len(res['fit']) == 2 and all(v == v for v in res['fit']) # train and valid loss only: a plain Learner trains
    res = _fresh(camvid, block=True) # without ranger_fastai: loads and predicts; training says what it needs
    assert res['preds'] == [3, 11, 64, 64] and 'exported with opt_func=ranger from ranger_fastai: install ranger_fastai' in res['fit_error']
