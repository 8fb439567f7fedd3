"""Optimizer step time and peak memory: Ranger vs fastai's ranger, torch RAdam and fused AdamW.

Times are medians over interleaved rounds in one process; each round times a block of `k`=6 consecutive
steps per optimizer (so Lookahead synchronisations are counted at their real frequency) and reports the
time per step. Peak memory is measured in a fresh subprocess per optimizer: the rise of peak memory over
12 steps, after parameters and gradients exist: on CPU the peak resident set size (VmHWM, reset through
/proc/self/clear_refs) over the resident size before the optimizer is built, with glibc's mmap threshold
at 128 KiB so that freed tensors leave the resident set at once; on CUDA `torch.cuda.max_memory_allocated`.
It is shown in units of the parameters' size, as measured and as the difference to fused AdamW's.

`--baseline REV` (a git revision, e.g. `HEAD~1`) adds a row `Ranger (default) at REV`: `Ranger(ps, lr=1e-3)` from
`ranger_fastai/optimizer.py` as it was at REV (`git show`, written to a temporary file and imported as module
`ranger_baseline`), timed in the same interleaved rounds as the others, so both default steps are measured side by
side in one process. REV is resolved to a commit once, at the start; its peak memory is measured too (the memory
subprocess is given that commit and loads the same file). After the main table a second one gives, for the current default Ranger and the baseline, the median and
the interquartile range (25th-75th percentile) of ms/step over the rounds, and the ratio of medians current/baseline.
Run: `python bench/optimizer_step.py [--device cuda] [--rounds 15] [--baseline REV]`.
"""
import argparse, atexit, gc, importlib.util, json, os, re, shutil, statistics, subprocess, sys, tempfile, time
import torch
from torch import nn

def resnet18_params(device):
    "ResNet-18's parameters (11.7M in 62 tensors), random weights, no download"
    from torchvision.models import resnet18
    return [p.detach().to(device).requires_grad_() for p in resnet18(weights=None).parameters()]

def transformer_params(device, d=256, layers=12, vocab=8000):
    "A transformer-like set: many small tensors (norms, biases) and a few large ones (embedding, MLP)"
    shapes = [(vocab, d), (512, d)]
    for _ in range(layers):
        shapes += [(3*d, d), (3*d,), (d, d), (d,), (4*d, d), (4*d,), (d, 4*d), (d,), (d,), (d,), (d,), (d,)]
    shapes += [(d,), (d,)]
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=g) * 0.02).to(device).requires_grad_() for s in shapes]

PARAM_SETS = {'resnet18': resnet18_params, 'transformer': transformer_params}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURRENT = 'Ranger (default: fused)'

def baseline_name(rev): return f'Ranger (default) at {rev}'

def load_baseline(rev):
    "Module `ranger_baseline`: `ranger_fastai/optimizer.py` as it was at git revision `rev`"
    if 'ranger_baseline' in sys.modules: return sys.modules['ranger_baseline']
    src = subprocess.run(['git', '-C', REPO, 'show', f'{rev}:ranger_fastai/optimizer.py'], capture_output=True, text=True, check=True).stdout
    d = tempfile.mkdtemp(prefix='ranger_baseline_'); atexit.register(shutil.rmtree, d, True)
    path = os.path.join(d, 'ranger_baseline.py')
    with open(path, 'w') as f: f.write(src)
    spec = importlib.util.spec_from_file_location('ranger_baseline', path)
    mod = importlib.util.module_from_spec(spec); sys.modules['ranger_baseline'] = mod
    spec.loader.exec_module(mod)
    return mod

def make_optimizers(baseline=None, label=None):
    "name -> constructor taking a parameter list; with `baseline` (a git revision) also the default Ranger at that revision, named by `label`"
    from fastai.optimizer import ranger as fastai_ranger
    from ranger_fastai.optimizer import Ranger
    extra = {}
    if baseline: BRanger = load_baseline(baseline).Ranger; extra[baseline_name(label or baseline)] = lambda ps: BRanger(ps, lr=1e-3)
    return {
        CURRENT: lambda ps: Ranger(ps, lr=1e-3),
        **extra,
        'Ranger fused=False (foreach)': lambda ps: Ranger(ps, lr=1e-3, fused=False),
        'Ranger use_gc=True': lambda ps: Ranger(ps, lr=1e-3, use_gc=True),
        'Ranger skip_nonfinite=True': lambda ps: Ranger(ps, lr=1e-3, skip_nonfinite=True),
        'fastai ranger': lambda ps: fastai_ranger(ps, lr=1e-3),
        'torch RAdam (foreach)': lambda ps: torch.optim.RAdam(ps, lr=1e-3, foreach=True),
        'torch AdamW (fused)': lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }

def _sync(device):
    if device.startswith('cuda'): torch.cuda.synchronize()

def _with_grads(ps):
    g = torch.Generator(device=ps[0].device).manual_seed(1)
    for p in ps: p.grad = torch.randn(p.shape, generator=g, device=p.device) * 1e-3
    return ps

def time_steps(param_set, device, rounds, block=6, baseline=None, label=None):
    "Seconds per step of each optimizer in each round (a list per name), interleaved rounds of `block` steps each"
    opts = {n: mk(_with_grads(PARAM_SETS[param_set](device))) for n, mk in make_optimizers(baseline, label).items()}
    for o in opts.values():
        for _ in range(2*block): o.step()   # past RAdam's unrectified steps, and a first Lookahead sync
    times = {n: [] for n in opts}
    for _ in range(rounds):
        for n, o in opts.items():
            _sync(device); t = time.perf_counter()
            for _ in range(block): o.step()
            _sync(device); times[n].append((time.perf_counter() - t) / block)
    return times

def spread(v):
    "Median, 25th and 75th percentile of the values `v`"
    if len(v) < 2: return v[0], v[0], v[0]
    q1, q2, q3 = statistics.quantiles(v, n=4, method='inclusive')
    return q2, q1, q3

def peak_memory(param_set, device, name, baseline=None, label=None):
    "Rise of peak memory (bytes) over 12 steps of optimizer `name`, measured in this process (call in a fresh one)"
    ps = _with_grads(PARAM_SETS[param_set](device))
    mk = make_optimizers(baseline, label)[name]
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.max_memory_allocated()
    else:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        base = _proc_status_kb('VmRSS') * 1024
    opt = mk(ps)
    for _ in range(12): opt.step()
    if device.startswith('cuda'): torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated()
    else: peak = _proc_status_kb('VmHWM') * 1024
    return peak - base, sum(p.numel() * p.element_size() for p in ps)

def _proc_status_kb(key):
    "A memory figure (kB) of this process from /proc/self/status"
    return int(re.search(rf'^{key}:\s+(\d+) kB', open('/proc/self/status').read(), re.M).group(1))

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--rounds', type=int, default=15)
    ap.add_argument('--sets', default='resnet18,transformer')
    ap.add_argument('--no-memory', action='store_true')
    ap.add_argument('--baseline', metavar='REV', help="also time the default Ranger of ranger_fastai/optimizer.py at this git revision")
    ap.add_argument('--_memory', nargs=2, help=argparse.SUPPRESS)
    ap.add_argument('--_label', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._memory:
        print(json.dumps(peak_memory(a._memory[0], a.device, a._memory[1], a.baseline, a._label))); return
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, {a.rounds} rounds\n")
    label = a.baseline
    if a.baseline:   # resolved once: the memory subprocesses load the same commit even if REV (e.g. HEAD~1) moves meanwhile
        r = subprocess.run(['git', '-C', REPO, 'rev-parse', '--verify', '--quiet', f'{label}^{{commit}}'], capture_output=True, text=True)
        if r.returncode: sys.exit(f"--baseline {label}: not a commit of the repository at {REPO}")
        a.baseline = r.stdout.strip()
        print(f"baseline: ranger_fastai/optimizer.py at {label} ({a.baseline[:7]})\n")
    for s in a.sets.split(','):
        ps = PARAM_SETS[s]('cpu')
        print(f"### {s}: {sum(p.numel() for p in ps)/1e6:.1f}M parameters in {len(ps)} tensors\n")
        times = time_steps(s, a.device, a.rounds, baseline=a.baseline, label=label)
        med = {n: statistics.median(v) for n, v in times.items()}
        ref = med['torch AdamW (fused)']; fa = med['fastai ranger']
        mem = {}
        if not a.no_memory:
            for n in med:
                cmd = [sys.executable, __file__, '--device', a.device, '--_memory', s, n] + (['--baseline', a.baseline, '--_label', label] if a.baseline else [])
                out = subprocess.run(cmd, capture_output=True, text=True,
                                     check=True, env={**os.environ, 'MALLOC_MMAP_THRESHOLD_': '131072'})
                mem[n] = json.loads(out.stdout.strip().splitlines()[-1])
        print("| optimizer | ms/step (median) | x fused AdamW | fastai ranger / this | peak memory rise (x params) | minus fused AdamW's |")
        print("|---|---|---|---|---|---|")
        for n, t in med.items():
            m = (f"{mem[n][0]/mem[n][1]:.2f} | {(mem[n][0] - mem['torch AdamW (fused)'][0])/mem[n][1]:+.2f}" if n in mem else "- | -")
            print(f"| {n} | {t*1e3:.2f} | {t/ref:.2f} | {fa/t:.2f} | {m} |")
        print()
        if a.baseline: print_spread(times, baseline_name(label)); print()

def print_spread(times, base):
    "Median and interquartile range of ms/step over the rounds, current default Ranger vs the baseline, and their ratio"
    print("| optimizer | ms/step median | IQR (25th-75th pct) | median current / baseline |")
    print("|---|---|---|---|")
    sb = spread(times[base])
    for n in (CURRENT, base):
        m, q1, q3 = spread(times[n])
        print(f"| {n} | {m*1e3:.2f} | {q1*1e3:.2f}-{q3*1e3:.2f} | {m/sb[0]:.3f} |")

if __name__ == '__main__': main()
