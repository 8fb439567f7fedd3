"`ranger` inside a fastai `Learner`: hypers, schedules, wd_bn_bias, freezing, checkpoints, export"
import math, pickle, warnings
from functools import partial
import pytest, torch
from torch import nn
from fastai.learner import Learner, load_learner
from fastai.metrics import accuracy
from fastai.callback.schedule import *
from fastai.callback.core import Callback
from fastai.torch_core import params
from ranger_fastai.optimizer import Ranger, ranger, SlowWeightsCallback, SharedStateWrapper
from ranger_fastai.data import digits_dls

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                                       nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                         nn.Linear(32, 10))

def _learner(tmp_path=None, **kw):
    return Learner(digits_dls(size=8, bs=64, augment=False), _model(), loss_func=nn.CrossEntropyLoss(), opt_func=ranger, metrics=accuracy,
                   splitter=lambda m: [params(m[0]), params(m[1])], path=tmp_path or '.', **kw)

class _Betas(Callback):
    "Record the torch optimizer's betas and lr at each step"
    def before_fit(self): self.betas, self.lrs = [], []
    def after_step(self):
        g = self.learn.opt.opt.param_groups[-1]
        self.betas.append(g['betas']); self.lrs.append(g['lr'])

def test_opt_is_ranger_with_groups():
    learn = _learner(); learn.create_opt()
    assert isinstance(learn.opt, SharedStateWrapper) and isinstance(learn.opt.opt, Ranger)
    assert len(learn.opt.opt.param_groups) == 2

def test_fit_one_cycle_schedules_beta1_and_lr():
    learn = _learner(); rec = _Betas()
    learn.fit_one_cycle(1, 1e-2, cbs=rec)
    b1 = [b[0] for b in rec.betas]
    assert max(b1) == pytest.approx(0.95, abs=1e-3) and min(b1) == pytest.approx(0.85, abs=5e-3)
    assert all(b[1] == 0.99 for b in rec.betas)
    assert max(rec.lrs) == pytest.approx(1e-2, rel=0.05)

def test_fit_flat_cos_trains():
    learn = _learner()
    learn.fit_flat_cos(3, 3e-2)
    assert learn.validate()[1] > 0.5

def test_set_hyper_sqr_mom_changes_only_beta2():
    learn = _learner(); learn.create_opt()
    before = [dict(g) for g in learn.opt.opt.param_groups]
    learn.opt.set_hyper('sqr_mom', 0.9)
    for b, g in zip(before, learn.opt.opt.param_groups):
        assert g['betas'] == (b['betas'][0], 0.9)
        assert {k: v for k, v in g.items() if k not in ('betas', 'params')} == {k: v for k, v in b.items() if k not in ('betas', 'params')}
    learn.opt.set_hyper('eps', 1e-5); learn.opt.set_hyper('wd', 0.2)
    assert all(g['eps'] == 1e-5 and g['weight_decay'] == 0.2 for g in learn.opt.opt.param_groups)

@pytest.mark.parametrize('wd_bn_bias', [False, True])
def test_wd_bn_bias(wd_bn_bias):
    "With zero gradients, only weight decay moves the parameters: norm and bias ones only when wd_bn_bias=True"
    learn = _learner(wd_bn_bias=wd_bn_bias); learn.create_opt()
    learn.opt.set_hypers(lr=0.5, wd=0.1)
    model = learn.model
    with torch.no_grad():
        for p in model.parameters(): p.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters(): p.grad = torch.zeros_like(p)
    learn.opt.step()
    for n, p in model.named_parameters():
        is_bn_bias = n.endswith('bias') or n.startswith('0.1.')
        decayed = not torch.equal(p, before[n])
        assert decayed == (wd_bn_bias or not is_bn_bias), n
        if decayed: assert torch.allclose(p, before[n] * (1 - 0.5 * 0.1))

def test_freeze_keeps_do_wd_and_fine_tune_runs():
    learn = _learner(); learn.create_opt()
    bn_w = learn.model[0][1].weight
    assert learn.opt.state[bn_w]['do_wd'] is False
    learn.freeze()
    assert learn.opt.state[bn_w]['do_wd'] is False and learn.opt.state[bn_w].get('force_train') is True
    assert not learn.model[0][0].weight.requires_grad and bn_w.requires_grad
    learn.fine_tune(1, 1e-2, freeze_epochs=1)
    assert learn.opt.state[bn_w]['do_wd'] is False and learn.model[0][0].weight.requires_grad

def test_discriminative_lr_slice():
    learn = _learner(); rec = _Betas()
    learn.fit_flat_cos(1, slice(1e-4, 1e-2), cbs=rec)
    lrs = [g['lr'] for g in learn.opt.opt.param_groups]
    assert lrs[0] < lrs[1]

def test_lr_find():
    learn = _learner()
    before = [p.detach().clone() for p in learn.model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = learn.lr_find(num_it=30, show_plot=False)
    lrs, losses = learn.recorder.lrs, learn.recorder.losses
    assert 2 < len(lrs) <= 30 and len(losses) == len(lrs)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert lrs[0] == pytest.approx(1e-7) and max(ratios) == pytest.approx(min(ratios))  # geometric, from start_lr
    assert lrs[0] <= res.valley <= lrs[-1]
    assert all(math.isfinite(float(l)) for l in losses)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))  # the model is put back

def test_save_load_with_opt_resumes_state(tmp_path):
    learn = _learner(tmp_path); learn.fit_flat_cos(1, 1e-2)
    learn.save('ck', with_opt=True)
    ck = torch.load(tmp_path/'models'/'ck.pth', weights_only=True)
    assert set(ck) == {'model', 'opt'} and 'lookahead_slow' in ck['opt']['state'][0]
    learn2 = _learner(tmp_path); learn2.load('ck', with_opt=True)
    s1, s2 = learn.opt.opt.state_dict(), learn2.opt.opt.state_dict()
    for i, st in s1['state'].items():
        for k, v in st.items(): assert torch.equal(v, s2['state'][i][k]) if torch.is_tensor(v) else v == s2['state'][i][k]
    assert s2['state'][1]['do_wd'] is False  # the bn weight's flag came back with the state

def test_export_and_load_learner(tmp_path):
    learn = _learner(tmp_path); learn.fit_flat_cos(1, 1e-2)
    learn.export('model.pkl')
    learn2 = load_learner(tmp_path/'model.pkl')
    x, _ = learn.dls.one_batch()
    learn.model.eval(); learn2.model.eval()
    assert torch.allclose(learn.model(x), learn2.model(x))

def test_slow_weights_callback_validates_slow_and_trains_fast():
    learn = _learner(cbs=SlowWeightsCallback())
    learn.fit_flat_cos(2, 3e-2)
    st = learn.opt.opt.state
    w = learn.model[1].weight
    # after validation the fast weights are back; the slow ones are in the state
    assert not torch.equal(w, st[w]['lookahead_slow'])
    recorded = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))['valid_loss']
    learn.remove_cb(SlowWeightsCallback)
    fast_loss = learn.validate()[0]
    with learn.opt.slow_weights():
        assert torch.equal(w, st[w]['lookahead_slow'])
        slow_loss = learn.validate()[0]
    assert recorded == pytest.approx(slow_loss, rel=1e-5) and fast_loss != pytest.approx(slow_loss, rel=1e-5)


def test_slow_weights_callback_checkpoints_slow_weights(tmp_path):
    "SaveModelCallback saves (and judges) the slow weights; the epoch ends mid Lookahead cycle"
    from fastai.callback.tracker import SaveModelCallback
    learn = _learner(tmp_path, cbs=[SlowWeightsCallback(), SaveModelCallback(fname='best', every_epoch=True)])
    learn.opt_func = partial(ranger, k=7)
    learn.fit_flat_cos(1, 1e-2)
    saved = torch.load(tmp_path/'models'/'best_0.pth', weights_only=True)
    st = learn.opt.opt.state
    for n, p in learn.model.named_parameters():
        assert torch.equal(saved[n], st[p]['lookahead_slow']), n
    assert not all(torch.equal(p, st[p]['lookahead_slow']) for p in learn.model.parameters())

def test_export_with_slow_weights_callback(tmp_path):
    learn = _learner(tmp_path, cbs=SlowWeightsCallback()); learn.fit_flat_cos(1, 1e-2)
    learn.export('m.pkl')
    learn2 = load_learner(tmp_path/'m.pkl')
    preds, _ = learn2.get_preds(dl=learn.dls.valid)
    assert preds.shape == (len(learn.dls.valid_ds), 10)
