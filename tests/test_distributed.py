"`Ranger` sharded by `torch.distributed.optim.ZeroRedundancyOptimizer`: two gloo processes on loopback"
import io, socket, traceback
import pytest, torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer
from ranger_fastai.optimizer import Ranger

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
