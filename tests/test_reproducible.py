"""Reproducibility: the built-in data is pinned (a dependency or kernel change that alters it fails here, naming what
changed), and the experiments' seeding makes a short training repeat bit for bit in one process.

What is and is not promised across thread counts, versions and machines is measured in bench/README.md
("Reproducibility"); `python bench/reproducibility.py data` prints the fingerprints below for this environment."""
import platform
from pathlib import Path
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from ranger_fastai.data import digit_split, digit_scenes, digit_scenes_dls, digits_dls
from ranger_fastai.experiments import run_distill, run_leaderboard
from ranger_fastai.presets import VARIANTS

def _bench():
    "bench/reproducibility.py, which computes the fingerprints (and prints them for a new environment)"
    import importlib.util
    spec = importlib.util.spec_from_file_location('reproducibility', Path(__file__).parents[1]/'bench'/'reproducibility.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

_b = _bench()
_sha, SCENE_KW, _fingerprints = _b._sha, _b.SCENE_KW, _b.data_fingerprints

# ---- the built-in data

MEASURED_WITH = ("Python 3.11.7 on x86_64 (AMD EPYC, torch's AVX2 kernels, 1 and 2 threads) with numpy 2.4.6, torch 2.14.1+cu130, "
                 "scikit-learn 1.9.1, pillow 13.0.0; the same values with numpy 1.26.4, torch 2.13.0+cpu, scikit-learn 1.2.2, pillow 9.5.0")
PINNED = {
    'sklearn digits': '5799c97b6c540ff1565093e5ec28cc86bcdfe8850560f9965f1a2f2589f031b0',
    'digit_split': 'b0c2f9f74b29d3f739037445bb194dcb684e36033aa24b2cd0b3afc5df7603bd',
    'scene sources': 'a810ff316cf3c0848e6c1b16db70692dd0178b6c69fcd94479c4276858ec7886',
    'scene images and masks': '58768cfe7902e30005553c34dcde5d38888927b923cd990db93177e4b84089f3',
    'digit_images(32)': '505dbead84dd6c0f63db8d4e45938337108f3c6b2f462b21303e15a9b87793cc',
}
# torch's vector kernels round some interpolated pixels differently from its scalar ones (ATEN_CPU_CAPABILITY=default,
# as on a CPU without AVX2): 0.12% of digit_images' values by 1/255; the scene sample above is the same with both
BY_KERNELS = {'AVX2': {}, 'DEFAULT': {'digit_images(32)': '75943725af714b4ff1d0597c9365675b14f0cc603614e16e61d5b7913002d6b8'}}

def _versions()->str:
    import sklearn, PIL
    return (f"Python {platform.python_version()} on {platform.machine()} (torch's {torch.backends.cpu.get_cpu_capability()} kernels, "
            f"{torch.get_num_threads()} threads) with numpy {np.__version__}, torch {torch.__version__}, scikit-learn {sklearn.__version__}, pillow {PIL.__version__}")

@pytest.fixture
def threads():
    "Set torch's thread count inside a test (`threads(n)`); restored after"
    n = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(n)

def test_builtin_data_is_pinned(threads):
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in BY_KERNELS: pytest.skip(f"fingerprints not measured with torch's {cap} kernels: run `python bench/reproducibility.py data` and add them to BY_KERNELS")
    want = {**PINNED, **BY_KERNELS[cap]}
    for n in (1, 2):
        threads(n)
        got = _fingerprints()
        changed = [k for k in want if got[k] != want[k]]
        assert not changed, (f"The built-in data changed ({', '.join(changed)}) with {_versions()}; the pinned values were made with "
                             f"{MEASURED_WITH}. A dependency (numpy's Generator, torch's kernels, scikit-learn's digits) or the generator "
                             f"changed: results measured on the old data do not reproduce on this one. New values: "
                             + ', '.join(f'{k}: {got[k]}' for k in changed))

def test_fingerprint_sees_a_changed_seed():
    "The fingerprint is not blind: another seed or split changes it"
    a = digit_scenes(16, seed=0, split='train', **SCENE_KW)
    for b in (digit_scenes(16, seed=1, split='train', **SCENE_KW), digit_scenes(16, seed=0, split='valid', **SCENE_KW)):
        assert _sha(a.images, a.masks) != _sha(b.images, b.masks) and _sha(a.sources) != _sha(b.sources)
    assert _sha(*digit_split(split_seed=0)) != _sha(*digit_split(split_seed=1))

# ---- seeded training

class _Record(Callback):
    "For each fit: the sha256 of the model's initial state and of each training batch's inputs"
    def __init__(self): self.fits = []
    def before_fit(self):
        self.fits.append(dict(init=_sha(*[v.detach().cpu().numpy() for v in self.learn.model.state_dict().values()]), batches=[]))
    def before_batch(self):
        if self.training: self.fits[-1]['batches'].append(_sha(self.learn.xb[0].cpu().numpy()))

def _state(m): return [v.detach().clone() for v in m.state_dict().values()]

def _same_state(a, b)->bool: return len(a) == len(b) and all(torch.equal(x, y) for x,y in zip(a, b))

def _distill(dls, seeds=(0,)):
    "A tiny ablation with every variant: its runs (metrics and curves, times dropped), final weights, and what each fit saw"
    rec, models = _Record(), {}
    runs = run_distill(dls, seeds=list(seeds), epochs=1, teacher_epochs=1, teacher_width=4, student_width=2, cbs=[rec], models=models, bar=False, log=None)
    return [{k: v for k,v in r.items() if k != 'time'} for r in runs], {k: _state(m) for k,m in models.items()}, rec.fits

@pytest.fixture(scope='module')
def scenes():
    return digit_scenes_dls(n_train=64, n_valid=32, size=16, bs=16, seed=0, device='cpu', **{k: v for k,v in SCENE_KW.items() if k != 'size'})

def test_distill_repeats_bit_for_bit(scenes, threads):
    threads(1)
    runs1, w1, fits1 = _distill(scenes)
    runs2, w2, fits2 = _distill(scenes) # the same DataLoaders, after a run: the seeding must reset their batch order
    assert [r['variant'] for r in runs1] == ['teacher', *VARIANTS]
    assert fits1 == fits2, "a repeated run started from other weights or saw other batches: the seeding (experiments._seed) did not reset them"
    assert runs1 == runs2, "a repeated run gave other metrics or losses" # mIoU, train and valid losses: exact floats
    for k in w1: assert _same_state(w1[k], w2[k]), f"{k}: other final weights in the repeated run"
    # every variant of a seed starts from the same weights and sees the same batches, in the teacher's order (seed 0 too)
    students = fits1[1:]
    assert len({f['init'] for f in students}) == 1, "the variants of one seed start from different weights"
    assert len(fits1[0]['batches']) == 4 and all(f['batches'] == fits1[0]['batches'] for f in students), \
        "the variants of one seed see different batches (something draws from the loaders' generator between the seeding and the fit)"
    assert _sha(*[v.numpy() for v in w1['student']]) != fits1[1]['init'] # it trained: nothing repeats because nothing happened

def test_distill_seed_matters(scenes, threads):
    "Another seed gives other weights and batches: the repeat above is the seeding's doing"
    threads(1)
    runs, _, fits = _distill(scenes, seeds=(0, 1))
    s0, s1 = fits[1:1+len(VARIANTS)], fits[1+len(VARIANTS):]
    assert s0[0]['init'] != s1[0]['init'] and s0[0]['batches'] != s1[0]['batches']
    assert runs[1]['miou'] != runs[1+len(VARIANTS)]['miou'] or runs[1]['train_loss'] != runs[1+len(VARIANTS)]['train_loss']

def test_leaderboard_repeats_bit_for_bit(threads):
    threads(1)
    dls = digits_dls(size=16, bs=256, device='cpu') # augmented: the batch transforms draw from the seeded generators
    go = lambda: [{k: v for k,v in r.items() if k != 'time'} for r in run_leaderboard(dls, optimizers=['ranger'], lrs=[1e-2], seeds=[0, 1], epochs=1, bar=False, log=None)]
    a, b = go(), go()
    assert a == b # accuracy, train and valid losses: exact floats
    assert a[0]['train_loss'] != a[1]['train_loss'] # seeds 0 and 1 differ
