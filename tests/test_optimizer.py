"Longer checks of `Ranger`, `TorchLookahead` and `ranger` (the notebooks hold the quick ones)"
import torch
from fastai.optimizer import ranger as fastai_ranger
from ranger_fastai.optimizer import Ranger

def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]

HP = [dict(lr=1e-2, mom=0.9, sqr_mom=0.99, wd=0.01), dict(lr=3e-3, mom=0.95, sqr_mom=0.999, wd=0.1)]

def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model

def _fastai_run(batches):
    m = _model()
    opt = fastai_ranger([list(m[0].parameters()), list(m[2].parameters())], lr=1e-2, eps=1e-6)
    for k in HP[0]: opt.set_hyper(k, [h[k] for h in HP])
    return _train(m, opt, batches)

def _our_run(batches, **kw):
    m = _model()
    opt = Ranger([dict(params=m[i].parameters(), lr=h['lr'], betas=(h['mom'], h['sqr_mom']), weight_decay=h['wd'])
                  for i, h in zip((0, 2), HP)], eps=1e-6, **kw)
    return _train(m, opt, batches)

def _max_rel(a, b): return max(((p - q).norm() / p.norm()).item() for p, q in zip(a.parameters(), b.parameters()))

def test_trajectory_matches_fastai_ranger_two_groups():
    batches = _batches(150)
    ref = _fastai_run(batches)
    for fused in (None, False):
        assert _max_rel(ref, _our_run(batches, fused=fused)) <= 1e-5


# --- gradient centralization and L2 --------------------------------------------------------------

def _gc_reference_step(p, g, st, lr, b1, b2, eps, wd, step):
    "A plain, per-tensor Ranger step with GC (written out, no foreach/fused) for reference"
    if g.dim() > 1: g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
    p.mul_(1 - lr * wd)
    st['m'].mul_(b1).add_(g, alpha=1 - b1)
    st['v'].mul_(b2).addcmul_(g, g, value=1 - b2)
    from ranger_fastai.optimizer import _rectifier
    r = _rectifier(step, b2)
    if r is None: p.add_(st['m'], alpha=-lr / (1 - b1 ** step))
    else: p.addcdiv_(st['m'], (st['v'] / (1 - b2 ** step)).sqrt() + eps, value=-lr * r / (1 - b1 ** step))

def test_gradient_centralization_matches_reference():
    batches = _batches(40)
    m1, m2 = _model(), _model()
    opt = Ranger(m1.parameters(), lr=1e-2, use_gc=True, k=1000)
    states = {p: dict(m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in m2.parameters()}
    for t, (x, y) in enumerate(batches, 1):
        for m in (m1, m2):
            m.zero_grad(); torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        with torch.no_grad():
            for p in m2.parameters(): _gc_reference_step(p, p.grad, states[p], 1e-2, 0.95, 0.99, 1e-6, 0.01, t)
    assert _max_rel(m2, m1) <= 1e-5

def test_gc_conv_only_leaves_linear_weights_alone():
    conv = torch.nn.Conv2d(2, 3, 3); lin = torch.nn.Linear(4, 3)
    g_conv, g_lin = torch.randn(3, 2, 3, 3), torch.randn(3, 4)
    from ranger_fastai.optimizer import _centralize
    out = _centralize([g_conv, g_lin], 3)
    assert torch.allclose(out[0].mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-6)
    assert out[1] is g_lin

def test_l2_matches_fastai_ranger():
    batches = _batches(120)
    m1 = _model(); o1 = fastai_ranger(list(m1.parameters()), lr=1e-2, wd=0.05, decouple_wd=False)
    m2 = _model(); o2 = Ranger(m2.parameters(), lr=1e-2, weight_decay=0.05, decouple_wd=False)
    assert _max_rel(_train(m1, o1, batches), _train(m2, o2, batches)) <= 1e-5


# --- exact resume ----------------------------------------------------------------------------------

import io, warnings
import pytest
from ranger_fastai.optimizer import TorchLookahead, ranger, slow_weights, SharedStateWrapper

def _make_ranger(m): return Ranger([dict(params=m[0].parameters(), lr=1e-2), dict(params=m[2].parameters(), lr=3e-3, betas=(0.9, 0.999), k=4)], use_gc=True)
def _make_lookahead(m): return TorchLookahead(torch.optim.AdamW(m.parameters(), lr=1e-2), k=5, alpha=0.6)
def _make_lookahead_fused(m): return TorchLookahead(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), k=5, alpha=0.6)

@pytest.mark.parametrize("make", [_make_ranger, _make_lookahead, _make_lookahead_fused])
@pytest.mark.parametrize('stop', [3, 7, 13])  # before the first sync, mid cycle, mid cycle later
def test_resume_is_exact(make, stop):
    batches = _batches(30)
    ref = _model(); _train(ref, make(ref), batches)
    m = _model(); opt = make(m); _train(m, opt, batches[:stop])
    buf = io.BytesIO(); torch.save({'model': m.state_dict(), 'opt': opt.state_dict()}, buf); buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = _model(seed=123); m2.load_state_dict(ck['model'])
    opt2 = make(m2); opt2.load_state_dict(ck['opt'])
    _train(m2, opt2, batches[stop:])
    for p, q in zip(ref.parameters(), m2.parameters()): assert torch.equal(p, q)

def test_state_dict_keys_by_position_with_slow_weights_and_counters():
    m = _model(); opt = _make_ranger(m); _train(m, opt, _batches(3))
    sd = opt.state_dict()
    assert sorted(sd['state']) == [0, 1, 2, 3]
    assert set(sd['state'][0]) == {'step', 'exp_avg', 'exp_avg_sq', 'lookahead_slow'} and sd['state'][0]['step'] == 3
    assert sd['param_groups'][1]['k'] == 4 and sd['param_groups'][1]['lookahead_alpha'] == 0.5

def test_add_param_group():
    m = _model(); opt = Ranger(m[0].parameters(), lr=1e-2)
    _train(m, opt, _batches(3))
    opt.add_param_group(dict(params=m[2].parameters(), lr=1e-3, k=2))
    _train(m, opt, _batches(4, seed=5))
    assert opt.state[m[0].weight]['step'] == 7 and opt.state[m[2].weight]['step'] == 4
    assert opt.param_groups[1]['k'] == 2 and opt.param_groups[1]['betas'] == (0.95, 0.99)
    with pytest.raises(ValueError, match='lr=-1'): opt.add_param_group(dict(params=[torch.zeros(2, requires_grad=True)], lr=-1))
    assert len(opt.param_groups) == 2

def test_slow_weights_sync_schedule():
    "After k steps the parameter equals the slow weight, which moved alpha of the way"
    x = torch.zeros(3, requires_grad=True); opt = Ranger([x], lr=0.1, k=3, alpha=0.5, weight_decay=0.)
    ref = torch.zeros(3, requires_grad=True); ropt = Ranger([ref], lr=0.1, k=10**6, weight_decay=0.)
    for _ in range(3):
        for w, o in ((x, opt), (ref, ropt)): o.zero_grad(); ((w - 1) ** 2).sum().backward(); o.step()
    assert torch.allclose(x, ref / 2) and torch.equal(opt.state[x]['lookahead_slow'], x.detach())


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize('kw,msg', [(dict(lr=-1e-3), 'lr=-0.001'), (dict(eps=-1.), 'eps=-1.0'), (dict(weight_decay=-0.1), 'weight_decay=-0.1'),
                                    (dict(betas=(1.0, 0.99)), r'betas\[0\]=1.0'), (dict(betas=(0.9, -0.1)), r'betas\[1\]=-0.1'),
                                    (dict(betas=0.9), 'betas=0.9'), (dict(k=0), 'k=0'), (dict(k=2.5), 'k=2.5'), (dict(alpha=0.), 'alpha=0.0'),
                                    (dict(alpha=1.5), 'alpha=1.5'), (dict(use_gc='all'), "use_gc='all'")])
def test_bad_hyperparameters(kw, msg):
    with pytest.raises(ValueError, match=msg): Ranger([torch.zeros(2, requires_grad=True)], **kw)

def test_non_floating_parameter():
    with pytest.raises(TypeError, match='torch.int64'): Ranger([torch.zeros(2, dtype=torch.long)])

def test_bad_scheduled_value_fails_before_any_change():
    m = _model(); opt = _make_ranger(m); _train(m, opt, _batches(2))
    before = ({k: v.clone() for k, v in m.state_dict().items()}, io.BytesIO())
    torch.save(opt.state_dict(), before[1])
    opt.param_groups[1]['lr'] = -1.
    m.zero_grad(); torch.nn.functional.mse_loss(m(torch.randn(4, 6)), torch.randn(4, 3)).backward()
    with pytest.raises(ValueError, match='lr=-1.0'): opt.step()
    for k, v in m.state_dict().items(): assert torch.equal(v, before[0][k])
    assert opt.state[m[0].weight]['step'] == 2

def test_sparse_gradient_fails_before_any_change():
    emb = torch.nn.Embedding(10, 3, sparse=True); lin = torch.nn.Linear(3, 1)
    opt = Ranger(list(lin.parameters()) + list(emb.parameters()))
    w = lin.weight.detach().clone()
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(RuntimeError, match='sparse'): opt.step()
    assert torch.equal(lin.weight, w) and len(opt.state) == 0

def test_skip_nonfinite_changes_nothing():
    m = _model(); opt = Ranger(m.parameters(), skip_nonfinite=True); _train(m, opt, _batches(2))
    weights = [p.detach().clone() for p in m.parameters()]
    slow = [opt.state[p]['lookahead_slow'].clone() for p in m.parameters()]
    m.zero_grad(); torch.nn.functional.mse_loss(m(torch.randn(4, 6)), torch.randn(4, 3)).backward()
    m[0].weight.grad[0, 0] = float('nan')
    with pytest.warns(UserWarning, match='skipped'): opt.step()
    for p, w, s in zip(m.parameters(), weights, slow):
        assert torch.equal(p, w) and torch.equal(opt.state[p]['lookahead_slow'], s) and opt.state[p]['step'] == 2

def test_lookahead_rejects_wrappers_and_bad_args():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match='torch.optim.Optimizer'): TorchLookahead(fastai_ranger([w], lr=1e-3))
    with pytest.raises(TypeError, match='already has Lookahead'): TorchLookahead(Ranger([w]))
    with pytest.raises(ValueError, match='k=0'): TorchLookahead(torch.optim.SGD([w], lr=0.1), k=0)


# --- AMP ---------------------------------------------------------------------------------------------

def _amp_run(make, batches, inject_inf_at=None):
    m = _model(); opt = make(m)
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 10)
    skipped = 0
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16): loss = torch.nn.functional.mse_loss(m(x).float(), y)
        scaler.scale(loss).backward()
        if i == inject_inf_at: m[0].weight.grad[0, 0] = float('inf')
        scale = scaler.get_scale(); scaler.step(opt); scaler.update()
        skipped += scaler.get_scale() < scale
    return m, opt, skipped

@pytest.mark.parametrize("make", [_make_ranger, _make_lookahead, _make_lookahead_fused])
def test_amp_skipped_step_advances_nothing(make):
    batches = _batches(20)
    clean, o1, s1 = _amp_run(make, batches[:5] + batches[6:])
    hit, o2, s2 = _amp_run(make, batches, inject_inf_at=5)
    assert s1 == 0 and s2 == 1
    key = 'step' if isinstance(o1, Ranger) else 'lookahead_step'
    assert o1.state[clean[0].weight][key] == o2.state[hit[0].weight][key] == 19
    for p, q in zip(clean.parameters(), hit.parameters()): assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)

def test_amp_fused_scale_matches_unscaled_fp32():
    "The fused kernel unscales the gradients itself: same trajectory as a run without scaling"
    batches = _batches(30)
    m1 = _model(); o1 = Ranger(m1.parameters(), lr=1e-2)
    m2 = _model(); o2 = Ranger(m2.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 12, growth_interval=10 ** 6)
    for x, y in batches:
        o1.zero_grad(); torch.nn.functional.mse_loss(m1(x), y).backward(); o1.step()
        o2.zero_grad(); scaler.scale(torch.nn.functional.mse_loss(m2(x), y)).backward(); scaler.step(o2); scaler.update()
    assert _max_rel(m1, m2) <= 1e-5


# --- plain PyTorch schedulers ------------------------------------------------------------------------

def test_onecycle_cycles_beta1():
    m = _model(); opt = Ranger(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20, base_momentum=0.85, max_momentum=0.95)
    betas, lrs = [], []
    for x, y in _batches(20):
        opt.zero_grad(); torch.nn.functional.mse_loss(m(x), y).backward(); opt.step(); sched.step()
        betas.append(opt.param_groups[0]['betas']); lrs.append(opt.param_groups[0]['lr'])
    b1 = [b[0] for b in betas]
    assert min(b1) == pytest.approx(0.85, abs=1e-3) and max(b1) == pytest.approx(0.95, abs=1e-3)
    assert all(b[1] == 0.99 for b in betas) and max(lrs) == pytest.approx(1e-2, rel=1e-2)


# --- argument types, closures, slow weights -----------------------------------------------------

@pytest.mark.parametrize('kw,err,msg', [(dict(lr=float('inf')), ValueError, 'lr=inf'), (dict(weight_decay=float('nan')), ValueError, 'weight_decay=nan'),
                                        (dict(lr=None), TypeError, 'lr=None'), (dict(eps='1e-6'), TypeError, "eps='1e-6'"),
                                        (dict(fused='no'), ValueError, "fused='no'"), (dict(decouple_wd='yes'), ValueError, "decouple_wd='yes'")])
def test_bad_argument_types(kw, err, msg):
    with pytest.raises(err, match=msg): Ranger([torch.zeros(2, requires_grad=True)], **kw)

def test_numpy_integer_k():
    import numpy as np
    assert Ranger([torch.zeros(2, requires_grad=True)], k=np.int64(4)).param_groups[0]['k'] == 4

def test_lookahead_bad_group_changes_nothing():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    inner = torch.optim.SGD([dict(params=[a]), dict(params=[b], k=0)], lr=0.1)
    with pytest.raises(ValueError, match='k=0'): TorchLookahead(inner)
    assert 'k' not in inner.param_groups[0]

@pytest.mark.parametrize('make', [lambda ps: Ranger(ps, lr=0.1, k=2), lambda ps: TorchLookahead(torch.optim.AdamW(ps, lr=0.1), k=2)])
def test_closure_computes_gradients(make):
    w = torch.zeros(3, requires_grad=True); opt = make([w])
    def closure():
        opt.zero_grad(); loss = ((w - 1) ** 2).sum(); loss.backward(); return loss
    for _ in range(4): opt.zero_grad(); opt.step(closure)
    key = 'step' if isinstance(opt, Ranger) else 'lookahead_step'
    assert opt.state[w][key] == 4 and torch.equal(opt.state[w]['lookahead_slow'], w.detach())

def test_slow_weights_needs_lookahead():
    with pytest.raises(TypeError, match='AdamW'):
        with slow_weights(torch.optim.AdamW([torch.zeros(2, requires_grad=True)])): pass

def test_lookahead_counts_per_parameter():
    "A parameter that misses steps synchronises after its own k-th update"
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = Ranger([a, b], lr=0.1, k=3)
    for i in range(4):
        opt.zero_grad(); (((a - 1) ** 2).sum() + (((b - 1) ** 2).sum() if i % 2 else 0)).backward(); opt.step()
    assert opt.state[a]['step'] == 4 and opt.state[b]['step'] == 2
