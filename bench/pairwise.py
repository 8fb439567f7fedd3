"""Pair-wise distillation loss: the dense (HW x HW) formula vs `ranger_fastai.losses.pair_wise_loss`.

Forward + backward on CPU, N=2 images, 128 student vs 512 teacher channels, teacher features without
gradient (as in distillation), student features with gradient. Prints a table of

- time: median over `--reps` runs; the two methods run alternately (dense, ours, dense, ours, ...) after
  one warm-up each, so load from other processes hits both alike;
- extra peak memory: each (method, size) runs once in a fresh subprocess that creates its inputs, runs a
  tiny warm-up, resets the kernel's peak-RSS counter (`/proc/self/clear_refs` <- 5), runs forward +
  backward, and reports peak RSS (`VmHWM`) minus the RSS just before. glibc is told to serve every
  allocation of 128 KiB or more with mmap (`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave the resident
  set at once and RSS follows live tensor memory. This counts everything the computation allocates
  (intermediates, saved tensors, the student's gradient), not the inputs.

The dense form at 128x256 needs tens of GB: it is not run; its memory is extrapolated from the
64x128 measurement (it scales with HW^2) and printed as "n/a (needs ~X GB)".

Runs single-threaded by default: on a loaded shared machine, multi-threaded kernels wait at every barrier
for a preempted thread, which dominates small cases for both methods alike.

Usage: python bench/pairwise.py [--reps 5] [--threads 1]
"""
import argparse, os, statistics, subprocess, sys, time
import torch
import torch.nn.functional as F
from fastprogress.fastprogress import progress_bar
from ranger_fastai.losses import pair_wise_loss

SIZES = [(33, 33), (65, 65), (64, 128), (128, 256)]
N, CS, CT = 2, 128, 512
DENSE_MAX_HW = 64*128  # larger dense cases are not run

def dense_pair_wise(s, t):
    "The dense definition in float32: all HW x HW affinities of student and teacher"
    S, T = (F.normalize(f.flatten(2), dim=1) for f in (s, t))
    return ((S.transpose(1, 2) @ S - T.transpose(1, 2) @ T)**2).mean()

METHODS = {'dense': dense_pair_wise, 'ours': pair_wise_loss}

def inputs(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, CS, h, w, generator=g).relu_().requires_grad_()
    return s, torch.randn(N, CT, h, w, generator=g).relu_()

def step(fn, s, t):
    s.grad = None
    fn(s, t).backward()

def _status_kb(key):
    with open('/proc/self/status') as f: return next(int(l.split()[1]) for l in f if l.startswith(key))

def child(method, h, w):
    "Run in a fresh process: print the extra peak memory (bytes) of one forward + backward"
    fn = METHODS[method]
    step(fn, *inputs(4, 4))  # warm-up: thread pools, kernels
    s, t = inputs(h, w)
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')
    before = _status_kb('VmRSS')
    step(fn, s, t)
    print((_status_kb('VmHWM') - before) * 1024)

def extra_memory(method, h, w, threads):
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': str(128*1024), 'OMP_NUM_THREADS': str(threads)}
    out = subprocess.run([sys.executable, __file__, '--child', method, str(h), str(w)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])

def times(h, w, reps, methods):
    s, t = inputs(h, w)
    res = {m: [] for m in methods}
    for m in methods: step(METHODS[m], s, t)  # warm-up
    for _ in range(reps):
        for m in methods:
            t0 = time.perf_counter(); step(METHODS[m], s, t); res[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in res.items()}

def fmt_mb(b): return f"{b/2**20:,.0f} MB" if b < 2**30 else f"{b/2**30:.2f} GB"

def main(reps, threads):
    torch.set_num_threads(threads)
    rows, dense_per_hw2 = [], None
    for h, w in progress_bar(SIZES):
        hw = h*w
        run_dense = hw <= DENSE_MAX_HW
        methods = ['dense', 'ours'] if run_dense else ['ours']
        tm = times(h, w, reps, methods)
        mem = {m: extra_memory(m, h, w, threads) for m in methods}
        if run_dense:
            dense_per_hw2 = mem['dense'] / hw**2
            dt, dm = f"{tm['dense']:.3f}", fmt_mb(mem['dense'])
            speed, ratio = f"{tm['dense']/tm['ours']:.1f}x", f"{mem['dense']/mem['ours']:.0f}x"
        else:
            need = f"n/a (needs ~{dense_per_hw2*hw**2/2**30:.0f} GB)"
            dt, dm, speed, ratio = 'n/a', need, 'n/a', 'n/a'
        rows.append([f"{h}x{w}", f"{hw}", dt, f"{tm['ours']:.3f}", speed, dm, fmt_mb(mem['ours']), ratio])
    head = ['map', 'nodes', 'dense s', 'ours s', 'speed-up', 'dense extra mem', 'ours extra mem', 'mem ratio']
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: '| ' + ' | '.join(c.rjust(wd) for c, wd in zip(r, widths)) + ' |'
    print(f"\npair-wise loss, forward + backward, N={N}, student {CS} ch, teacher {CT} ch, float32, "
          f"{threads} thread(s), median of {reps} interleaved runs\n")
    print(line(head)); print('|' + '|'.join('-'*(wd+2) for wd in widths) + '|')
    for r in rows: print(line(r))
    print("\nextra mem: peak RSS during one forward + backward minus RSS before (inputs excluded), one subprocess per cell;"
          "\ndense 128x256 extrapolated from the 64x128 measurement (memory scales with nodes^2).")

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--reps', type=int, default=5, help='timed runs per method and size')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (1 by default: on a shared machine, barriers of\n'
                   'multi-threaded kernels wait for preempted threads and swamp the measurement)')
    p.add_argument('--child', nargs=3, metavar=('METHOD', 'H', 'W'), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child: child(a.child[0], int(a.child[1]), int(a.child[2]))
    else: main(a.reps, a.threads)
