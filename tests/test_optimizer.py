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
