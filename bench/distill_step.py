"""Training step time per batch with structured knowledge distillation, on the tutorial's teacher and student.

The networks are the ones `ranger-fastai distill` and the tutorial (nbs/10_tutorial_distill.ipynb) train: `SegNet`s
at the widths of `PRESETS['distill']` (teacher 16, student 8), with the same critic (the default `Critic` with
`critic_for(11, 32)`, fed maps and image), the pair-wise term on the `dec3` layers, 11 classes, 32x32 images,
batch 32: the built-in digit scenes' resolution. Batches are random tensors of those shapes (time does not depend
on their content). The "previous critic" row is the critic before the rework, for comparison in the same process:
`Discriminator(11, nf=16, n_layers=3, attn_layers=(2,), spectral=True)` at full resolution, `ranger`, the penalty on
the whole batch.

Each configuration (student alone, + pixel-wise, + pair-wise, + pair-wise with the critic's step only, + holistic)
is timed in real fastai fits: one batch is `before_batch` to `after_batch`, the first batch of each fit is dropped.
Inside those same batches, hooks time the teacher's forward pass, the critic's own step (`Critic.step`: its loss
with the gradient penalty, backward, optimizer step) and the generator term's discriminator forward and backward
(from the discriminator's output back to the student's maps, timed by tensor hooks during the student's backward).
"critic / student" is the critic's step plus the generator term's forward and backward over the student alone.
"Everything else" is what distillation adds besides those: (batch - teacher - D parts) minus the student alone,
as a share of the student alone, paired by round (each round's median minus the student's median of the same round;
the table gives the median over rounds and their range). The "critic step only" configuration (`ho_weight=0`) runs the
critic's step without the generator term: its "everything else" minus that of "+ pair-wise" is what the critic's step
costs the rest of the training step (caches and the like), beyond its own time. Configurations and thread counts are
interleaved over rounds; all numbers are medians in ms. The pixel-wise and pair-wise loss functions are also timed on their own (forward + backward).
The last column counts the process's minor page faults per batch: memory the C library handed back to the system and
the batch had to fault in (and the kernel to zero) again. `--keep-memory` calls `keep_freed_memory()` first, as the
`ranger-fastai` command does; run the script with and without it to see what the allocator costs.

Usage: python bench/distill_step.py [--rounds 7] [--batches 8] [--threads 1,2] [--device cpu] [--student-width 8] [--teacher-width 16] [--keep-memory]
(other widths show how the shares change with the size of the networks)
"""
import argparse, statistics, time
try: import resource
except ImportError: resource = None # Windows: no page-fault counts
import torch
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.losses import CrossEntropyLossFlat
from fastai.data.core import Datasets
from fastai.callback.progress import *  # Learner.no_bar
from ranger_fastai.losses import Discriminator, critic_for, pixel_wise_loss, pair_wise_loss
from ranger_fastai.distill import DistillationCallback, Critic
from ranger_fastai.optimizer import ranger
from ranger_fastai.models import SegNet
from ranger_fastai.presets import PRESETS
from ranger_fastai.memory import keep_freed_memory

SETTINGS = PRESETS['distill']['distill']
TEACHER_W, STUDENT_W, N_CLASSES, SIZE, BS = SETTINGS['teacher_width'], SETTINGS['student_width'], 11, PRESETS['distill']['scenes']['size'], PRESETS['distill']['distill_bs']
PAIR = ('dec3', 'dec3')  # run_distill's default pair

def _sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()

class _Clock:
    "Accumulates time spent in the parts of the current batch"
    def __init__(self, dev): self.dev, self.parts, self.t0 = dev, {}, {}
    def start(self, k): _sync(self.dev); self.t0[k] = time.perf_counter()
    def stop(self, k):
        if k not in self.t0: return
        _sync(self.dev); self.parts[k] = self.parts.get(k, 0.) + time.perf_counter() - self.t0.pop(k)

def _faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0

class _BatchTimer(Callback):
    "Per training batch: wall time from `before_batch` to `after_batch`, the parts `clock` timed within it, and the minor page faults"
    order = -20
    def __init__(self, clock): self.clock, self.rows = clock, []
    def before_batch(self):
        if self.training: self.clock.parts = {}; self.f0 = _faults(); self.clock.start('batch')
    def after_batch(self):
        if not self.training: return
        self.clock.stop('batch'); self.rows.append(dict(self.clock.parts, faults=_faults() - self.f0))

def instrument(teacher, critic, clock):
    "Time the teacher's forward, `critic.step`, and the generator term's D forward and D backward (to the maps)"
    teacher.register_forward_pre_hook(lambda m, i: clock.start('teacher'))
    teacher.register_forward_hook(lambda m, i, o: clock.stop('teacher'))
    in_step = [False]
    def d_pre(m, args):
        if in_step[0]: return
        clock.start('gen')
        if args[0].requires_grad: args[0].register_hook(lambda g: clock.stop('gen_bwd'))
    def d_post(m, args, out):
        if in_step[0]: return
        clock.stop('gen')
        if out.requires_grad: out.register_hook(lambda g: clock.start('gen_bwd'))
    D = critic.discriminator
    D.register_forward_pre_hook(d_pre); D.register_forward_hook(d_post)
    step = critic.step
    def timed_step(*args, **kw):
        in_step[0] = True; clock.start('d_step')
        try: return step(*args, **kw)
        finally: clock.stop('d_step'); in_step[0] = False
    critic.step = timed_step

def random_dls(n, size, bs, n_classes, device=None):
    "`DataLoaders` of `n` random images and labels (and `bs` more for validation)"
    x, y = torch.rand(n+bs, 3, size, size), torch.randint(0, n_classes, (n+bs, size, size))
    return Datasets(range(n+bs), tfms=[[x.__getitem__], [y.__getitem__]], splits=[range(n), range(n, n+bs)]).dataloaders(bs=bs, num_workers=0, device=device)

def _timed(f, dev, n):
    "Wall times of `n` calls of `f`"
    res = []
    for _ in range(n): _sync(dev); t0 = time.perf_counter(); f(); _sync(dev); res.append(time.perf_counter() - t0)
    return res

PARTS = ('teacher', 'd_step', 'gen', 'gen_bwd')

def main(rounds=7, batches=8, threads='1,2', device='cpu', student_width=STUDENT_W, teacher_width=TEACHER_W, keep_memory=False):
    kept = keep_memory and keep_freed_memory()
    dev, threads = torch.device(device), [int(t) for t in str(threads).split(',')]
    dls = random_dls(BS*(batches+1), SIZE, BS, N_CLASSES, device=dev)
    torch.manual_seed(0)
    teacher, student = SegNet(N_CLASSES, teacher_width).to(dev), SegNet(N_CLASSES, student_width).to(dev)
    critic, clock = Critic(critic_for(N_CLASSES, SIZE)), _Clock(dev)
    previous = Critic(Discriminator(N_CLASSES, nf=16, n_layers=3, attn_layers=(2,), spectral=True), opt_func=ranger, gp_samples=None)
    for c in (critic, previous): instrument(teacher, c, clock)
    learn = Learner(dls, student, loss_func=CrossEntropyLossFlat(axis=1))
    configs = {
        'student alone': [],
        '+ pixel-wise': [DistillationCallback(teacher, pa_weight=0)],
        '+ pair-wise': [DistillationCallback(teacher, pairs=[PAIR])],
        '+ pair-wise, critic step only': [DistillationCallback(teacher, ho_weight=0, pairs=[PAIR], critic=critic)], # no generator term
        '+ holistic': [DistillationCallback(teacher, pairs=[PAIR], critic=critic)],
        '+ holistic, previous critic': [DistillationCallback(teacher, pairs=[PAIR], critic=previous)],
    }
    learn.recorder.silent = True
    for k in ('+ holistic', '+ holistic, previous critic'):
        with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3, cbs=configs[k])  # warm-up
    # the loss functions alone, on the tutorial's tensors
    xb, _ = dls.one_batch()
    feats = {}
    hooks = [net.get_submodule(PAIR[0]).register_forward_hook(lambda m, i, o, k=k: feats.__setitem__(k, o.as_subclass(torch.Tensor))) for k, net in (('s', student), ('t', teacher))]
    with torch.no_grad(): t_logits = teacher(xb).as_subclass(torch.Tensor); student(xb)
    for h in hooks: h.remove()
    s_logits = student(xb).as_subclass(torch.Tensor).detach().requires_grad_()
    fs, ft = feats['s'].detach().requires_grad_(), feats['t']
    losses = {f'pixel_wise_loss fwd/bwd {tuple(s_logits.shape)}': lambda: pixel_wise_loss(s_logits, t_logits).backward(),
              f'pair_wise_loss fwd/bwd {tuple(fs.shape)} vs {tuple(ft.shape)}': lambda: pair_wise_loss(fs, ft).backward()}
    rows = {(th, k): [] for th in threads for k in configs}
    loss_times = {(th, k): [] for th in threads for k in losses}
    for _ in range(rounds):
        for th in threads:
            torch.set_num_threads(th)
            for k, cbs in configs.items():
                timer = _BatchTimer(clock)
                with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3, cbs=[*cbs, timer])
                rows[th, k].append(timer.rows[1:])  # one list per round; the first batch of a fit pays for dataloader start-up
            for k, f in losses.items(): loss_times[th, k] += _timed(f, dev, batches)
    med = lambda xs: 1e3*statistics.median(xs)
    print(f"device {dev}, batch {BS} x 3 x {SIZE} x {SIZE}, teacher width {teacher_width}, student width {student_width}, "
          f"{rounds} rounds x {batches} batches, medians in ms; freed memory {'kept (keep_freed_memory)' if kept else 'handed back (the C library default)'}")
    rest = lambda rs: [r['batch'] - sum(r.get(p, 0.) for p in PARTS) for r in rs]
    for th in threads:
        alone = rows[th, 'student alone']
        base = med([r['batch'] for rs in alone for r in rs])
        print(f"\n{th} thread{'s' if th > 1 else ''}\n")
        print("| configuration | ms / batch | teacher forward | critic step | generator term: D fwd | D bwd | critic / student | everything else (rounds' range) | % of student step | page faults / batch |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for k in configs:
            rs = [r for rr in rows[th, k] for r in rr]
            parts = [med([r.get(p, 0.) for r in rs]) for p in PARTS]
            cells = ' | '.join('-' if p == 0 else f'{p:.2f}' for p in parts)
            d_parts = sum(parts[1:])
            cells += ' | ' + ('-' if d_parts == 0 else f'{d_parts/base:.2f}x')
            # paired by round (the machine's load drifts): median of this round's rest minus the student's median of the same round
            diffs = sorted(med(rest(v)) - med([r['batch'] for r in a]) for v, a in zip(rows[th, k], alone))
            extra = '- | -' if k == 'student alone' else f'{statistics.median(diffs):.2f} ({diffs[0]:.2f} to {diffs[-1]:.2f}) | {100*statistics.median(diffs)/base:.0f}%'
            print(f"| {k} | {med([r['batch'] for r in rs]):.2f} | {cells} | {extra} | {statistics.median(r['faults'] for r in rs):.0f} |")
        pa, pad = ([med(rest(v)) - med([r['batch'] for r in a]) for v, a in zip(rows[th, k], alone)] for k in ('+ pair-wise', '+ pair-wise, critic step only'))
        d = sorted(x - y for x, y in zip(pad, pa))
        print(f"\nThe critic step's after-effect on the rest of the batch ('critic step only' minus '+ pair-wise', paired by round): {statistics.median(d):.2f} ms ({d[0]:.2f} to {d[-1]:.2f})", end='')
        for k in losses: print(f"\n{k}: {med(loss_times[th, k]):.2f} ms", end='')
        print()

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=7); p.add_argument('--batches', type=int, default=8)
    p.add_argument('--threads', default='1,2'); p.add_argument('--device', default='cpu')
    p.add_argument('--student-width', type=int, default=STUDENT_W); p.add_argument('--teacher-width', type=int, default=TEACHER_W)
    p.add_argument('--keep-memory', action='store_true', help='call `keep_freed_memory()` first (glibc), as the ranger-fastai command does')
    main(**vars(p.parse_args()))
