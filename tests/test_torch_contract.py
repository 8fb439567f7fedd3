"""`Ranger` and `TorchLookahead` against the behaviours PyTorch expects of every `torch.optim.Optimizer`.

Written from the contract that torch's own optimizer tests check for its built-in optimizers: state-dict
round trips (named and unnamed parameters, `weights_only=True`), copies, hooks, param groups added later,
schedulers, parameter layouts and dtypes, tensor learning rates and `torch.compile`. Each test runs on the
CPU and, where there is one, on a CUDA GPU (test ids ending in `cuda`; `pytest -k cuda` selects those).
"""
import copy, io, pickle
from unittest import mock
import pytest, torch
from torch import nn
import ranger_fastai.optimizer as rmod
from ranger_fastai.optimizer import Ranger, TorchLookahead

CUDA = torch.cuda.is_available()
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not CUDA, reason='no CUDA GPU'))]

# k=5 so that a run stopped after 7 steps stops mid Lookahead cycle, and 12 steps hold two syncs
OPTS = {
    'ranger': lambda ps: Ranger(ps, lr=1e-2, k=5),
    'lookahead_adamw': lambda ps: TorchLookahead(torch.optim.AdamW(ps, lr=1e-2), k=5),
    'lookahead_sgd': lambda ps: TorchLookahead(torch.optim.SGD(ps, lr=1e-2, momentum=0.9), k=5),
}

def _model(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4*4*4, 3)).to(device)

def _loss(model, i):
    "A loss that depends on the step `i`, so every step has other gradients"
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(5, 2, 6, 6, generator=g), torch.randn(5, 3, generator=g)
    dev = next(model.parameters()).device
    return nn.functional.mse_loss(model(x.to(dev)), y.to(dev))

def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()

def _flat(model): return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])

def _equal(a, b): assert torch.equal(_flat(a), _flat(b))

@pytest.fixture(params=list(OPTS))
def make_opt(request): return OPTS[request.param]

# --- state dicts ----------------------------------------------------------------------------------

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('named', [False, True], ids=['unnamed', 'named'])
def test_state_dict_round_trip_then_continue_identical(make_opt, named, device):
    params = lambda m: m.named_parameters() if named else m.parameters()
    ref = _model(device); o = make_opt(params(ref)); _train(ref, o, 12)
    m1 = _model(device); o1 = make_opt(params(m1)); _train(m1, o1, 7)
    buf = io.BytesIO(); torch.save(dict(model=m1.state_dict(), opt=o1.state_dict()), buf); buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    if named: assert ck['opt']['param_groups'][0]['param_names'] == [n for n,_ in m1.named_parameters()]
    m2 = _model(device, seed=1); o2 = make_opt(params(m2))
    m2.load_state_dict(ck['model']); o2.load_state_dict(ck['opt'])
    _train(m2, o2, 5, start=7)
    _equal(ref, m2)

def test_ranger_named_parameters_match_unnamed():
    m1, m2 = _model('cpu'), _model('cpu')
    o1, o2 = Ranger(m1.named_parameters(), lr=1e-2), Ranger(m2.parameters(), lr=1e-2)
    _train(m1, o1, 8); _train(m2, o2, 8)
    _equal(m1, m2)
    o3 = Ranger([dict(params=list(m1[0].named_parameters()), lr=1e-3), dict(params=list(m1[3].named_parameters()))], lr=1e-2)
    assert [g['param_names'] for g in o3.param_groups] == [['weight', 'bias'], ['weight', 'bias']]
    with pytest.raises(TypeError, match='int'): Ranger([('w', 3)])

def test_ranger_group_without_newer_keys_loads_with_defaults():
    "A state dict saved by a version without `fused`/`maximize` in its groups still loads and steps"
    m = _model('cpu'); o = Ranger(m.parameters(), lr=1e-2); _train(m, o, 3)
    sd = copy.deepcopy(o.state_dict())   # torch's state dicts share the optimizer's tensors
    for g in sd['param_groups']: del g['fused'], g['maximize']
    m2 = copy.deepcopy(m); o2 = Ranger(m2.parameters(), lr=1e-2, fused=False)
    o2.load_state_dict(sd)
    assert o2.param_groups[0]['fused'] is False and o2.param_groups[0]['maximize'] is False
    _train(m, o, 4, start=3); _train(m2, o2, 4, start=3)
    assert torch.allclose(_flat(m), _flat(m2), rtol=1e-5, atol=1e-7)

# --- copies ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_copy_then_continue_identical(make_opt, how, device):
    m = _model(device); o = make_opt(m.parameters()); _train(m, o, 7)
    m2, o2 = copy.deepcopy((m, o)) if how == 'deepcopy' else pickle.loads(pickle.dumps((m, o)))
    assert type(o2) is type(o) and len(o2.param_groups) == len(o.param_groups)
    assert o2.param_groups[0]['params'][0] is next(m2.parameters())
    _train(m, o, 5, start=7); _train(m2, o2, 5, start=7)
    _equal(m, m2)
    m3 = _model(device); o3 = make_opt(m3.parameters()); _train(m3, o3, 2)  # a new optimizer still steps after the copy

# --- hooks ----------------------------------------------------------------------------------------

def test_lookahead_runs_the_wrapped_optimizers_own_state_dict():
    "A wrapped optimizer with its own `state_dict`/`load_state_dict` (as ZeroRedundancyOptimizer) keeps them"
    class Counting(torch.optim.SGD):
        calls = []
        def state_dict(self): self.calls.append('sd'); return super().state_dict()
        def load_state_dict(self, sd): self.calls.append('load'); super().load_state_dict(sd)
    m = _model('cpu'); o = TorchLookahead(Counting(m.parameters(), lr=1e-2))
    _train(m, o, 2); o.load_state_dict(o.state_dict())
    assert Counting.calls == ['sd', 'load']

def test_step_and_state_dict_hooks(make_opt):
    m = _model('cpu'); o = make_opt(m.parameters())
    calls = []
    h = [o.register_step_pre_hook(lambda opt, a, kw: calls.append(('pre', opt))),
         o.register_step_post_hook(lambda opt, a, kw: calls.append(('post', opt))),
         o.register_state_dict_pre_hook(lambda opt: calls.append(('sd_pre', opt))),
         o.register_state_dict_post_hook(lambda opt, sd: {**sd, 'extra': 1}),
         o.register_load_state_dict_pre_hook(lambda opt, sd: calls.append(('load_pre', opt))),
         o.register_load_state_dict_post_hook(lambda opt: calls.append(('load_post', opt)))]
    _train(m, o, 2)
    assert calls == [('pre', o), ('post', o)] * 2
    calls.clear()
    sd = o.state_dict()
    assert sd['extra'] == 1 and calls == [('sd_pre', o)]
    calls.clear()
    o.load_state_dict({k: v for k,v in sd.items() if k != 'extra'})
    assert calls == [('load_pre', o), ('load_post', o)]
    for x in h: x.remove()
    calls.clear(); _train(m, o, 1); o.state_dict()
    assert calls == []

# --- param groups added later -----------------------------------------------------------------------

def test_add_param_group_after_steps(make_opt):
    "A group added after 3 steps starts its own state then: the same as a second optimizer started at that step"
    m = _model('cpu'); o = make_opt(m[0].parameters())
    r = copy.deepcopy(m); ra = make_opt(r[0].parameters())
    rb = None
    for i in range(12):
        if i == 3:
            o.add_param_group(dict(params=m[3].parameters(), lr=3e-3))
            rb = make_opt(r[3].parameters()); rb.param_groups[0]['lr'] = 3e-3
        for mm, opts in ((m, [o]), (r, [ra] + ([rb] if rb else []))):
            for x in opts: x.zero_grad()
            _loss(mm, i).backward()
            for x in opts: x.step()
    _equal(m, r)
    assert len(o.state_dict()['param_groups']) == 2

# --- schedulers -----------------------------------------------------------------------------------

def _mom_key(o): return 'betas' if 'betas' in o.param_groups[0] else 'momentum'

SCHEDULERS = {
    'OneCycleLR': lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=2e-2, total_steps=12, cycle_momentum=True),
    'CyclicLR': lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-3, 2e-2, step_size_up=3, cycle_momentum=True,
                                                            base_momentum=0.8, max_momentum=0.95),
    'ReduceLROnPlateau': lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}

@pytest.mark.parametrize('sched', list(SCHEDULERS))
def test_scheduler_drives_the_update(make_opt, sched):
    "A scheduler's values (lr, beta1 or momentum) are the ones the step uses: same result as setting them by hand"
    m = _model('cpu'); o = make_opt(m.parameters()); s = SCHEDULERS[sched](o)
    key, seen = _mom_key(o), []
    for i in range(12):
        seen.append((o.param_groups[0]['lr'], o.param_groups[0][key]))
        o.zero_grad(); loss = _loss(m, i); loss.backward(); o.step()
        s.step(1.0) if sched == 'ReduceLROnPlateau' else s.step()   # a loss that never improves
    assert len({lr for lr,_ in seen}) > 1
    if sched != 'ReduceLROnPlateau': assert len({mom for _,mom in seen}) > 1
    m2 = _model('cpu'); o2 = make_opt(m2.parameters())
    for i,(lr, mom) in enumerate(seen):
        o2.param_groups[0]['lr'], o2.param_groups[0][key] = lr, mom
        _train(m2, o2, 1, start=i)
    _equal(m, m2)

# --- layouts ----------------------------------------------------------------------------------------

def _strided(dev):
    base = torch.randn(4, 5, 2, device=dev)
    return base, nn.Parameter(base[..., 0]), None
def _transposed(dev):
    base = torch.randn(5, 4, device=dev)
    return base, nn.Parameter(base.t()), lambda g: g.contiguous()   # its gradient in another layout
def _channels_last(dev):
    w = torch.randn(4, 3, 3, 3, device=dev).contiguous(memory_format=torch.channels_last)
    return None, nn.Parameter(w), lambda g: g.contiguous(memory_format=torch.channels_last)
def _permuted(dev):
    base = torch.randn(3, 4, 5, device=dev)
    return base, nn.Parameter(base.permute(2, 0, 1)), lambda g: torch.empty_like(base.permute(2, 0, 1)).copy_(g)   # same strides
def _zero_size(dev): return None, nn.Parameter(torch.zeros(0, 3, device=dev)), None
def _zero_dim(dev): return None, nn.Parameter(torch.tensor(0.5, device=dev)), None

LAYOUTS = {'strided': (_strided, False), 'transposed': (_transposed, False), 'channels_last': (_channels_last, True),
           'permuted': (_permuted, True),
           'zero_size': (_zero_size, True), 'zero_dim': (_zero_dim, True)}

def _layout_run(make, device, steps=12, **kw):
    "The parameter, its base and a copy of the base from before, after `steps` Ranger steps with seeded gradients"
    torch.manual_seed(0)
    base, p, regrad = make(device)
    base0 = None if base is None else base.clone()
    opt = Ranger([p], lr=1e-2, k=5, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grad = torch.randn(p.shape, generator=g).to(device)
        p.grad = regrad(grad) if regrad else grad
        opt.step()
    return p.detach(), base, base0

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_layouts_default_equals_foreach_and_base_untouched(layout, device):
    make, fusable = LAYOUTS[layout]
    with mock.patch.object(rmod, '_fused_update', wraps=rmod._fused_update) as fused:
        p, base, base0 = _layout_run(make, device)
    assert fused.called == fusable
    q, *_ = _layout_run(make, device, fused=False)
    if fusable: assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    else: assert torch.equal(p, q)
    if base is not None:
        keep = torch.ones_like(base, dtype=torch.bool)
        if layout == 'strided': keep[..., 0] = False
        else: keep[:] = False   # the parameter is a view of all of its base
        assert torch.equal(base[keep], base0[keep])   # nothing outside the parameter was written

# --- dtypes ---------------------------------------------------------------------------------------

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', list(TOL), ids=lambda d: str(d).split('.')[-1])
def test_dtypes_follow_a_float64_run(dtype, device):
    "Fused (default) and foreach steps in each dtype stay within that dtype's precision of the same run in float64"
    def run(dt, **kw):
        m = _model(device).to(dt); o = Ranger(m.parameters(), lr=1e-2, k=5, **kw)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            for p in m.parameters(): p.grad = torch.randn(p.shape, generator=g).to(device, dt)
            o.step()
        assert all(o.state[p]['exp_avg'].dtype == dt for p in m.parameters())
        return _flat(m).double()
    ref = run(torch.float64)
    for kw in ({}, dict(fused=False)):
        out = run(dtype, **kw)
        assert ((out - ref).norm() / ref.norm()).item() < TOL[dtype]

# --- tensor learning rates ------------------------------------------------------------------------

@pytest.mark.parametrize('device', DEVICES)
def test_tensor_lr_equals_float_lr(make_opt, device):
    m1, m2 = _model(device), _model(device)
    o1, o2 = make_opt(m1.parameters()), make_opt(m2.parameters())
    o2.param_groups[0]['lr'] = torch.tensor(o1.param_groups[0]['lr'])
    _train(m1, o1, 12); _train(m2, o2, 12)
    assert torch.allclose(_flat(m1), _flat(m2), rtol=1e-6, atol=1e-8)

def test_tensor_lr_with_more_than_one_element_is_refused_by_name():
    m = _model('cpu')
    with pytest.raises(ValueError, match='lr'): Ranger(m.parameters(), lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match='lr=-1'): Ranger(m.parameters(), lr=torch.tensor(-1.))
    o = Ranger(m.parameters(), lr=1e-2); _train(m, o, 2)
    before = _flat(m); o.param_groups[0]['lr'] = torch.ones(2)
    o.zero_grad(); _loss(m, 0).backward()
    with pytest.raises(ValueError, match='lr'): o.step()
    assert torch.equal(before, _flat(m)) and o.state[next(m.parameters())]['step'] == 2

# --- maximize -------------------------------------------------------------------------------------

@pytest.mark.parametrize('fused', [None, False])
def test_maximize_equals_minimizing_the_negated_loss(fused):
    m1, m2 = _model('cpu'), _model('cpu')
    o1, o2 = Ranger(m1.parameters(), lr=1e-2, maximize=True, fused=fused), Ranger(m2.parameters(), lr=1e-2, fused=fused)
    for i in range(12):
        for m,o,sign in ((m1, o1, -1), (m2, o2, 1)):
            o.zero_grad(); (sign*_loss(m, i)).backward(); o.step()
    assert torch.allclose(_flat(m1), _flat(m2), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match='maximize=1'): Ranger(m1.parameters(), maximize=1)

# --- torch.compile --------------------------------------------------------------------------------

def _compile_case(make_opt, backend, device, tol):
    from torch._dynamo.utils import counters   # test only: how many graphs dynamo built
    torch._dynamo.reset(); counters.clear()
    m1, m2 = _model(device), _model(device)
    o1, o2 = make_opt(m1.parameters()), make_opt(m2.parameters())
    step = torch.compile(o2.step, backend=backend)
    for i in range(14):   # past the unrectified steps, two Lookahead syncs
        for m,o,st in ((m1, o1, o1.step), (m2, o2, step)):
            o.zero_grad(); _loss(m, i).backward(); st()
    assert torch.allclose(_flat(m1), _flat(m2), rtol=tol, atol=tol/10)
    assert counters['stats']['unique_graphs'] <= 4, dict(counters['stats'])   # no new graph per step

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('backend', ['aot_eager', 'inductor'])
def test_compiled_ranger_step_equals_eager(backend, device):
    _compile_case(OPTS['ranger'], backend, device, tol=1e-6)

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', ['lookahead_adamw', 'lookahead_sgd'])
def test_compiled_lookahead_step_equals_eager(name, device):
    _compile_case(OPTS[name], 'aot_eager', device, tol=1e-4)   # torch's compiled AdamW alone differs from eager by ~3e-6 relative

# --- the private torch calls that remain ------------------------------------------------------------

def test_private_torch_calls_still_exist_and_agree_with_fallbacks():
    "Fails loudly when a torch upgrade drops or changes the one private call left (the fallback then runs)"
    assert rmod._amp_check is torch._amp_foreach_non_finite_check_and_unscale_
    cases = [[torch.ones(3), torch.tensor([1., float('nan')])], [torch.tensor([1e38, -1e38])], [torch.tensor([-float('inf')])]]
    for grads in cases:
        fast = rmod._has_nonfinite(grads)
        with mock.patch.object(rmod, '_amp_check', None): slow = rmod._has_nonfinite(grads)
        assert fast == slow
    assert [rmod._has_nonfinite(c) for c in cases] == [True, False, True]
    assert rmod._has_fused_adam('cpu') and not rmod._has_fused_adam('meta')
    assert rmod._kernels == (torch._fused_adam_, torch._fused_adamw_)   # the fused kernels' arguments are the expected ones

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('decouple_wd', [True, False])
def test_fused_kernel_call_equals_torch_functional_fused_adam(decouple_wd, device):
    "The direct kernel call and its fallback, torch's public functional Adam with `fused=True`, give the same steps"
    runs, fn = [], 'adamw' if decouple_wd else 'adam'
    for kernels in (rmod._kernels, None):
        m = _model(device); o = Ranger(m.parameters(), lr=1e-2, k=5, decouple_wd=decouple_wd)
        with mock.patch.object(rmod, '_kernels', kernels), mock.patch.object(rmod, fn, wraps=getattr(rmod, fn)) as functional:
            _train(m, o, 12)
        assert functional.called == (kernels is None)
        runs.append(_flat(m))
    assert torch.equal(*runs)

def test_fused_step_counts_are_float32_whatever_the_default_dtype():
    "Fused kernels read float32 step counts (on CUDA as raw memory): they must not follow `torch.set_default_dtype`"
    seen = []
    kernels = tuple(lambda *a, _k=k, **kw: (seen.append(a[5][0].dtype), _k(*a, **kw)) for k in rmod._kernels)
    old = torch.get_default_dtype(); torch.set_default_dtype(torch.float64)
    try:
        for ks in (kernels, None):
            p = nn.Parameter(torch.ones(3, dtype=torch.float32)); o = Ranger([p], lr=1e-2)
            with mock.patch.object(rmod, '_kernels', ks), mock.patch.object(rmod, 'adamw', wraps=rmod.adamw) as f:
                for _ in range(7): p.grad = torch.ones_like(p); o.step()
            if ks is None: seen.append(f.call_args.args[5][0].dtype)
    finally: torch.set_default_dtype(old)
    assert seen and set(seen) == {torch.float32}
