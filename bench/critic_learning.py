"""Does the holistic term's critic learn? Critic steps alone on fixed teacher and student maps of the built-in scenes.

A `SegNet` teacher (width 16, 3 epochs) and student (width 8, 1 epoch) are trained on 2000 digit scenes (32x32, 11
classes); their softmax maps on 40 training batches of 32 are kept. Each critic configuration then takes `--steps`
steps on them (the batches in turn), as the `Critic` of a distillation would, with nothing else moving. The table
gives the Wasserstein estimate w = mean D(teacher) - mean D(student) over the steps (the mean of 10 steps around
steps 10, 40 and the last), the gradient penalty at the end (about 1 when the critic's input gradient is near 0:
it has not started), w on the validation maps, and the time per critic step (one thread, median).

Usage: python bench/critic_learning.py [--steps 120]
"""
import argparse, statistics, time
from functools import partial
import torch
from fastai.optimizer import Adam
from ranger_fastai.models import SegNet
from ranger_fastai.presets import SCENES
from ranger_fastai.experiments import distill_data, _learner
from ranger_fastai.metrics import MeanIoU
from ranger_fastai.optimizer import ranger
from ranger_fastai.losses import Discriminator, critic_for, _scores, _penalty

def maps(dls, teacher, student, dl, n):
    "Softmax maps of teacher and student, and the images, of the first `n` batches of `dl`"
    res = []
    for i, (x, _) in enumerate(dl):
        if i == n: break
        with torch.no_grad(): res.append(tuple(m.eval()(x).float().softmax(1).as_subclass(torch.Tensor) for m in (teacher, student)) + (x.as_subclass(torch.Tensor),))
    return res

def run(D, opt_func, lr, loss, img, batches, valid, steps, gp_samples):
    torch.manual_seed(1)
    opt = opt_func(list(D.parameters()), lr=lr)
    ws, ts = [], []
    for k in range(steps):
        real, fake, x = batches[k % len(batches)]
        im = x if img else None
        t0 = time.perf_counter()
        sr, sf = _scores(D, torch.cat([real, fake]), im, 2).float().split(real.shape[0])
        w = sr.mean() - sf.mean()
        if loss == 'hinge': l, pen = torch.relu(1 - sr).mean() + torch.relu(1 + sf).mean(), None
        else: pen = _penalty(D, real, fake, im, gp_samples); l = 10*pen - w
        l.backward(); opt.step(); opt.zero_grad()
        ts.append(time.perf_counter() - t0); ws.append((w.item(), None if pen is None else pen.item()))
    with torch.no_grad():
        vw = [(lambda s: (s[0].mean() - s[1].mean()).item())(_scores(D.eval(), torch.cat([r, f]), x if img else None, 2).split(r.shape[0])) for r, f, x in valid]
    avg = lambda a, b: sum(w for w, _ in ws[a:b]) / (b - a)
    pen = None if ws[-1][1] is None else sum(p for _, p in ws[-10:]) / 10
    return dict(w10=avg(5, 15), w40=avg(35, 45), w_end=avg(steps - 10, steps), gp=pen, valid=sum(vw) / len(vw), ms=1e3*statistics.median(ts))

def main(steps=120):
    torch.set_num_threads(1)
    dls = distill_data(scenes=dict(SCENES, n_train=2000, n_valid=200))
    torch.manual_seed(0)
    t = _learner(dls, SegNet(11, 16), MeanIoU(11), ranger, None, False); t.fit_flat_cos(3, 1e-2)
    s = _learner(dls, SegNet(11, 8), MeanIoU(11), ranger, None, False); s.fit_flat_cos(1, 1e-2)
    batches, valid = maps(dls, t.model, s.model, dls.train, 40), maps(dls, t.model, s.model, dls.valid, 10)
    A0 = partial(Adam, mom=0., sqr_mom=0.9, wd=0.)
    C = 11
    configs = {
        'previous: SN, nf 16, attention, full size, ranger, lr 1e-4': (lambda: Discriminator(C, nf=16, n_layers=3, attn_layers=(2,), spectral=True), ranger, 1e-4, 'wgan-gp', True, None),
        'SN, pool 2, Adam(0, 0.9), lr 1e-4': (lambda: Discriminator(C, nf=16, n_layers=3, attn_layers=(), pool=2, spectral=True), A0, 1e-4, 'wgan-gp', True, 8),
        'default `critic_for(11, 32)`, Adam(0, 0.9), lr 1e-4': (lambda: critic_for(C, 32), A0, 1e-4, 'wgan-gp', True, 8),
        'default, lr 1e-3': (lambda: critic_for(C, 32), A0, 1e-3, 'wgan-gp', True, 8),
        'default without the image': (lambda: critic_for(C, 32, img_channels=0), A0, 1e-4, 'wgan-gp', False, 8),
        'default at full size (pool 1)': (lambda: Discriminator(C, nf=16, n_layers=3, attn_layers=(), spectral=False), A0, 1e-4, 'wgan-gp', True, 8),
        'default, nf 8': (lambda: Discriminator(C, nf=8, n_layers=3, attn_layers=(), pool=2, spectral=False), A0, 1e-4, 'wgan-gp', True, 8),
        'hinge, SN, pool 2, lr 1e-4': (lambda: Discriminator(C, nf=16, n_layers=3, attn_layers=(), pool=2, spectral=True), A0, 1e-4, 'hinge', True, None),
    }
    print(f"teacher mIoU {t.recorder.values[-1][-1]:.3f}, student {s.recorder.values[-1][-1]:.3f}; {steps} critic steps, batch 32, one thread\n")
    print('| critic | w, steps 5-15 | w, steps 35-45 | w, last 10 | gp, last 10 | w, validation | ms / step |')
    print('|---|---|---|---|---|---|---|')
    for k, (mk, of, lr, loss, img, gps) in configs.items():
        torch.manual_seed(0)
        r = run(mk(), of, lr, loss, img, batches, valid, steps, gps)
        gp = '-' if r['gp'] is None else f"{r['gp']:.3f}"
        print(f"| {k} | {r['w10']:.3f} | {r['w40']:.3f} | {r['w_end']:.3f} | {gp} | {r['valid']:.3f} | {r['ms']:.1f} |", flush=True)
    print('\n(hinge: w is on another scale, the hinge loss saturates at |D| = 1)')

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=120)
    main(**vars(p.parse_args()))
