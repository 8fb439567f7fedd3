"""Training step time per batch with structured knowledge distillation, on the tutorial's teacher and student.

The networks and the discriminator are those of nbs/10_tutorial_distill.ipynb (widths 32 and 4, 4 classes, 32x32
images, batch 32); the batches are random tensors of the tutorial's shapes (time does not depend on their content).

Configurations, timed in real fastai fits (one batch = `before_batch` to `after_batch`), interleaved over rounds:
student alone, + pixel-wise, + pair-wise, + holistic (with the discriminator step). The teacher's forward pass,
the discriminator's step and the generator term (discriminator forward/backward through the student's maps)
are also timed on their own, so what the callbacks add besides them ("overhead") can be read off.
Prints medians in ms. Usage: python bench/distill_step.py [--rounds 5] [--batches 6] [--size 32] [--bs 32] [--device cpu]
"""
import argparse, statistics, time
import torch
from torch import nn
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.losses import CrossEntropyLossFlat
from fastai.layers import ConvLayer
from fastai.data.core import Datasets
from ranger_fastai.losses import Discriminator, generator_loss, pixel_wise_loss, pair_wise_loss
from ranger_fastai.distill import DistillationCallback, DiscriminatorCallback, _maps, _frozen

def seg_net(w, n_classes=4):
    "The tutorial's networks: features at 1/4 resolution (layer '3'), logits upsampled to the image size"
    return nn.Sequential(ConvLayer(3, w, stride=2), ConvLayer(w, 2*w), ConvLayer(2*w, 2*w, stride=2), ConvLayer(2*w, 2*w),
                         nn.Conv2d(2*w, n_classes, 1), nn.Upsample(scale_factor=4, mode='bilinear'))

def _sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()

class _BatchTimer(Callback):
    "Per training batch wall time, from `before_batch` to `after_batch`"
    order = -20
    def __init__(self): self.times = []
    def before_batch(self):
        if self.training: _sync(self.dls.device); self.t0 = time.perf_counter()
    def after_batch(self):
        if self.training: _sync(self.dls.device); self.times.append(time.perf_counter() - self.t0)

def _timed(f, dev, n):
    "Wall times of `n` calls of `f`"
    res = []
    for _ in range(n):
        _sync(dev); t0 = time.perf_counter(); f(); _sync(dev); res.append(time.perf_counter() - t0)
    return res

def random_dls(n, size, bs, n_classes=4, device=None):
    "`DataLoaders` of `n` random images and labels (and `bs` more for validation)"
    x, y = torch.rand(n+bs, 3, size, size), torch.randint(0, n_classes, (n+bs, size, size))
    return Datasets(range(n+bs), tfms=[[x.__getitem__], [y.__getitem__]], splits=[range(n), range(n, n+bs)]).dataloaders(bs=bs, num_workers=0, device=device)

def main(rounds=5, batches=6, size=32, bs=32, device='cpu'):
    dev = torch.device(device)
    dls = random_dls(bs*batches, size, bs, device=dev)
    torch.manual_seed(0)
    teacher, student = seg_net(32).to(dev), seg_net(4).to(dev)
    D = Discriminator(4, nf=16, n_layers=3, attn_layers=(2,)).to(dev)
    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(axis=1))
    dcb = DiscriminatorCallback(D)
    configs = {
        'student alone': [],
        '+ pixel-wise': [DistillationCallback(teacher, pa_weight=0, ho_weight=0)],
        '+ pair-wise': [DistillationCallback(teacher, ho_weight=0, pairs=[('3', '3')])],
        '+ holistic (D step)': [DistillationCallback(teacher, pairs=[('3', '3')]), dcb],
    }
    learn.fit(1, 1e-3, cbs=configs['+ holistic (D step)'])  # warm-up, creates the D optimizer
    xb, yb = dls.one_batch()
    with torch.no_grad(): t_logits = teacher(xb)
    s_maps, t_maps = _maps(student(xb).detach(), t_logits)
    def _gen():
        m = s_maps.clone().requires_grad_()
        with _frozen(D): generator_loss(D, m, xb).backward()
    feats = {}
    hooks = [net[3].register_forward_hook(lambda m, i, o, k=k: feats.__setitem__(k, o)) for k, net in (('s', student), ('t', teacher))]
    with torch.no_grad(): student(xb), teacher(xb)
    for h in hooks: h.remove()
    fs, ft = feats['s'].detach().requires_grad_(), feats['t']
    s_logits = student(xb).detach().requires_grad_()
    def _teacher():
        with torch.no_grad(): teacher(xb)
    learn.fit(1, 1e-3, cbs=configs['+ holistic (D step)'])  # maps for d_step: the callbacks need a fit
    parts = {'teacher forward': _teacher, 'D step (its loss, backward, step)': lambda: dcb.d_step(t_maps, s_maps, xb),
             'generator term (D fwd/bwd to the maps)': _gen,
             'pixel_wise_loss fwd/bwd': lambda: pixel_wise_loss(s_logits, t_logits).backward(),
             'pair_wise_loss fwd/bwd': lambda: pair_wise_loss(fs, ft).backward()}
    times = {k: [] for k in [*configs, *parts]}
    learn.recorder.silent = True
    for _ in range(rounds):
        for k, cbs in configs.items():
            timer = _BatchTimer()
            with learn.no_logging(): learn.fit(1, 1e-3, cbs=[*cbs, timer])
            times[k] += timer.times[1:]  # the first batch of a fit pays for dataloader start-up
        dcb.learn = learn
        for k, f in parts.items(): times[k] += _timed(f, dev, batches)
    med = {k: 1e3*statistics.median(v) for k, v in times.items()}
    base = med['student alone']
    print(f"device {dev}, batch {bs} x 3 x {size} x {size}, {rounds} rounds x {batches} batches, medians in ms")
    print(f"| configuration | ms / batch | vs student |\n|---|---|---|")
    for k in times: print(f"| {k} | {med[k]:.1f} | {med[k]/base:.2f}x |")
    tf, dstep, gen = med['teacher forward'], med['D step (its loss, backward, step)'], med['generator term (D fwd/bwd to the maps)']
    pi, pa = med['pixel_wise_loss fwd/bwd'], med['pair_wise_loss fwd/bwd']
    rows = {'+ pixel-wise': (tf, pi), '+ pair-wise': (tf, pi + pa), '+ holistic (D step)': (tf + dstep + gen, pi + pa)}
    print(f"\n| configuration | added (ms) | teacher + D parts (ms) | loss functions (ms) | rest: callback plumbing (ms) | loss functions + rest, % of student step |")
    print("|---|---|---|---|---|---|")
    for k, (fixed, losses) in rows.items():
        added = med[k] - base
        print(f"| {k} | {added:.1f} | {fixed:.1f} | {losses:.1f} | {added-fixed-losses:.1f} | {100*(added-fixed)/base:.0f}% |")

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=5); p.add_argument('--batches', type=int, default=6)
    p.add_argument('--size', type=int, default=32); p.add_argument('--bs', type=int, default=32)
    p.add_argument('--device', default='cpu')
    main(**vars(p.parse_args()))
