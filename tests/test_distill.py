"Longer checks of `DistillationCallback`, its `Critic` and `Learner.distill` in real fastai fits"
import warnings
import pytest, torch
from torch import nn
from fastcore.foundation import L
from fastai.learner import Learner, load_learner
from fastai.data.core import Datasets
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.schedule import *  # fit_one_cycle, fit_flat_cos, lr_find
from fastai.callback.training import GradientAccumulation, GradientClip
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.fp16 import MixedPrecision
from ranger_fastai.losses import Discriminator, pixel_wise_loss
from ranger_fastai.distill import DistillationCallback, Critic, _critic_file

def _seg_dls(n=48, bs=8, size=16, seed=0):
    "Random images with 3 classes per pixel (from the signs of two channels)"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return Datasets(range(n), tfms=[[x.__getitem__], [y.__getitem__]], splits=[range(n*3//4), range(n*3//4, n)]).dataloaders(bs=bs, num_workers=0)

def _net(w, n_classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, n_classes, 1))

def _disc(seed=0, spectral=False):
    torch.manual_seed(seed)
    return Discriminator(3, nf=8, n_layers=2, attn_layers=(), spectral=spectral)

def _learner(tmp_path='.', **kw): return Learner(_seg_dls(**kw), _net(4), loss_func=CrossEntropyLossFlat(axis=1), path=tmp_path)

def _params(m): return [p.detach().clone() for p in m.parameters()]
def _same(a, b): return all(torch.equal(x, y) for x, y in zip(a, b))

def _count_forwards(m):
    "Attach a forward-call counter to `m`; returns the list it appends to"
    calls = []
    m.register_forward_hook(lambda *a: calls.append(1))
    return calls

class _Probe(Callback):
    "Record `loss`, `loss_grad`, pred and batch at `after_loss`, at a chosen order"
    def __init__(self, order): self.order, self.rows = order, []
    def after_loss(self):
        if self.training: self.rows.append((self.learn.loss.detach().clone(), self.learn.loss_grad.detach().clone(), self.learn.pred.detach(), self.xb))

# %% all three terms, and what must not change

def test_three_terms_fit_one_cycle(tmp_path):
    teacher, D = _net(16, seed=1), _disc()
    t0, d0 = _params(teacher), _params(D)
    learn = _learner(tmp_path)
    s0 = _params(learn.model)
    probe = _Probe(order=8)
    dist = DistillationCallback(teacher, pi_weight=1., pa_weight=2., ho_weight=0.1, pairs=[('3', '3'), ('1', '1')], critic=D)
    learn.fit_one_cycle(2, 1e-2, cbs=[dist, probe])
    assert _same(t0, teacher.parameters()) and all(p.grad is None for p in teacher.parameters())
    assert teacher.training  # its mode before the fit is restored
    assert not _same(d0, D.parameters()) and not _same(s0, learn.model.parameters())
    names = learn.recorder.metric_names
    for ph in ('train', 'valid'):
        for k in ('pi', 'pa', 'ho', 'total'): assert f'{ph}_{k}_loss' in names
    assert {'train_w_dist', 'train_gp', 'valid_w_dist', 'valid_gp', 'train_ho_loss'} <= set(names) and learn.metrics == []
    vals = dict(zip(names[1:], learn.recorder.values[-1]))
    assert all(v is not None for v in vals.values())
    # the logged loss is the task loss; loss_grad (what is back-propagated) is the whole objective
    loss, loss_grad, pred, xb = probe.rows[-1]
    assert loss_grad > loss
    # hooks are gone after fit
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in list(learn.model.modules()) + list(teacher.modules()))

def test_objective_is_task_plus_weighted_terms(tmp_path):
    "`loss_grad` = task loss + pi_weight * pixel-wise + pa_weight * (mean of the pairs' pair-wise losses), from the same batch's outputs"
    from ranger_fastai.losses import pair_wise_loss
    teacher, learn, feats = _net(16, seed=1), _learner(tmp_path), {}
    for who, net in (('s', learn.model), ('t', teacher)):
        for l in ('3', '1'): net.get_submodule(l).register_forward_hook(lambda m, i, o, k=(who, l): feats.__setitem__(k, o.detach()))
    class _Check(Callback):
        order, rows = 6, []
        def after_loss(self):
            if not self.training: return
            fs = {l: feats['s', l] for l in ('3', '1')} # the student's, before the teacher runs again below
            with torch.no_grad(): t = teacher(*self.xb)
            pa = (pair_wise_loss(fs['3'], feats['t', '3']) + pair_wise_loss(fs['1'], feats['t', '1'])) / 2
            self.rows.append((self.learn.loss_grad.item(), (self.learn.loss + 0.5*pixel_wise_loss(self.learn.pred, t) + 2*pa).item()))
    learn.fit(1, 1e-2, cbs=[DistillationCallback(teacher, pi_weight=0.5, pa_weight=2., ho_weight=0, pairs=[('3', '3'), ('1', '1')]), _Check()])
    assert len(_Check.rows) == 4 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in _Check.rows)

class _ShiftInputs(Callback):
    "Changes the batch in `before_batch` after `DistillationCallback` (order 5) has run, as MixUp-like callbacks do"
    order = 50
    def __init__(self): self.sent = []
    def before_batch(self):
        self.learn.xb = (self.xb[0] + 1,)
        self.sent.append(self.xb[0])

def test_teacher_sees_the_students_inputs_just_before_it(tmp_path):
    teacher = _net(16, seed=1)
    learn, seen = _learner(tmp_path), []
    teacher.register_forward_pre_hook(lambda m, args: seen.append(('teacher', args[0])))
    learn.model.register_forward_pre_hook(lambda m, args: seen.append(('student', args[0])))  # registered first: runs before the teacher's run
    learn.model.register_forward_hook(lambda m, args, out: seen.append(('student done', args[0])))
    shift = _ShiftInputs()
    learn.fit(1, 1e-2, cbs=[DistillationCallback(teacher, pairs=[('3', '3')], ho_weight=0), shift])
    calls = seen[6:]  # after the checks at attach and at before_fit (each: student, then teacher, on two samples)
    assert len(calls) == 3 * len(shift.sent) == 3 * (len(learn.dls.train) + len(learn.dls.valid))
    for i, sent in enumerate(shift.sent):
        names, inputs = zip(*calls[3*i:3*i+3])
        assert names == ('student', 'teacher', 'student done') and all(x is sent for x in inputs) # the teacher runs on the student's inputs, before it
    assert len(learn.model._forward_pre_hooks) == 1  # ours is removed after fit

def test_teacher_learner_fit_flat_cos_and_lr_find(tmp_path):
    tlearn = Learner(_seg_dls(), _net(16, seed=1), loss_func=CrossEntropyLossFlat(axis=1))
    learn = _learner(tmp_path)
    learn.add_cbs(DistillationCallback(tlearn, pairs=[('3', '3')], pool=2, critic=_disc()))
    s0, d0 = _params(learn.model), _params(learn.distillation.critic.discriminator)
    learn.lr_find(num_it=5, show_plot=False)
    assert _same(s0, learn.model.parameters()) and _same(d0, learn.distillation.critic.discriminator.parameters())  # lr_find restores both
    assert list(learn.path.glob('**/*_disc.pth')) == []
    learn.fit_flat_cos(1, 1e-2)
    assert tlearn.model is learn.distillation.teacher

def test_pi_only_objective_seen_by_gradient_accumulation_and_clip(tmp_path):
    teacher = _net(16, seed=1)
    learn = _learner(tmp_path)
    probe = _Probe(order=7)  # after DistillationCallback (5) and GradientAccumulation (6)
    learn.fit(1, 1e-2, cbs=[DistillationCallback(teacher, pi_weight=3., pa_weight=0, ho_weight=0), GradientAccumulation(16),
                            GradientClip(0.5), probe])
    for loss, loss_grad, pred, (x,) in probe.rows:
        with torch.no_grad(): pi = pixel_wise_loss(pred, teacher(x))
        torch.testing.assert_close(loss_grad, (loss + 3*pi) * x.shape[0]/16)

def test_classification_student_pi_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g); y = (x[:, 0] > 0).long()
    dls = Datasets(range(32), tfms=[[x.__getitem__], [y.__getitem__]], splits=[range(24), range(24, 32)]).dataloaders(bs=8, num_workers=0)
    learn = Learner(dls, nn.Linear(6, 2), loss_func=nn.CrossEntropyLoss())
    learn.fit(1, 1e-2, cbs=DistillationCallback(nn.Linear(6, 2), ho_weight=0, T=2.))
    assert 'valid_pi_loss' in learn.recorder.metric_names and 'train_pa_loss' not in learn.recorder.metric_names

def test_train_metrics_columns(tmp_path):
    learn = _learner(tmp_path)
    learn.recorder.train_metrics = True
    learn.fit(1, 1e-2, cbs=DistillationCallback(_net(16), ho_weight=0))
    names = learn.recorder.metric_names
    assert 'train_pi_loss' in names and 'valid_pi_loss' in names and 'train_total_loss' in names
    vals = dict(zip(names[1:], learn.recorder.values[-1]))
    assert vals['train_pi_loss'] != vals['valid_pi_loss']

class _WhereIsTheTeacherHook(Callback):
    order = 50
    def __init__(self, dist): self.dist, self.seen = dist, []
    def before_batch(self): self.seen.append((type(self.learn.model).__name__, self.dist._teacher_run.model is self.learn.model))

class _LateWrap(Callback):
    "Wraps the student after DistillationCallback's before_fit, as fastai's DistributedTrainer (order 11) does with DDP"
    order = 11
    def before_fit(self): self.learn.model = nn.DataParallel(self.learn.model)
    def after_fit(self): self.learn.model = self.learn.model.module

@pytest.mark.parametrize('late', [False, True])
def test_teacher_hook_follows_a_wrapped_student(tmp_path, late):
    "The teacher's pre-hook sits on the outermost module, also when the wrapper comes after our before_fit: one teacher run per batch"
    from fastai.distributed import ParallelTrainer  # wraps in DataParallel before our before_fit
    teacher = _net(16, seed=1)
    calls, learn = _count_forwards(teacher), _learner(tmp_path)
    dist = DistillationCallback(teacher, ho_weight=0)
    where = _WhereIsTheTeacherHook(dist)
    learn.fit(1, 1e-2, cbs=[dist, _LateWrap() if late else ParallelTrainer(device_ids=None), where])
    assert set(where.seen) == {('DataParallel', True)}
    assert len(calls) == 2 + len(learn.dls.train) + len(learn.dls.valid)  # once per batch (and for the checks at attach and at before_fit)
    assert not isinstance(learn.model, nn.DataParallel) and all(len(m._forward_pre_hooks) == 0 for m in learn.model.modules())

# %% unlabelled data, get_preds, show_results

def test_get_preds_never_runs_the_teacher(tmp_path):
    teacher = _net(16, seed=1)
    calls = _count_forwards(teacher)
    learn = _learner(tmp_path)
    learn.add_cbs(DistillationCallback(teacher, pairs=[('3', '3')], critic=_disc()))
    learn.fit(1, 1e-2)
    n = len(calls)
    assert n > 0
    preds, targs = learn.get_preds()
    test_dl = learn.dls.test_dl(range(10))
    assert len(test_dl.one_batch()) == 1  # unlabelled
    preds, _ = learn.get_preds(dl=test_dl)
    learn.validate()
    assert preds.shape == (10, 3, 16, 16) and len(calls) == n
    assert 'valid_pi_loss' not in learn.recorder.metric_names  # validate/get_preds add no columns

class _PredsMidFit(Callback):
    "Calls `get_preds` once after the first epoch (its own `before_fit`/`after_fit` run inside the fit), counting the teacher's calls in it"
    def __init__(self, calls): self.calls, self.during = calls, None
    def after_epoch(self):
        if self.epoch == 0 and self.during is None:
            n = len(self.calls); self.during = 0  # set first: fastai's validation context calls after_epoch again
            self.learn.get_preds()
            self.res = self.learn.validate()
            self.during = len(self.calls) - n

def test_get_preds_during_a_fit_leaves_the_distillation_running(tmp_path):
    teacher, D = _net(16, seed=1), _disc()
    calls, learn = _count_forwards(teacher), _learner(tmp_path)
    peek = _PredsMidFit(calls)
    dist = DistillationCallback(teacher, pairs=[('3', '3')], critic=D)
    learn.fit(1, 1e-2, cbs=dist)  # the reference: one epoch
    per_epoch = len(calls) - 2  # the checks at attach and at before_fit run it once each
    learn.fit(2, 1e-2, cbs=[dist, peek])
    assert peek.during == 0  # the teacher does not run inside get_preds or validate
    assert peek.res[0] is not None and len(peek.res) > 1 and all(v is None for v in peek.res[1:])  # the columns: not computed by validate
    assert len(calls) - (per_epoch + 2) == 2 + 2 * per_epoch  # and runs on every batch of both epochs
    names = learn.recorder.metric_names
    assert 'train_pi_loss' in names and 'train_w_dist' in names and dist._on is False and learn.metrics == []

def test_show_results_on_digit_scenes(tmp_path):
    import matplotlib; matplotlib.use('Agg')
    from ranger_fastai.data import digit_scenes_dls
    dls = digit_scenes_dls(n_train=16, n_valid=8, size=32, bs=8)
    net = lambda w: nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 11, 1))
    learn = Learner(dls, net(4), loss_func=CrossEntropyLossFlat(axis=1), path=tmp_path).distill(net(8), pairs=[('1', '1')],
                    critic=Discriminator(11, nf=8, n_layers=2, attn_layers=()))
    learn.fit(1, 1e-2)
    import matplotlib.pyplot as plt
    plt.close('all')
    learn.show_results(max_n=2)  # the distillation's hooks and columns do not get in the way
    axes = [a for n in plt.get_fignums() for a in plt.figure(n).axes if a.images]
    ims = [im.get_array() for a in axes for im in a.images]  # fastai lays out the inputs with targets and predictions drawn over them
    assert len(axes) >= 2 and len(ims) >= 4 and all(im.shape[:2] == (32, 32) for im in ims)
    plt.close('all')

# %% export and checkpoints

def _export_size(learn, fname):
    learn.export(fname)
    return (learn.path/fname).stat().st_size

def test_export_is_a_plain_student(tmp_path):
    big_teacher = _net(256, seed=1)  # ~600k parameters: 2.4 MB
    learn = _learner(tmp_path)
    plain = _export_size(learn, 'plain.pkl')
    learn.distill(big_teacher, pairs=[('3', '3')], critic=_disc())
    learn.fit(1, 1e-3)
    with_cbs = _export_size(learn, 'cbs.pkl')
    assert with_cbs - plain < 20_000, (plain, with_cbs)
    # the same learner with a tiny teacher kept by a plain callback: the file grows by the teacher's size
    class _Keep(Callback): pass
    keep = _Keep(); keep.net = big_teacher
    learn.add_cb(keep)
    assert _export_size(learn, 'kept.pkl') - plain > 2_000_000
    learn.remove_cb(keep)
    learn2 = load_learner(tmp_path/'cbs.pkl')
    assert not any(isinstance(c, DistillationCallback) for c in learn2.cbs) and not hasattr(learn2, 'distillation')
    assert isinstance(learn.distillation, DistillationCallback) and learn.distillation.teacher is big_teacher  # the exporting learner keeps it
    assert learn2.get_preds(dl=learn2.dls.test_dl(range(3)))[0].shape == (3, 3, 16, 16)
    learn2.dls = learn.dls
    learn2.fit(1)  # a plain student
    assert learn2.recorder.metric_names[1:3] == ['train_loss', 'valid_loss'] and len(learn2.recorder.metric_names) == 4

def test_checkpoint_resume_restores_the_critic(tmp_path):
    learn = _learner(tmp_path).distill(_net(16, seed=1), critic=_disc())
    critic = learn.distillation.critic
    learn.fit(1, 1e-2)
    f = learn.save('ck')
    assert _critic_file(f).exists() and _critic_file(f).name == 'ck_disc.pth'
    d_ck = _params(critic.discriminator)
    st_ck = [v['step'] for v in critic.opt.state_dict()['state']]
    learn.fit(1, 1e-2)
    assert not _same(d_ck, critic.discriminator.parameters())
    learn.load('ck')
    assert _same(d_ck, critic.discriminator.parameters())
    assert [v['step'] for v in critic.opt.state_dict()['state']] == st_ck
    # a fresh learner (new discriminator, no optimizer yet) resumes from the checkpoint
    learn2 = _learner(tmp_path).distill(_net(16, seed=1), critic=_disc(seed=5)).load('ck')
    assert _same(d_ck, learn2.distillation.critic.discriminator.parameters())
    learn2.fit(1, 1e-2)
    steps = [v['step'] for v in learn2.distillation.critic.opt.state_dict()['state']]
    assert steps and all(s == st + len(learn.dls.train) for s, st in zip(steps, st_ck))
    # a critic to be made at the first fit is made by `load`, to receive the checkpoint
    made = _learner(tmp_path); made.add_cb(DistillationCallback(_net(16, seed=1), critic=Critic())); made.fit(1, 1e-2)
    made.save('made')
    learn3 = _learner(tmp_path)
    learn3.add_cb(DistillationCallback(_net(16, seed=1), critic=Critic()))
    learn3.load('made')
    assert _same(_params(made.cbs[-1].critic.discriminator), learn3.distillation.critic.discriminator.parameters())
    with pytest.warns(UserWarning, match='No critic checkpoint'):
        learn.save('only', with_opt=False); _critic_file(tmp_path/'models'/'only.pth').unlink(); learn.load('only', with_opt=False)

def test_save_model_callback_writes_side_files(tmp_path):
    learn = _learner(tmp_path).distill(_net(16, seed=1), critic=_disc())
    learn.fit(2, 1e-2, cbs=SaveModelCallback(every_epoch=True, with_opt=True))
    assert (tmp_path/'models'/'model_0_disc.pth').exists() and (tmp_path/'models'/'model_1_disc.pth').exists()

# %% mixed precision on CPU

class _CPUMixedPrecision(MixedPrecision):
    "fastai's `MixedPrecision` with CPU autocast (float16) and `GradScaler('cpu')`; counts scaler updates"
    def before_fit(self):
        self.autocast, self.learn.scaler, self.scales = torch.autocast('cpu', dtype=torch.float16), torch.amp.GradScaler('cpu', init_scale=2.**10), L()
        self.n_updates, upd = 0, self.learn.scaler.update
        def _update(*a, **k): self.n_updates += 1; return upd(*a, **k)
        self.learn.scaler.update = _update

@pytest.mark.parametrize('n_steps', [1, 2])
def test_amp_cpu_autocast_and_shared_scaler(tmp_path, n_steps):
    D = _disc(); d0 = _params(D)
    learn = _learner(tmp_path)
    mp = _CPUMixedPrecision()
    critic = Critic(D, n_steps=n_steps)
    stepped = []
    orig = critic.step
    def _step(*a):
        res = orig(*a); stepped.append([p.stepped for p in critic._proxies]); return res
    critic.step = _step
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # e.g. "no inf checks were recorded", or a skipped step
        learn.fit(1, 1e-2, cbs=[DistillationCallback(_net(16, seed=1), pairs=[('3', '3')], critic=critic), mp])
    n = len(learn.dls.train)
    assert mp.n_updates == n  # one update per iteration
    assert len(stepped) == n and all(len(s) == n_steps for s in stepped)
    assert any(all(s) for s in stepped) and not _same(d0, D.parameters())
    assert all(torch.isfinite(torch.tensor(v)) for v in learn.recorder.values[-1])

# %% discriminator step details

class _NaNPenaltyD(nn.Module):
    "A critic whose gradient penalty is NaN (its output is NaN where the input requires grad)"
    img_channels = 0
    def __init__(self):
        super().__init__(); self.lin = nn.Conv2d(3, 1, 1)
    def forward(self, maps, img=None):
        out = self.lin(maps).mean((1, 2, 3))
        return out * float('nan') if maps.requires_grad else out

def test_nan_penalty_skips_the_step(tmp_path):
    learn = _learner(tmp_path)
    D = _NaNPenaltyD()
    critic = Critic(D, with_image=False)
    learn.add_cb(DistillationCallback(_net(16, seed=1), ho_weight=0., critic=critic))
    learn.fit(1, 1e-2)  # creates the optimizer; every step skipped
    n = len(learn.dls.train)
    assert critic.n_skipped == n
    d0, st0 = _params(D), critic.opt.state_dict()
    with pytest.warns(UserWarning, match='skipped a step: non-finite penalty'): learn.fit(1, 1e-2)
    assert critic.n_skipped == 2*n and _same(d0, D.parameters()) and all(p.grad is None for p in D.parameters())
    assert critic.opt.state_dict()['state'] == st0['state'] and all(st == {} for st in st0['state'])
    assert learn.recorder.values[-1][learn.recorder.metric_names.index('train_w_dist') - 1] is None  # no step: nothing to show

def test_hinge_and_schedule(tmp_path):
    from fastai.callback.schedule import SchedCos
    learn = _learner(tmp_path)
    critic = Critic(_disc(), loss='hinge', sched=SchedCos(1e-3, 1e-5))
    learn.fit(1, 1e-2, cbs=DistillationCallback(_net(16, seed=1), critic=critic))
    lr = critic.opt.hypers[-1]['lr']
    assert 1e-5 < lr < 1e-3
    names = learn.recorder.metric_names
    assert 'train_w_dist' in names and 'train_gp' not in names  # hinge: no penalty

# %% hooks and exceptions

class _Boom(Callback):
    def __init__(self, exc): self.exc = exc
    def after_loss(self):
        if self.training and self.iter == 1: raise self.exc

def test_hooks_removed_after_cancel_and_after_an_error(tmp_path):
    teacher = _net(16, seed=1)
    learn = _learner(tmp_path)
    dist = DistillationCallback(teacher, pairs=[('3', '3')], ho_weight=0)
    learn.fit(1, cbs=[dist, _Boom(CancelFitException())])
    assert len(learn.model[3]._forward_hooks) == 0 and len(teacher[3]._forward_hooks) == 0
    dist.critic = Critic(_disc())
    learn.add_cb(dist)  # attached for good, as `learn.distill` does
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=_Boom(RuntimeError('boom')))
    # fastai skips after_fit; the extended `fit` tears the callback down before the error goes on
    assert learn.metrics == [] and not dist._on and teacher.training
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in [*learn.model.modules(), *teacher.modules()])
    learn.export('x.pkl')  # the student alone
    assert len(learn.validate()) == 1  # the loss, no columns
    learn.fit(1)  # and the next fit works
    assert 'train_w_dist' in learn.recorder.metric_names and 'train_pa_loss' in learn.recorder.metric_names
    with pytest.raises(KeyboardInterrupt): learn.fit(1, cbs=_Boom(KeyboardInterrupt()))  # Ctrl-C too
    assert learn.metrics == [] and not dist._on and len(learn.model[3]._forward_hooks) == 0

def test_a_callback_removed_for_a_moment_keeps_distilling(tmp_path):
    "fastai detaches callbacks for a while (`removed_cbs`, as `FetchPredsCallback` does for its `get_preds`): the distillation goes on after it"
    from fastai.callback.core import FetchPredsCallback
    learn = _learner(tmp_path)
    dist = DistillationCallback(_net(16, seed=1), pairs=[('3', '3')], critic=_disc())
    learn.add_cb(dist)
    learn.fit(2, 1e-2, cbs=FetchPredsCallback(cbs=[dist]))
    names, values = learn.recorder.metric_names, learn.recorder.values
    assert all(len(v) == len(names) - 2 and all(x is not None for x in v) for v in values)  # every column, both epochs ('epoch' and 'time' aside)

def test_fit_with_cbs_cleans_up_after_an_error(tmp_path):
    "A callback passed to `fit(cbs=...)` is removed when the fit ends, by an error too: that tears it down"
    teacher, learn = _net(16, seed=1), _learner(tmp_path)
    dist = DistillationCallback(teacher, pairs=[('3', '3')], critic=_disc())
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[dist, _Boom(RuntimeError('boom'))])
    assert learn.metrics == [] and not dist._on and teacher.training and dist.learn is None
    dist.critic = Critic(_disc())
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[dist, _Boom(RuntimeError('boom'))])  # a critic made at the fit too
    assert learn.metrics == [] and not dist._on
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in [*learn.model.modules(), *teacher.modules()])

def test_a_second_student_forward_in_the_batch(tmp_path):
    "A callback running the student again within the batch (consistency losses, R-Drop) leaves the teacher's output and the features alone"
    class _Again(Callback):
        order = 1
        def after_pred(self): self.learn.model(self.xb[0].flip(-1))
    teacher = _net(16, seed=1)
    calls, learn = _count_forwards(teacher), _learner(tmp_path)
    learn.fit(1, 1e-2, cbs=[DistillationCallback(teacher, pairs=[('3', '3')], ho_weight=0), _Again()])
    assert len(calls) == 2 + len(learn.dls.train) + len(learn.dls.valid) and learn.recorder.values[-1][2] is not None

def test_pairs_refuse_dataparallel_on_several_devices(tmp_path):
    "DataParallel replicas would each fire the layer hooks on their slice: a clear error in before_fit, before any step"
    from fastai.distributed import ParallelTrainer  # order 0: wraps the student before our before_fit
    class _TwoDevices(Callback):  # stands for DataParallel over two GPUs (this machine has none)
        order = 1
        def before_fit(self): self.learn.model.device_ids = [0, 1]
    learn = _learner(tmp_path)
    s0 = _params(learn.model)
    with pytest.raises(ValueError, match='DataParallel on 2 devices'):
        learn.fit(1, 1e-2, cbs=[DistillationCallback(_net(16, seed=1), pairs=[('3', '3')], ho_weight=0), ParallelTrainer(device_ids=None), _TwoDevices()])
    assert _same(s0, learn.model.parameters())

# %% errors, before any change

@pytest.mark.parametrize('kw,msg', [
    (dict(pi_weight=-1.), 'pi_weight=-1'), (dict(pa_weight=float('nan')), 'pa_weight=nan'),
    (dict(T=0), 'T=0'), (dict(pool=1.5), 'pool=1.5'), (dict(pairs=[('3',)]), 'Invalid pair')])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(')): DistillationCallback(_net(4), **kw)

def test_bad_teacher_and_critic_arguments():
    with pytest.raises(TypeError, match='teacher'): DistillationCallback('resnet')
    with pytest.raises(TypeError, match='ho_weight=True'): DistillationCallback(_net(4), ho_weight=True)  # a bool is not a weight
    with pytest.raises(TypeError, match="discriminator='D'"): DistillationCallback(_net(4), critic='D')
    with pytest.raises(ValueError, match='n_steps=0'): Critic(_disc(), n_steps=0)
    with pytest.raises(ValueError, match="loss='gan'"): Critic(_disc(), loss='gan')
    with pytest.raises(ValueError, match='lr=-1'): Critic(_disc(), lr=-1)
    with pytest.raises(ValueError, match='gp_samples=0'): Critic(_disc(), gp_samples=0)
    with pytest.raises(ValueError, match='warmup=2'): Critic(_disc(), warmup=2)
    with pytest.raises(ValueError, match='holistic=False with critic'): _learner().distill(_net(4), holistic=False, critic=_disc())

def _fails(learn, cbs, msg):
    s0 = _params(learn.model)
    with pytest.raises(ValueError, match=msg): learn.fit(1, 1e-2, cbs=cbs)
    assert _same(s0, learn.model.parameters())
    assert all(len(m._forward_hooks) == 0 for m in learn.model.modules()) and learn.metrics == []

def test_errors_before_fit(tmp_path):
    learn, teacher = _learner(tmp_path), _net(16, seed=1)
    _fails(learn, DistillationCallback(teacher, pairs=[('3', '33')], ho_weight=0), "Layer '33' not found in the teacher; did you mean '3'")
    _fails(learn, DistillationCallback(teacher, pairs=[('body.3', '3')], ho_weight=0), "not found in the student")
    _fails(learn, DistillationCallback(teacher, pairs=[(nn.ReLU(), '3')], ho_weight=0), "not a submodule of the student")
    _fails(learn, DistillationCallback(_net(16, n_classes=5), ho_weight=0), r"Class counts differ: the student predicts 3 classes \(logits \(2, 3, 16, 16\)\), the teacher 5")
    pooled = nn.Sequential(*_net(16), nn.Identity()); pooled[1] = nn.MaxPool2d(2)
    _fails(learn, DistillationCallback(pooled, pairs=[('1', '1')], pi_weight=0, ho_weight=0), r"features \(2, 4, 16, 16\) and \(2, 16, 8, 8\)")
    _fails(learn, DistillationCallback(teacher, critic=Discriminator(5, nf=8, n_layers=2, attn_layers=())), 'discriminator fails on teacher maps')

def test_device_errors(tmp_path):
    learn = _learner(tmp_path)
    _fails(learn, DistillationCallback(_net(16).to('meta'), ho_weight=0), "Cannot move the teacher to the student's device cpu")
    from ranger_fastai.distill import _model_device
    learn.model[4].to('meta')  # fastai itself cannot fit such a student: check the helper before_fit uses
    with pytest.raises(ValueError, match=r'several devices \(cpu, meta\)'): _model_device(learn.model)

def test_holistic_needs_maps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g); y = (x[:, 0] > 0).long()
    dls = Datasets(range(16), tfms=[[x.__getitem__], [y.__getitem__]], splits=[range(8), range(8, 16)]).dataloaders(bs=8, num_workers=0)
    learn = Learner(dls, nn.Linear(6, 2), loss_func=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match='The holistic term needs segmentation logits'): learn.distill(nn.Linear(6, 2))
    learn.distill(nn.Linear(6, 2), holistic=False).fit(1)

# %% the critic: owned by the callback, learning, its defaults

def test_callback_alone_without_and_with_a_critic(tmp_path):
    "No critic: no holistic term and no critic columns, whatever `ho_weight`; `Critic()` alone: its discriminator is made for the student's maps"
    learn = _learner(tmp_path)
    dist = DistillationCallback(_net(16, seed=1))
    assert dist.terms == ['pi'] and dist.ho_weight > 0
    learn.fit(1, 1e-2, cbs=dist)
    names = learn.recorder.metric_names
    assert 'train_pi_loss' in names and not any('ho_loss' in n or 'w_dist' in n for n in names)
    critic = Critic()
    learn.fit(1, 1e-2, cbs=DistillationCallback(_net(16, seed=1), critic=critic))
    D = critic.discriminator
    assert isinstance(D, Discriminator) and D.n_classes == 3 and D.img_channels == 3 and critic.with_image
    assert {'train_ho_loss', 'train_w_dist', 'train_gp', 'valid_w_dist', 'valid_gp'} <= set(learn.recorder.metric_names)

def test_critic_defaults():
    "WGAN-GP's optimizer (Adam, beta1 0, beta2 0.9, no weight decay), one step per student step, a warm-up, the penalty on 8 interpolates"
    c = Critic(_disc())
    c.opt = c.opt_func(list(c.discriminator.parameters()), lr=c.lr)
    h = c.opt.hypers[0]
    assert (h['mom'], h['sqr_mom'], h['wd'], h['lr']) == (0., 0.9, 0., 1e-3)
    assert (c.n_steps, c.loss, c.gp_weight, c.gp_samples, c.warmup) == (1, 'wgan-gp', 10., 8, 0.1)
    assert c.ramp(0.) == 0. and c.ramp(0.05) == pytest.approx(0.5) and c.ramp(0.5) == 1.

class _Separable(Callback):
    "Makes the maps the critic sees separable: the teacher's logits favour class 0, the student's class 2"
    order = 4
    def before_fit(self): self.learn.distillation.teacher[4].bias.data = torch.tensor([3., 0., 0.])

def test_the_critic_learns_on_separable_maps(tmp_path):
    "Teacher maps that favour one class, student maps another: the critic's Wasserstein estimate grows within the first epoch"
    learn = _learner(tmp_path, n=96)
    critic = Critic(_disc(), lr=1e-2, n_steps=3)
    seen = []
    orig = critic.step
    def _step(*a):
        r = orig(*a); seen.append(r['w_dist'].item()); return r
    critic.step = _step
    teacher = _net(16, seed=1)
    with torch.no_grad(): teacher[4].bias.copy_(torch.tensor([4., 0., 0.])); learn.model[4].bias.copy_(torch.tensor([0., 0., 4.]))
    learn.fit(1, 0., cbs=DistillationCallback(teacher, critic=critic, ho_weight=0.))  # lr 0: the student does not move
    assert len(seen) == len(learn.dls.train) >= 8
    assert seen[-1] > seen[0] + 0.5 and seen[-1] > 0.5, seen
    w_valid = learn.recorder.values[-1][learn.recorder.metric_names.index('valid_w_dist') - 1]
    assert w_valid > 0.5

def test_generator_term_ramps_up(tmp_path):
    "The generator term's weight goes from 0 to `ho_weight` over the warm-up: the objective shows it, batch by batch"
    critic = Critic(_disc(), warmup=0.5)
    terms, orig = [], critic.generator_term
    def _gen(*a):
        g = orig(*a); terms.append(g.detach()); return g
    critic.generator_term = _gen
    class _Weights(Callback):
        order = 8
        def __init__(self): self.rows = []
        def after_loss(self):
            if self.training: self.rows.append((self.pct_train, (self.learn.loss_grad - self.learn.loss).item(), terms[-1].item()))
    learn, w = _learner(tmp_path), _Weights()
    learn.fit(2, 1e-3, cbs=[DistillationCallback(_net(16, seed=1), pi_weight=0., critic=critic, ho_weight=2.), w])
    assert len(w.rows) == 2*len(learn.dls.train) and w.rows[0][0] == 0.
    for pct, added, g in w.rows: assert added == pytest.approx(2.*min(1., pct/0.5)*g, rel=1e-4, abs=1e-6), (pct, added, g)
    assert any(pct >= 0.5 for pct, *_ in w.rows) and any(0 < pct < 0.5 for pct, *_ in w.rows)

def test_critic_copies_and_state():
    "A deep copy's optimizer steps the copy's own discriminator; a fresh critic loads a state (making its optimizer), one without a discriminator says so"
    import copy
    c = Critic(_disc())
    c.opt = c.opt_func(list(c.discriminator.parameters()), lr=c.lr)
    c2 = copy.deepcopy(c)
    assert all(p is q for p, q in zip(c2.discriminator.parameters(), (p for p, *_ in c2.opt.all_params())))
    fresh = Critic(_disc(seed=3))
    fresh.load_state_dict(c.state_dict())
    assert fresh.opt is not None and _same(_params(c.discriminator), fresh.discriminator.parameters())
    with pytest.raises(ValueError, match='no discriminator yet'): Critic().load_state_dict(c.state_dict())
    with pytest.raises(ValueError, match='no discriminator yet'): Critic().state_dict()

def test_default_critic_is_sized_for_the_teachers_maps(tmp_path):
    "The critic scores the student's maps at the teacher's size: `distill` sizes it from the teacher's logits"
    class _Up(nn.Module):  # a teacher with logits at twice the input size
        def __init__(self): super().__init__(); self.net = _net(16, seed=1)
        def forward(self, x): return nn.functional.interpolate(self.net(x), scale_factor=2)
    learn = _learner(tmp_path, size=16)  # student logits 16x16, teacher 32x32
    D = learn.distill(_Up()).distillation.critic.discriminator
    assert D.pool == 2  # critic_for(3, 32): 32 px pooled by 2
    learn.fit(1, 1e-2)
    assert 'valid_w_dist' in learn.recorder.metric_names

@pytest.mark.parametrize('hw,nodes', [((64, 64), (2, 2)), ((65, 65), (3, 3)), ((129, 257), (3, 3)), ((33, 40), (3, 2))])
def test_float_pool_gives_the_official_node_counts(hw, nodes):
    "A float `pool` pools as the official code: kernel (int(H*s), int(W*s)), stride the same, ceil mode"
    from ranger_fastai.distill import pool_nodes
    f = torch.randn(1, 2, *hw)
    official = nn.MaxPool2d(kernel_size=(int(hw[0]*0.5), int(hw[1]*0.5)), stride=(int(hw[0]*0.5), int(hw[1]*0.5)), ceil_mode=True)(f)
    out = pool_nodes(f, 0.5)
    assert out.shape[-2:] == nodes and torch.equal(out, official)

def test_imports_without_accelerate():
    "HF accelerate is an optional extra: the library, distillation included, imports without it; only fastai's distributed tools need it"
    import subprocess, sys
    code = ("import sys; sys.modules['accelerate'] = None  # as if it were not installed\n"
            "import ranger_fastai.all, ranger_fastai.cli, ranger_fastai.distributed as d\n"
            "assert d.DistributedDL is None\n"
            "try:\n    d.process_group().__enter__()\nexcept ImportError as e: assert 'ranger_fastai[distributed]' in str(e)\n"
            "else: raise AssertionError('no ImportError')\n")
    subprocess.run([sys.executable, '-c', code], check=True, timeout=300)
