"""Reproducibility checks: fingerprints of the built-in data, and short seeded trainings repeated and compared.

Usage:
  python bench/reproducibility.py data [--threads N] [--stub-fastai]
      sha256 of a sample of the built-in data (scikit-learn's digits, the split, digit scenes, upscaled digits),
      with the versions that made them (the constants of tests/test_reproducible.py). --stub-fastai: import
      ranger_fastai.data with stand-ins for fastai, fastcore and fastprogress (the generator needs only numpy,
      torch and scikit-learn), for a throwaway environment with other versions and no fastai.
  python bench/reproducibility.py train [--threads N] [--runs R] [--json FILE] [--scenes N_TRAIN N_VALID] [--epochs E]
      a short `run_distill` (teacher, student, + pixel-wise, + pair-wise, + holistic; seed 0) and a short
      `run_leaderboard` (ranger and Adam, seed 0), R times in this process: metrics and losses as exact floats,
      sha256 of the trained weights, and whether the R runs are bit-identical.
  python bench/reproducibility.py compare A.json B.json
      where two `train --json` files differ: per run, the metric's and the last train loss's differences.
"""
import argparse, hashlib, json, os, platform, sys, time, types

def _sha(*arrays)->str:
    "sha256 of the bytes of `arrays` (each made contiguous), with their dtypes and shapes"
    import numpy as np
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f'{a.dtype.str}{a.shape}'.encode()); h.update(a.tobytes())
    return h.hexdigest()

def versions()->dict:
    "Versions of what the built-in data and the runs depend on"
    import numpy, torch
    v = dict(python=platform.python_version(), machine=platform.machine(), numpy=numpy.__version__, torch=torch.__version__,
             torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())
    for name, mod in (('scikit-learn', 'sklearn'), ('pillow', 'PIL'), ('fastai', 'fastai')):
        try: v[name] = getattr(__import__(mod), '__version__', None)
        except (ImportError, AttributeError): v[name] = None
    return v

def _stub_fastai():
    "Stand-ins for fastai, fastcore and fastprogress: enough for `ranger_fastai.data` to import and generate data"
    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith('__'): raise AttributeError(name)
            return (lambda *a, **k: (lambda f: f)) if name == 'delegates' else object
    for name in ('fastai', 'fastai.data', 'fastai.data.block', 'fastai.data.transforms', 'fastai.data.core', 'fastai.vision',
                 'fastai.vision.data', 'fastai.vision.augment', 'fastcore', 'fastcore.meta', 'fastprogress', 'fastprogress.fastprogress'):
        sys.modules[name] = Stub(name)

# The sample tests/test_reproducible.py pins (it imports these): the command's scene settings, at a fixed seed
SCENE_KW = dict(size=32, n_digits=(1, 2), scale=(0.55, 0.85), n_clutter=(0, 2), max_rotate=10.)

def data_fingerprints()->dict:
    "sha256 of each part of the built-in data, from its source to what the command trains on"
    from ranger_fastai.data import _digits, digit_split, digit_scenes, digit_images
    trn, val = digit_scenes(16, seed=0, split='train', **SCENE_KW), digit_scenes(16, seed=0, split='valid', **SCENE_KW)
    big = digit_scenes(8, seed=1) # the defaults: 64x64, up to four digits, clutter
    return {'sklearn digits': _sha(*_digits()),                       # scikit-learn's bundled data
            'digit_split': _sha(*digit_split()),                      # numpy's Generator: permutation
            'scene sources': _sha(trn.sources, val.sources, big.sources), # numpy's Generator: choice, integers
            'scene images and masks': _sha(trn.images, trn.masks, val.images, val.masks, big.images, big.masks), # numpy's draws, torch's grid_sample
            'digit_images(32)': _sha(digit_images(32))}               # torch's bilinear interpolate

def _train(scenes, epochs):
    "One short distillation ablation and one short leaderboard, seed 0: the runs and the trained weights' sha256"
    import torch
    from ranger_fastai.data import digit_scenes_dls, digits_dls
    from ranger_fastai.experiments import run_distill, run_leaderboard
    dls = digit_scenes_dls(n_train=scenes[0], n_valid=scenes[1], bs=32, seed=0, device='cpu', **SCENE_KW)
    models = {}
    runs = run_distill(dls, seeds=[0], epochs=epochs, teacher_epochs=epochs, teacher_width=16, student_width=8, models=models, bar=False, log=None)
    lb = run_leaderboard(digits_dls(bs=64, device='cpu'), optimizers=['ranger', 'Adam'], lrs=[1e-2], seeds=[0], epochs=epochs, bar=False, log=None)
    w = {k: _sha(*[p.detach().cpu().numpy() for p in m.state_dict().values()]) for k,m in models.items()}
    keep = lambda r: {k: r[k] for k in ('experiment', 'variant', 'optimizer', 'lr', 'seed', 'miou', 'accuracy', 'train_loss', 'valid_loss', 'time') if k in r}
    return [keep(r) for r in runs + lb], w

def _name(r): return r.get('variant') or f"{r['optimizer']} lr {r['lr']:g}"

def _metric(r): return r['miou'] if 'miou' in r else r['accuracy']

def _same(a, b)->bool:
    "Bit-identical runs: the same metrics and loss curves (times aside)"
    strip = lambda rs: [{k: v for k,v in r.items() if k != 'time'} for r in rs]
    return strip(a) == strip(b)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    d = sub.add_parser('data'); d.add_argument('--threads', type=int, default=1); d.add_argument('--stub-fastai', action='store_true')
    t = sub.add_parser('train'); t.add_argument('--threads', type=int, default=1); t.add_argument('--runs', type=int, default=2)
    t.add_argument('--json'); t.add_argument('--scenes', type=int, nargs=2, default=(1000, 200)); t.add_argument('--epochs', type=int, default=2)
    c = sub.add_parser('compare'); c.add_argument('a'); c.add_argument('b')
    a = p.parse_args()
    if a.cmd == 'compare':
        A, B = (json.load(open(f)) for f in (a.a, a.b))
        print(f"A: {A['versions']}\nB: {B['versions']}\n")
        print('| run | metric A | metric B | difference | last train loss A | B |\n|---|---|---|---|---|---|')
        for ra, rb in zip(A['runs'][0], B['runs'][0]):
            print(f"| {_name(ra)} | {_metric(ra):.6f} | {_metric(rb):.6f} | {_metric(rb) - _metric(ra):+.6f} | {ra['train_loss'][-1]:.6f} | {rb['train_loss'][-1]:.6f} |")
        print(f"\nbit-identical: {_same(A['runs'][0], B['runs'][0])}; weights identical: "
              f"{ {k: A['weights'][0][k] == B['weights'][0].get(k) for k in A['weights'][0]} }")
        sys.exit()
    if getattr(a, 'stub_fastai', False): _stub_fastai()
    import torch
    torch.set_num_threads(a.threads)
    if a.cmd == 'data':
        print(json.dumps(dict(versions=versions(), fingerprints=data_fingerprints()), indent=1))
    else:
        runs, weights, secs = [], [], []
        for i in range(a.runs):
            t0 = time.perf_counter(); r, w = _train(a.scenes, a.epochs); secs.append(time.perf_counter() - t0)
            runs.append(r); weights.append(w)
            print(f"run {i}: " + ', '.join(f"{_name(x)} {_metric(x)!r}" for x in r) + f" ({secs[-1]:.0f} s)", flush=True)
        same = all(_same(runs[0], r) and weights[0] == w for r,w in zip(runs, weights))
        print(f"{a.runs} runs in one process, {a.threads} thread(s): bit-identical {same}")
        out = dict(versions=versions(), args=vars(a), runs=runs, weights=weights, identical=same, seconds=secs)
        if a.json: json.dump(out, open(a.json, 'w'), indent=1)
