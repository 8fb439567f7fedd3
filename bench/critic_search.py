"""The runs that chose the critic's defaults: `ranger-fastai distill`'s teacher and '+ holistic' students with several critics.

The settings are `PRESETS['distill']` (6000 built-in digit scenes, teacher `SegNet` width 16 and students width 8,
10 epochs of `fit_flat_cos` at 1e-2 with `ranger`, pixel-wise and pair-wise on `dec3`, `ho_weight` 0.1). The teacher
is trained once (seed 0, as the command does) and kept in `--out/teacher.pth`; each configuration then trains a
student of the given seed ('pairwise' is the '+ pair-wise' student, without a critic). Every run appends a JSON
line (final mIoU, time, every column of the table by epoch) to `--out/results.jsonl` and prints its mIoU and the
critic's validation Wasserstein estimate by epoch. Run several configurations in separate processes to use more cores
(`OMP_NUM_THREADS=1` each).

Usage: python bench/critic_search.py [--seed 0] [--out bench_out] [CONFIG ...]   (no CONFIG: all)
"""
import argparse, json
from pathlib import Path
import torch
from ranger_fastai.models import SegNet
from ranger_fastai.presets import PRESETS
from ranger_fastai.experiments import distill_data, _learner, _seed, _student, _fit
from ranger_fastai.metrics import MeanIoU
from ranger_fastai.optimizer import ranger
from ranger_fastai.losses import Discriminator
from ranger_fastai.distill import Critic

def disc(spectral=False, img=3): return Discriminator(11, img, nf=16, n_layers=3, attn_layers=(), pool=2, spectral=spectral)

CONFIGS = {
    'pairwise': None,
    'wgan-gp, lr 1e-3 (default)': lambda: Critic(disc()),
    'wgan-gp, lr 1e-4': lambda: Critic(disc(), lr=1e-4),
    'wgan-gp, lr 1e-4, no warm-up': lambda: Critic(disc(), lr=1e-4, warmup=0.),
    'wgan-gp, lr 1e-4, spectral norm': lambda: Critic(disc(spectral=True), lr=1e-4),
    'hinge, lr 1e-4, spectral norm': lambda: Critic(disc(spectral=True), loss='hinge', lr=1e-4),
    'wgan-gp, lr 1e-3, maps only': lambda: Critic(disc(img=0)),
}

def main(seed=0, out='bench_out', configs=None):
    P, D = PRESETS['distill'], PRESETS['distill']['distill']
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    dls = distill_data(bs=P['distill_bs'], scenes=P['scenes'])
    _seed(dls, 0)
    teacher = _learner(dls, SegNet(11, D['teacher_width']), MeanIoU(11), ranger, None, False)
    if (out/'teacher.pth').exists(): teacher.model.load_state_dict(torch.load(out/'teacher.pth'))
    else:
        r = _fit(teacher, D['teacher_epochs'], D['lr']); torch.save(teacher.model.state_dict(), out/'teacher.pth')
        print(f"teacher: mIoU {r['metric']:.4f} ({r['time']:.0f}s)", flush=True)
    for name in configs or list(CONFIGS):
        make = CONFIGS[name]
        terms = ('pi', 'pa') if make is None else ('pi', 'pa', 'ho')
        learn = _student(dls, D['student_width'], seed, teacher.model, terms, dict(pi=1., pa=1., ho=0.1), 1., [('dec3', 'dec3')], None, 1e-3, None, False, 11)
        if make is not None: learn.distillation.critic = make()
        r = _fit(learn, D['epochs'], D['lr'])
        cols = {n: [float(v[i]) for v in learn.recorder.values] for i, n in enumerate(learn.recorder.metric_names[1:-1])}
        with open(out/'results.jsonl', 'a') as f: f.write(json.dumps(dict(name=name, seed=seed, miou=r['metric'], time=r['time'], cols=cols)) + '\n')
        w = cols.get('valid_w_dist')
        print(f"{name:34s} seed {seed}: mIoU {r['metric']:.4f} ({r['time']:.0f}s)" + (f"; valid w_dist by epoch {[round(x, 2) for x in w]}" if w else ''), flush=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seed', type=int, default=0); p.add_argument('--out', default='bench_out')
    p.add_argument('configs', nargs='*', choices=[[], *CONFIGS], metavar='CONFIG', help=f'some of {list(CONFIGS)}')
    a = p.parse_args()
    main(a.seed, a.out, a.configs)
