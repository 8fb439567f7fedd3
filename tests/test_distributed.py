"Two gloo processes on loopback, started here and bounded in time: `Ranger` sharded by ZeRO, distillation under DDP (fastai's `distrib_ctx` and a hand-wrapped student), the command under `torchrun`"
import io, socket, traceback
import pytest, torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer
from ranger_fastai.optimizer import Ranger

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves this module out

HP = dict(lr=1e-2, k=4, alpha=0.6, use_gc=True)

def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]

def _train(m, opt, batches):
    for x, y in batches:
        opt.zero_grad(); torch.nn.functional.mse_loss(m(x), y).backward(); opt.step()

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _worker(rank, world, port, stop, q):
    "Train with ZeRO to `stop`, save a consolidated checkpoint, resume it in a fresh model and optimizer, finish"
    try:
        torch.set_num_threads(1)
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
        batches = _batches(15)
        m = _model(); opt = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=Ranger, **HP)
        _train(m, opt, batches[:stop])
        opt.consolidate_state_dict(to=0)
        ck = [None]
        if rank == 0:
            buf = io.BytesIO(); torch.save({'model': m.state_dict(), 'opt': opt.state_dict()}, buf)
            ck = [buf.getvalue()]
        dist.broadcast_object_list(ck, src=0)
        ck = torch.load(io.BytesIO(ck[0]), weights_only=True)
        step = ck['opt']['state'][0]['step']   # read first: ZeRO's load_state_dict sets other ranks' entries to None
        m2 = _model(); m2.load_state_dict(ck['model'])
        opt2 = ZeroRedundancyOptimizer(m2.parameters(), optimizer_class=Ranger, **HP); opt2.load_state_dict(ck['opt'])
        _train(m2, opt2, batches[stop:])
        buf = io.BytesIO(); torch.save([p.detach() for p in m2.parameters()], buf)   # bytes: shared tensors would die with this process
        q.put((rank, buf.getvalue(), step))
        dist.destroy_process_group()
    except Exception:
        q.put((rank, traceback.format_exc(), None))

@pytest.mark.parametrize('stop', [8, 9])   # right after a Lookahead sync (k=4), and mid cycle
def test_zero_sharded_ranger_matches_unsharded_and_resumes(stop):
    ctx = mp.get_context('spawn'); q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, stop, q), daemon=True) for r in range(2)]
    for p in procs: p.start()
    try:
        results = dict((r, (ps, step)) for r, ps, step in (q.get(timeout=120) for _ in procs))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive(): p.kill()
    for r, (ps, step) in results.items(): assert not isinstance(ps, str), f"rank {r} failed: {ps}"
    ref = _model(); _train(ref, Ranger(ref.parameters(), **HP), _batches(15))
    for r, (ps, step) in results.items():
        assert step == stop
        for p, q_ in zip(ref.parameters(), torch.load(io.BytesIO(ps), weights_only=True)): assert torch.equal(p.detach(), q_)

# ---- structured distillation under DDP: fastai's path (`distrib_ctx`) and PyTorch's (a student wrapped by hand)

import json, math, os, signal, subprocess, sys
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from ranger_fastai.optimizer import ranger
from ranger_fastai.metrics import MeanIoU, confusion_matrix, miou_from_confusion
from ranger_fastai.losses import Discriminator
from ranger_fastai.distill import DistillationCallback, Critic

N_TRN, N_VAL, BS, EPOCHS, NAN_AT = 16, 11, 4, 2, 2 # 11 images: DistributedDL pads the validation set to 12

def _seg_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n, 16, 16), generator=g)

def _net(w, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 3, 1))

class _Probe(Callback):
    "Record the model's type during training; on rank `nan_rank` only, make the student maps of training batch `NAN_AT` NaN (before the critic's step)"
    order = 3
    def __init__(self, nan_rank=None): self.nan_rank, self.model_type = nan_rank, None
    def before_train(self): self.model_type = type(self.learn.model).__name__
    def after_step(self):
        if self.learn.train_iter == NAN_AT and dist.get_rank() == self.nan_rank:
            c = self.learn.distillation.critic
            real, fake, img = c._batch
            c._batch = (real, fake*float('nan'), img)

def _learner(dls, model, probe):
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(axis=1), opt_func=ranger, metrics=MeanIoU(3), cbs=probe)
    torch.manual_seed(2); D = Discriminator(3, nf=8, n_layers=2, attn_layers=(1,), spectral=True)
    return learn.distill(_net(8, 1), pairs=[('3', '3')], critic=Critic(D, lr=1e-3))

def _state(learn, probe):
    "Everything that must match across processes, as bytes"
    d = learn.distillation.critic
    t = learn.distillation.teacher
    res = dict(student=getattr(learn.model, 'module', learn.model).state_dict(), opt=learn.opt.state_dict(), disc=d.discriminator.state_dict(), d_opt=d.opt.state_dict(),
               teacher=t.state_dict(), teacher_grads=[p.grad for p in t.parameters()], values=learn.recorder.values,
               names=list(learn.recorder.metric_names), n_skipped=d.n_skipped, model_type=probe.model_type)
    buf = io.BytesIO(); torch.save(res, buf); return buf.getvalue()

def _ddp_worker(rank, world, port, q):
    "Distil on `world` gloo processes through fastai's `distrib_ctx`, then with a student wrapped in DDP by hand"
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), OMP_NUM_THREADS='1')
        from ranger_fastai.distributed import process_group # the gloo fix for fastai's DistributedDL
        (xt, yt), (xv, yv) = _seg_data(N_TRN, 0), _seg_data(N_VAL, 1)
        res = {}
        with process_group('cpu'):
            dls = DataLoaders.from_dsets(TensorDataset(xt, yt), TensorDataset(xv, yv), bs=BS, device='cpu', num_workers=0)
            probe = _Probe(nan_rank=1)
            learn = _learner(dls, _net(4, 0), probe)
            with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(EPOCHS, 1e-2)
            res['fastai'] = _state(learn, probe)
            # PyTorch's path: each process its own half of the data, the student wrapped before the Learner sees it
            nv = N_VAL - 1
            dls = DataLoaders.from_dsets(TensorDataset(xt[rank::world], yt[rank::world]), TensorDataset(xv[:nv][rank::world], yv[:nv][rank::world]), bs=BS, device='cpu', num_workers=0)
            probe = _Probe()
            learn = _learner(dls, DistributedDataParallel(_net(4, 0)), probe)
            learn.fit(EPOCHS, 1e-2)
            res['torch'] = _state(learn, probe)
        q.put((rank, res))
    except Exception:
        q.put((rank, traceback.format_exc()))

def _spawn(target, world=2, timeout=240):
    "Run `target(rank, world, port, q)` in `world` spawned processes; their results by rank (processes killed on failure or timeout)"
    ctx = mp.get_context('spawn'); q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, q), daemon=True) for r in range(world)]
    for p in procs: p.start()
    try: results = dict(q.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive(): p.kill()
    for r, v in results.items(): assert not isinstance(v, str), f"rank {r} failed:\n{v}"
    return results

def _same(a, b, where=''):
    "Assert `a` and `b` (nested dicts/lists of tensors and numbers) are identical"
    if isinstance(a, torch.Tensor): assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a: _same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): _same(x, y, f'{where}[{i}]')
    else: assert a == b, f'{where}: {a} != {b}'

@pytest.fixture(scope='module')
def ddp_runs():
    res = _spawn(_ddp_worker)
    return {path: [torch.load(io.BytesIO(res[r][path]), weights_only=False) for r in (0, 1)] for path in ('fastai', 'torch')}

@pytest.mark.parametrize('path', ['fastai', 'torch'])
def test_distill_states_equal_across_processes(ddp_runs, path):
    s0, s1 = ddp_runs[path]
    assert s0['model_type'] == s1['model_type'] == 'DistributedDataParallel'
    for k in ('student', 'opt', 'disc', 'd_opt', 'teacher', 'values', 'names', 'n_skipped'): _same(s0[k], s1[k], k)
    assert any(k.endswith('weight_u') for k in s0['disc']) # spectral norm's power-iteration vectors are among the buffers compared
    assert {'train_pi_loss', 'train_pa_loss', 'train_ho_loss', 'train_w_dist', 'valid_w_dist', 'train_gp', 'miou'} <= set(s0['names'])
    assert all(v is not None and math.isfinite(v) for v in s0['values'][-1])
    # the teacher is replicated, untouched, and gets no gradients
    _same(s0['teacher'], {k: v for k, v in _net(8, 1).state_dict().items()}, 'teacher vs initial')
    assert all(g is None for g in s0['teacher_grads'] + s1['teacher_grads'])
    # the student and the discriminator trained
    assert not torch.equal(s0['student']['0.weight'], _net(4, 0).state_dict()['0.weight'])
    torch.manual_seed(2); assert not torch.equal(s0['disc']['head.weight'], Discriminator(3, nf=8, n_layers=2, attn_layers=(1,), spectral=True).state_dict()['head.weight'])

def test_critic_skip_is_shared(ddp_runs):
    "Rank 1 alone saw a NaN at one batch: both processes skipped that critic step, and took all the others"
    s0, s1 = ddp_runs['fastai']
    assert s0['n_skipped'] == s1['n_skipped'] == 1
    steps = EPOCHS*N_TRN//(2*BS)
    assert {st['step'] for st in s0['d_opt']['state']} == {steps - 1}
    assert ddp_runs['torch'][0]['n_skipped'] == 0

@pytest.mark.parametrize('path', ['fastai', 'torch'])
def test_miou_is_dataset_level(ddp_runs, path):
    "Every process reports the mIoU of the whole validation set (DistributedDL's padding left out)"
    s0 = ddp_runs[path][0]
    m = _net(4, 0); m.load_state_dict(s0['student']); m.eval()
    xv, yv = _seg_data(N_VAL, 1)
    if path == 'torch': xv, yv = xv[:-1], yv[:-1]
    with torch.no_grad(): pred = m(xv)
    ref = miou_from_confusion(confusion_matrix(pred, yv, 3))[0]
    assert s0['values'][-1][s0['names'].index('miou') - 1] == pytest.approx(ref, abs=1e-12)

# ---- the command under a 2-process launch

def test_cli_under_torchrun(tmp_path):
    out = tmp_path/'kd'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'ranger_fastai', 'distill',
           '--epochs', '1', '--teacher-epochs', '1', '--seeds', '1', '--scenes', '32', '16', '--bs', '8', '--variants', '+ holistic', '--out', str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=tmp_path)
    try: log, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert p.returncode == 0, log[-3000:]
    assert log.count('Report:') == 1 and log.count('+ holistic    seed=0: mIoU') == 1, log[-3000:] # log lines from rank 0 only
    res = json.loads((out/'results.json').read_text())
    assert res['config']['processes'] == 2 and res['config']['device'] == 'cpu'
    assert [r['variant'] for r in res['runs']] == ['teacher', '+ holistic'] and all(0 <= r['miou'] <= 1 for r in res['runs'])
    assert (out/'report.md').exists() and sorted(f.name for f in out.iterdir()) == ['predictions.png', 'report.md', 'results.json']
