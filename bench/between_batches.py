"""How much other work between training batches slows the next batch: the student's step after nothing, after unrelated work, after a discriminator step.

`bench/distill_step.py` finds that with the discriminator's step (about 70 ms on this machine), the rest of each batch
gets slower by more than the callbacks' own work accounts for. This script asks whether any work of that length does it.
The tutorial's student is trained alone (`SegNet` width 8, batch 32 of 32x32 images, 11 classes, fastai's default
optimizer) and, after each optimizer step, a callback runs one of:
- nothing;
- about 70 ms of 64x64 matrix products (little memory);
- about 70 ms of passes over a 64 MB tensor (much more memory than the caches);
- one step of the command's discriminator (`Discriminator(11, nf=16, n_layers=3, attn_layers=(2,))`, WGAN-GP loss, `ranger`)
  on fixed maps.
The batch time excludes the inserted work. Times are the main thread's CPU time (one thread, so other processes on the
machine do not count), freed memory is kept (`keep_freed_memory()`: no page faults), the first batch of each fit is
dropped, configurations are interleaved over rounds and the slowdown is paired by round (median over rounds, range).

Usage: python bench/between_batches.py [--rounds 12] [--batches 8]
"""
import argparse, statistics, time
import torch
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.progress import *  # Learner.no_bar
from ranger_fastai.losses import Discriminator, wgan_gp_loss
from ranger_fastai.optimizer import ranger
from ranger_fastai.models import SegNet
from ranger_fastai.memory import keep_freed_memory
from distill_step import random_dls, STUDENT_W, N_CLASSES, SIZE, BS

clock = time.thread_time

class _After(Callback):
    "Runs `work` after each training step and records how long it took"
    order = 50
    def __init__(self, work): self.work, self.spent, self.times = work, 0., []
    def after_step(self):
        t0 = clock(); self.work(); t = clock() - t0
        self.spent += t; self.times.append(t)

class _BatchTimer(Callback):
    "Per training batch: CPU time from `before_batch` to `after_batch`, less what `after` spent in it"
    order = -50
    def __init__(self, after): self.after, self.rows = after, []
    def before_batch(self):
        if self.training: self.t0, self.s0 = clock(), self.after.spent
    def after_batch(self):
        if self.training: self.rows.append(clock() - self.t0 - (self.after.spent - self.s0))

def _busy(f, secs=0.07):
    "A function running `f` repeatedly for `secs` seconds of CPU time"
    def work():
        t0 = clock()
        while clock() - t0 < secs: f()
    return work

def _d_step_work():
    "One discriminator step (WGAN-GP, `ranger`) on fixed maps of the tutorial's shape"
    torch.manual_seed(0)
    D = Discriminator(N_CLASSES, nf=16, n_layers=3, attn_layers=(2,))
    opt = ranger(list(D.parameters()), lr=1e-4)
    real, fake, img = torch.rand(BS, N_CLASSES, SIZE, SIZE).softmax(1), torch.rand(BS, N_CLASSES, SIZE, SIZE).softmax(1), torch.rand(BS, 3, SIZE, SIZE)
    def work():
        loss, _ = wgan_gp_loss(D, real, fake, img)
        opt.zero_grad(); loss.backward(); opt.step(); opt.zero_grad()
    return work

def main(rounds=12, batches=8):
    keep_freed_memory(); torch.set_num_threads(1)
    dls = random_dls(BS*(batches+1), SIZE, BS, N_CLASSES)
    torch.manual_seed(0)
    learn = Learner(dls, SegNet(N_CLASSES, STUDENT_W), loss_func=CrossEntropyLossFlat(axis=1))
    learn.recorder.silent = True
    small, big = torch.randn(64, 64), torch.randn(16*1024*1024)
    works = {'nothing': lambda: None, '70 ms of 64x64 matrix products': _busy(lambda: small @ small),
             '70 ms of passes over 64 MB': _busy(lambda: big.mul_(1.0000001)), 'one discriminator step': _d_step_work()}
    res, own = {k: [] for k in works}, {k: [] for k in works}
    for r in range(rounds):
        for k in (list(works) if r % 2 == 0 else list(works)[::-1]):
            after = _After(works[k]); timer = _BatchTimer(after)
            with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3, cbs=[timer, after])
            res[k].append(1e3*statistics.median(timer.rows[1:])); own[k] += after.times
    print(f"student step (CPU time, 1 thread, {rounds} rounds x {batches} batches, medians in ms), with work after each step\n")
    print("| after each step | student step | slower than after nothing (rounds' range) | work's own time |")
    print("|---|---|---|---|")
    for k, v in res.items():
        d = sorted(a - b for a, b in zip(v, res['nothing']))
        cell = '-' if k == 'nothing' else f'{statistics.median(d):.2f} ({d[0]:.2f} to {d[-1]:.2f})'
        print(f"| {k} | {statistics.median(v):.2f} | {cell} | {'-' if k == 'nothing' else f'{1e3*statistics.median(own[k]):.2f}'} |")

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=12); p.add_argument('--batches', type=int, default=8)
    main(**vars(p.parse_args()))
