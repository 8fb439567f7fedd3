"""Time to generate the built-in digit scenes: `digit_scenes(n, size)`, median of a few rounds, one thread.

Usage: python bench/scene_generation.py [--rounds 3]
"""
import argparse, statistics, time
import torch
from ranger_fastai.data import digit_scenes

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    print('| scenes | size | seconds (per round) | median | scenes / s |\n|---|---|---|---|---|')
    for n, size in ((1000, 32), (1000, 64)):
        ts = []
        for r in range(a.rounds):
            t0 = time.perf_counter(); digit_scenes(n, size=size, seed=9 + r); ts.append(time.perf_counter() - t0)
        m = statistics.median(ts)
        print(f"| {n} | {size} | {', '.join(f'{t:.2f}' for t in ts)} | {m:.2f} | {n / m:.0f} |")
