"""Page faults of a process that allocates and frees large tensors in cycles, with glibc's defaults and after `keep_freed_memory()`.

Each cycle writes eight tensors of 4, 8 or 12 MB and frees them. By default glibc hands the freed blocks back to the
system and the next cycles fault them in again; `keep_freed_memory()` keeps them for reuse. Each mode runs in fresh
processes (glibc's defaults: `MALLOC_*` variables and `LD_PRELOAD` removed); the table gives the minor page faults of
the last six of twelve cycles, per round, and their median. glibc only.

Usage: python bench/freed_memory.py [--rounds 3]
"""
import argparse, os, statistics, subprocess, sys

CYCLES = '''
import resource, sys, torch
if sys.argv[1] == 'keep':
    from ranger_fastai.memory import keep_freed_memory
    assert keep_freed_memory()
res = []
for i in range(12):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.ones((i % 3 + 1) << 20) for _ in range(8)]
    del xs
    res.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(*res)
'''

def faults(mode:str)->int:
    "Minor page faults of the last six cycles in a fresh process"
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_') and k != 'LD_PRELOAD'}
    out = subprocess.run([sys.executable, '-c', CYCLES, mode], capture_output=True, text=True, check=True, env=env).stdout
    return sum(int(x) for x in out.split()[-6:])

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=3)
    a = p.parse_args()
    res = {m: [faults(m) for _ in range(a.rounds)] for m in ('default', 'keep')}
    print('| allocator | page faults, last 6 cycles (per round) | median |\n|---|---|---|')
    for m, label in (('default', "glibc's defaults"), ('keep', 'keep_freed_memory()')):
        print(f"| {label} | {', '.join(map(str, res[m]))} | {statistics.median(res[m]):.0f} |")
