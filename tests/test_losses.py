"Longer checks of the distillation losses against float64 references written here (the notebook holds the quick ones)"
import copy, io, pickle, re
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from ranger_fastai.losses import pixel_wise_loss, pair_wise_loss, Discriminator, wgan_gp_loss, hinge_loss, generator_loss
from ranger_fastai.losses import _use_dense, _pixel_wise

def _rel(a, b): return ((a - b).norm() / b.norm()).item()

# ---------------------------------------------------------------- pixel-wise

def _kl_ref(s, t, T):
    "Explicit float64 formula: mean over positions of sum_c p_T (log p_T - log p_S), times T^2"
    s, t = s.double(), t.double()
    ps = torch.exp(s/T) / torch.exp(s/T).sum(1, keepdim=True)
    pt = torch.exp(t/T) / torch.exp(t/T).sum(1, keepdim=True)
    return T**2 * (pt * (pt.log() - ps.log())).sum(1).mean()

@pytest.mark.parametrize('T', [1., 2.5])
def test_pixel_wise_maps_value_and_grad(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 5, 6, generator=g), torch.randn(3, 7, 5, 6, generator=g)*3
    s64 = s.double().requires_grad_()
    ref = _kl_ref(s64, t, T); ref.backward()
    x = s.clone().requires_grad_()
    out = pixel_wise_loss(x, t, T=T); out.backward()
    assert abs(out.item() - ref.item()) <= 1e-5 * ref.item()
    assert _rel(x.grad.double(), s64.grad) <= 1e-4

def test_pixel_wise_teacher_gradient():
    "Teacher logits that require grad get the gradient of the loss too (the written-out backward handles both inputs)"
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)*2
    t64, t32 = t.double().requires_grad_(), t.clone().requires_grad_()
    _kl_ref(s, t64, 2.).backward(); pixel_wise_loss(s, t32, T=2.).backward()
    assert _rel(t32.grad.double(), t64.grad) <= 1e-4
    s64, s32, t64.grad, t32.grad = s.double().requires_grad_(), s.clone().requires_grad_(), None, None # both at once
    _kl_ref(s64, t64, 2.).backward(); pixel_wise_loss(s32, t32, T=2.).backward()
    assert _rel(s32.grad.double(), s64.grad) <= 1e-4 and _rel(t32.grad.double(), t64.grad) <= 1e-4

@pytest.mark.parametrize('T,resize', [(1., False), (2., False), (1., True)])
def test_pixel_wise_shared_maps(T, resize):
    """The maps `_pixel_wise` also returns (the callback feeds them to the discriminator): p_S = softmax(s/T) resized, differentiable, and p_T detached;
    one backward pass through the loss and a function of p_S gives the float64 autograd gradient of both"""
    g = torch.Generator().manual_seed(4)
    s, t, w = torch.randn(2, 5, 4, 6, generator=g), torch.randn(2, 5, 8, 12 if resize else 6, generator=g), torch.randn(2, 5, 8, 12 if resize else 6, generator=g)
    if not resize: t, w = t[:, :, :4], w[:, :, :4]
    s64 = s.double().requires_grad_()
    up = F.interpolate(s64, size=t.shape[2:], mode='bilinear', align_corners=False) if resize else s64
    ps64 = F.softmax(up/T, 1)
    (_kl_ref(up, t, T) + (w*ps64).sum()).backward()
    x = s.clone().requires_grad_()
    loss, ps, pt = _pixel_wise(x, t, T)
    assert torch.allclose(ps.double(), ps64.detach(), atol=1e-6) and torch.allclose(pt.double(), F.softmax(t.double()/T, 1), atol=1e-6)
    assert ps.requires_grad and not pt.requires_grad
    (loss + (w*ps).sum()).backward()
    assert _rel(x.grad.double(), s64.grad) <= 1e-5
    x.grad = None; _pixel_wise(x, t, T)[1].mul(w).sum().backward() # the maps alone
    s64.grad = None; (w*F.softmax(up/T, 1)).sum().backward()
    assert _rel(x.grad.double(), s64.grad) <= 1e-5

def test_pixel_wise_hinton_logits():
    "(N, C) logits: Hinton's loss; its gradient is T (p_S - p_T) / N"
    g = torch.Generator().manual_seed(1)
    s, t, T = torch.randn(16, 10, generator=g, dtype=torch.float64).requires_grad_(), torch.randn(16, 10, generator=g, dtype=torch.float64), 4.
    out = pixel_wise_loss(s, t, T=T); out.backward()
    assert torch.allclose(out, _kl_ref(s, t, T), rtol=1e-10)
    expected = T * (F.softmax(s.detach()/T, 1) - F.softmax(t/T, 1)) / 16
    assert torch.allclose(s.grad, expected, rtol=1e-9, atol=1e-14)
    assert out.dtype == torch.float64

def test_pixel_wise_resizes_student():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 4, 8, 10, generator=g), torch.randn(2, 4, 16, 20, generator=g)
    up = F.interpolate(s.double(), size=(16, 20), mode='bilinear', align_corners=False)
    assert abs(pixel_wise_loss(s, t).item() - _kl_ref(up, t, 1.).item()) <= 1e-5 * _kl_ref(up, t, 1.).item()

def test_pixel_wise_zero_for_equal_and_large_logits():
    t = torch.randn(2, 5, 4, 4) * 1000
    assert pixel_wise_loss(t, t).abs().item() <= 1e-6
    assert pixel_wise_loss(t, -t).isfinite()

def test_pixel_wise_autocast():
    s, t = torch.randn(2, 5, 6, 6), torch.randn(2, 5, 6, 6)
    with torch.autocast('cpu'):
        out = pixel_wise_loss(s, t)
    assert out.dtype == torch.float32 and torch.allclose(out, pixel_wise_loss(s, t))

@pytest.mark.parametrize('s_shape,t_shape,msg', [
    ((2, 5, 4, 4), (3, 5, 4, 4), 'batch size and class count'),
    ((2, 5, 4, 4), (2, 6, 4, 4), 'class count'),
    ((2, 5, 4, 4), (2, 5, 4), 'same rank'),
    ((2, 5), (2, 5, 1), 'same rank'),
    ((5,), (5,), 'same rank'),
    ((2, 5, 4), (2, 5, 6), 'resizes only'),
])
def test_pixel_wise_errors(s_shape, t_shape, msg):
    with pytest.raises(ValueError, match=msg) as e: pixel_wise_loss(torch.randn(s_shape), torch.randn(t_shape))
    assert str(tuple(s_shape)) in str(e.value) and str(tuple(t_shape)) in str(e.value)

@pytest.mark.parametrize('T', [0, -1., float('nan')])
def test_pixel_wise_bad_temperature(T):
    with pytest.raises(ValueError, match=re.escape(f'Invalid T={T!r}: expected a finite number > 0')): pixel_wise_loss(torch.randn(2, 3), torch.randn(2, 3), T=T)

# ---------------------------------------------------------------- pair-wise

def _dense_ref(s, t, detach_norm=False):
    "Dense float64 definition: mean over batch and all ordered pairs of (a^S_ij - a^T_ij)^2"
    def unit(f):
        f = f.double().flatten(2)
        n = f.norm(dim=1, keepdim=True)
        return f / (n.detach() if detach_norm else n)
    S, T = unit(s), unit(t)
    return ((S.transpose(1, 2) @ S - T.transpose(1, 2) @ T)**2).mean()

def _feats(shape, seed, off=0.01):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).relu() + off

def _check_vs_dense(s, t, loss_rel=1e-4, grad_rel=1e-3, **kw):
    x = s.double().clone().requires_grad_()
    ref = _dense_ref(x, t, kw.get('detach_norm', False)); ref.backward()
    y = s.clone().requires_grad_()
    out = pair_wise_loss(y, t, **kw); out.backward()
    assert ref.item() >= 1e-3
    assert abs(out.item() - ref.item()) <= loss_rel * ref.item(), (out.item(), ref.item())
    assert _rel(y.grad.double(), x.grad) <= grad_rel
    return out, ref, x.grad

@pytest.mark.parametrize('hw', [(3, 4), (9, 13), (33, 33), (24, 40)])
@pytest.mark.parametrize('cs,ct', [(8, 8), (16, 64), (64, 16), (128, 512)])
def test_pair_wise_matches_dense(hw, cs, ct):
    s = _feats((2, cs, *hw), 0) + 0.3*torch.randn(2, cs, *hw, generator=torch.Generator().manual_seed(5))
    _check_vs_dense(s, _feats((2, ct, *hw), 1))

def test_pair_wise_forms():
    "The n x n form is used when it costs no more than the Gram matrices (n (Cs + Ct) <= Cs² + Ct² + Cs Ct); both match the definition"
    assert _use_dense(64, 16, 64) and _use_dense(12, 8, 8) and not _use_dense(1089, 128, 512) and not _use_dense(117, 8, 8)
    for hw in [(8, 8), (12, 12)]: # 64 nodes: n x n; 144 nodes: Gram
        s, t = _feats((4, 16, *hw), 0) - 0.2, _feats((4, 64, *hw), 1)
        _check_vs_dense(s, t); _check_vs_dense(s, t, detach_norm=True)

def test_pair_wise_larger_map():
    _check_vs_dense(_feats((1, 32, 48, 64), 0) - 0.2, _feats((1, 96, 48, 64), 1))

def test_pair_wise_1d_nodes():
    _check_vs_dense(_feats((3, 6, 50), 0) - 0.3, _feats((3, 10, 50), 1))

def _near(hw, noise, seed=0, cs=128, ct=512):
    "Teacher = student mapped by a matrix with orthonormal rows (equal affinities), plus relative noise"
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, cs, *hw, generator=g).relu() + 1
    M = torch.linalg.qr(torch.randn(ct, cs, generator=g, dtype=torch.float64))[0].T.float()
    t = torch.einsum('nchw,ck->nkhw', s, M)
    return s, t + noise * t.norm(dim=1, keepdim=True) * torch.randn(t.shape, generator=g) / ct**.5

@pytest.mark.parametrize('hw', [(8, 8), (33, 33), (64, 64)])
@pytest.mark.parametrize('noise', [6e-2, 1e-2, 3e-3, 1e-4, 0.])
def test_pair_wise_near_agreement(hw, noise):
    "8x8 nodes (64 < 640 channels): the n x n form; 33x33 and 64x64: the Gram identity"
    s, t = _near(hw, noise)
    ref = _dense_ref(s, t).item()
    assert ref <= 3e-5
    assert abs(pair_wise_loss(s, t).item() - ref) <= 1e-6

def test_pair_wise_identical_features():
    s = _feats((2, 32, 20, 20), 3)
    assert abs(pair_wise_loss(s, s).item()) <= 1e-7

def test_pair_wise_float64_mode():
    s, t = _feats((2, 16, 12, 12), 0) - 0.2, _feats((2, 40, 12, 12), 1)
    out, ref, g = _check_vs_dense(s.double(), t.double(), loss_rel=1e-12, grad_rel=1e-10, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert pair_wise_loss(s, t, dtype=torch.float64).dtype == torch.float64
    near_s, near_t = _near((20, 20), 1e-4, cs=16, ct=40)
    assert abs(pair_wise_loss(near_s, near_t, dtype=torch.float64).item() - _dense_ref(near_s, near_t).item()) <= 1e-12

def test_pair_wise_detach_norm():
    s, t = _feats((2, 16, 10, 10), 0) - 0.2, _feats((2, 40, 10, 10), 1)
    _, _, g_full = _check_vs_dense(s, t)
    out, ref, g_det = _check_vs_dense(s, t, detach_norm=True)
    assert _rel(g_det, g_full) > 0.1  # the option changes the gradient...
    assert abs(out.item() - pair_wise_loss(s, t).item()) <= 1e-7  # ...not the value

def test_pair_wise_teacher_gradient():
    s, t = _feats((2, 8, 6, 6), 0), _feats((2, 12, 6, 6), 1) - 0.2
    t64, t32 = t.double().requires_grad_(), t.clone().requires_grad_()
    _dense_ref(s, t64).backward(); pair_wise_loss(s, t32).backward()
    assert _rel(t32.grad.double(), t64.grad) <= 1e-3

def test_pair_wise_zero_vectors():
    s, t = _feats((2, 8, 6, 6), 0), _feats((2, 12, 6, 6), 1)
    s[:, :, 2, 3] = 0; t[0, :, 1, 1] = 0
    x = s.clone().requires_grad_()
    out = pair_wise_loss(x, t); out.backward()
    ref = ((lambda S, T: ((S.transpose(1, 2) @ S - T.transpose(1, 2) @ T)**2).mean())(
        *(F.normalize(f.double().flatten(2), dim=1) for f in (s, t))))  # zero vectors stay zero
    assert abs(out.item() - ref.item()) <= 1e-4 * ref.item()
    assert x.grad.isfinite().all() and (x.grad[:, :, 2, 3] == 0).all() and x.grad.abs().sum() > 0

def test_pair_wise_autocast():
    s, t = _feats((2, 16, 9, 9), 0) - 0.1, _feats((2, 24, 9, 9), 1)
    x = s.clone().requires_grad_()
    with torch.autocast('cpu'):
        out = pair_wise_loss(x, t)
    out.backward()
    assert out.dtype == torch.float32 and abs(out.item() - pair_wise_loss(s, t).item()) <= 1e-7
    assert x.grad.dtype == torch.float32 and x.grad.isfinite().all()

@pytest.mark.parametrize('s_shape,t_shape', [((2, 8, 6, 6), (2, 8, 6, 5)), ((2, 8, 6, 6), (3, 8, 6, 6)),
                                             ((2, 8, 6, 6), (2, 8, 36)), ((2, 8), (2, 8))])
def test_pair_wise_shape_errors(s_shape, t_shape):
    with pytest.raises(ValueError, match='same batch size and spatial size') as e:
        pair_wise_loss(torch.randn(s_shape), torch.randn(t_shape))
    assert str(tuple(s_shape)) in str(e.value) and str(tuple(t_shape)) in str(e.value)

def test_pair_wise_dtype_error():
    with pytest.raises(ValueError, match='dtype=torch.bfloat16'): pair_wise_loss(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), dtype=torch.bfloat16)

# ---------------------------------------------------------------- discriminator

def _maps(n=3, c=5, h=32, w=32, seed=0):
    return F.softmax(torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed)), 1)

@pytest.mark.parametrize('hw', [(16, 16), (65, 65), (32, 64)])
@pytest.mark.parametrize('img_channels', [0, 3])
def test_discriminator_shapes(hw, img_channels):
    D = Discriminator(5, img_channels=img_channels, nf=8)
    img = torch.randn(2, 3, 100, 120) if img_channels else None
    out = D(_maps(2, 5, *hw), img)
    assert out.shape == (2,) and out.isfinite().all()

def test_discriminator_architecture():
    D = Discriminator(19, spectral=True)
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:4] if c.kernel_size == (4, 4)] == [64, 128, 256, 512]
    assert all(c.stride == (2, 2) and hasattr(c, 'weight_orig') for c in convs[:4])
    assert not any(hasattr(m, 'weight_orig') for m in Discriminator(19).body.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (4, 4))  # not by default
    assert convs[0].in_channels == 19 + 3
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in D.modules())
    assert sum(type(m).__name__ == 'SelfAttention' for m in D.modules()) == 2
    assert [type(m).__name__ for m in D.body][-2:] == ['ConvLayer', 'SelfAttention']

def test_discriminator_spectral_norm_converges():
    D = Discriminator(4, img_channels=0, nf=8, spectral=True).train()
    x = _maps(2, 4, 16, 16)
    with torch.no_grad():
        for _ in range(50): D(x)
    conv = D.body[0][0]
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert abs(sigma.item() - 1) <= 0.05

def test_discriminator_per_sample_independence():
    D = Discriminator(5, nf=8).train()
    maps, img = _maps(4), torch.randn(4, 3, 64, 64)
    x, im = maps.clone().requires_grad_(), img.clone().requires_grad_()
    D(x, im)[1].backward()
    assert (x.grad[[0, 2, 3]] == 0).all() and (im.grad[[0, 2, 3]] == 0).all() and x.grad[1].abs().sum() > 0
    D.eval()
    other = maps.clone(); other[1:] = _maps(3, seed=9)
    assert torch.equal(D(maps, img)[0], D(other, img)[0])

def test_discriminator_pickles_and_saves():
    D = Discriminator(5, nf=8)
    x, img = _maps(2), torch.randn(2, 3, 32, 32)
    D(x, img)  # one power iteration
    D.eval()
    ref = D(x, img)
    for D2 in (pickle.loads(pickle.dumps(D)), copy.deepcopy(D)):
        assert torch.equal(D2(x, img), ref)
    buf = io.BytesIO(); torch.save(D, buf); buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x, img), ref)
    buf = io.BytesIO(); torch.save(D.state_dict(), buf); buf.seek(0)
    D3 = Discriminator(5, nf=8).eval(); D3.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(D3(x, img), ref)

def test_discriminator_small_maps():
    D = Discriminator(5, img_channels=0, nf=8)
    with pytest.raises(ValueError, match=r'at least 16x16, got \(8, 8\): use n_layers <= 3'): D(_maps(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r'got \(16, 15\)'): D(_maps(2, 5, 16, 15))
    assert Discriminator(5, img_channels=0, nf=8, n_layers=3, attn_layers=(2,))(_maps(2, 5, 8, 8)).shape == (2,)
    assert Discriminator(5, img_channels=0, nf=8, n_layers=1, attn_layers=())(_maps(2, 5, 2, 2)).shape == (2,)

@pytest.mark.parametrize('kw,msg', [(dict(n_classes=0), 'n_classes=0'), (dict(n_classes=2.5), 'n_classes=2.5'),
                                    (dict(img_channels=-1), 'img_channels=-1'), (dict(nf=0), 'nf=0'),
                                    (dict(n_layers=0, attn_layers=()), 'n_layers=0'), (dict(attn_layers=(1, 4)), r'attn_layers=\(1, 4\)'),
                                    (dict(attn_layers=(-1,)), 'attn_layers')])
def test_discriminator_init_errors(kw, msg):
    with pytest.raises(ValueError, match=msg): Discriminator(**{'n_classes': 5, **kw})

def test_discriminator_input_errors():
    D, D0 = Discriminator(5, nf=8), Discriminator(5, img_channels=0, nf=8)
    m, img = _maps(2), torch.randn(2, 3, 32, 32)
    for f, msg in [(lambda: D(m[:, :4], img), r'needs maps \(N, 5, h, w\), got \(2, 4, 32, 32\)'),
                   (lambda: D(m[0], img), r'got \(5, 32, 32\)'),
                   (lambda: D(m), 'pass the images'),
                   (lambda: D0(m, img), 'scores maps alone'),
                   (lambda: D(m, img[:1]), r'needs images \(2, 3, H, W\)'),
                   (lambda: D(m, img[:, :1]), r'got \(2, 1, 32, 32\)'),
                   (lambda: D(m, img[0]), r'got \(3, 32, 32\)')]:
        with pytest.raises(ValueError, match=msg): f()

# ---------------------------------------------------------------- critic losses

class _Linear(nn.Module):
    "Linear critic w . x + b; optionally records its inputs"
    def __init__(self, n, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin, self.seen = nn.Linear(n, 1), []
    def forward(self, maps, img=None):
        self.seen.append((maps.detach().clone(), None if img is None else img.clone()))
        return self.lin(maps.flatten(1)).squeeze(1)

def test_gradient_penalty_linear_critic():
    "The gradient of every score is w, so penalty = (||w|| - 1)^2 and its gradient is 2(||w|| - 1) w/||w||"
    real, fake = torch.rand(6, 2, 4, 4), torch.rand(6, 2, 4, 4)
    D = _Linear(32)
    with torch.no_grad(): D.lin.weight.mul_(5)
    w = D.lin.weight.detach().clone().double()
    d_loss, pen = wgan_gp_loss(D, real, fake, gp_weight=10.)
    assert abs(pen.item() - ((w.norm() - 1)**2).item()) <= 1e-5 * pen.item()
    d_loss.backward()
    expected = (fake.double().flatten(1).mean(0) - real.double().flatten(1).mean(0)) + 10 * 2*(w.norm() - 1)*w[0]/w.norm()
    assert _rel(D.lin.weight.grad[0].double(), expected) <= 1e-5
    assert abs(D.lin.bias.grad.item()) <= 1e-6  # bias cancels between fake and real

def test_gradient_penalty_one_eps_per_sample():
    real, fake = torch.rand(8, 2, 3, 3), torch.rand(8, 2, 3, 3)
    D = _Linear(18)
    wgan_gp_loss(D, real, fake)
    (x, _), (x_hat, _) = D.seen
    assert torch.equal(x[:8], real) and torch.equal(x[8:], fake)
    eps = (x_hat - fake) / (real - fake)
    per_sample = eps.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-4)
    assert ((per_sample[:, 0] >= 0) & (per_sample[:, 0] <= 1)).all() and per_sample[:, 0].std() > 0.05

def test_gradient_penalty_on_a_subset():
    "`gp_samples=k`: the penalty's interpolates are the first k pairs of the batch, scored in a pass of their own"
    real, fake = torch.rand(8, 2, 3, 3), torch.rand(8, 2, 3, 3)
    D = _Linear(18)
    with torch.no_grad(): D.lin.weight.mul_(5)
    w = D.lin.weight.detach().double()
    _, pen = wgan_gp_loss(D, real, fake, gp_samples=3)
    (x, _), (x_hat, _) = D.seen
    assert x.shape[0] == 16 and x_hat.shape[0] == 3
    eps = ((x_hat - fake[:3]) / (real[:3] - fake[:3])).flatten(1)
    assert torch.allclose(eps, eps[:, :1].expand_as(eps), atol=1e-4)
    assert abs(pen.item() - ((w.norm() - 1)**2).item()) <= 1e-5 * pen.item()  # linear critic: the same penalty from any subset
    with pytest.raises(ValueError, match='gp_weight'): wgan_gp_loss(D, real, fake, gp_weight=-1.)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(TypeError if bad is True else ValueError, match=f'gp_samples={bad!r}'): wgan_gp_loss(D, real, fake, gp_samples=bad)  # a bool is not a number

def test_critic_losses_pass_images():
    real, fake, img = torch.rand(3, 2, 3, 3), torch.rand(3, 2, 3, 3), torch.randn(3, 1, 5, 5)
    D = _Linear(18)
    wgan_gp_loss(D, real, fake, img); hinge_loss(D, real, fake, img); generator_loss(D, fake, img)
    assert [s[1].shape[0] for s in D.seen] == [6, 3, 6, 3]  # wgan-gp: real and fake, then the interpolates
    assert all(torch.equal(s[1][:3], img) and torch.equal(s[1][-3:], img) for s in D.seen)

def test_zero_gradient_critic_no_nan():
    class Const(nn.Module):
        def __init__(self): super().__init__(); self.b = nn.Parameter(torch.zeros(1)); self.w = nn.Parameter(torch.zeros(1))
        def forward(self, maps, img=None): return self.w * maps.flatten(1).sum(1) + self.b
    D = Const()
    d_loss, pen = wgan_gp_loss(D, torch.rand(4, 2, 3, 3), torch.rand(4, 2, 3, 3))
    d_loss.backward()
    assert abs(pen.item() - 1) <= 1e-5 and D.w.grad.isfinite().all() and D.b.grad.isfinite().all()

@pytest.mark.parametrize('autocast', [False, True])
def test_gradient_penalty_with_scaler(autocast):
    D = Discriminator(4, img_channels=3, nf=8)
    real, fake, img = _maps(2, 4, 16, 16), _maps(2, 4, 16, 16, seed=1), torch.randn(2, 3, 16, 16)
    pens = []
    for scaler in (None, torch.amp.GradScaler('cpu', init_scale=2.**16)):
        D.eval()  # no power iteration between the two runs
        torch.manual_seed(0)
        with torch.autocast('cpu', enabled=autocast):
            d_loss, pen = wgan_gp_loss(D, real, fake, img, scaler=scaler)
        pens.append(pen)
        assert d_loss.dtype == torch.float32 and pen.isfinite()
    assert pens[0].item() > 0
    assert abs(pens[1].item() - pens[0].item()) <= 1e-5 * pens[0].item()

def test_wgan_gp_discriminator_step_amp():
    D = Discriminator(4, img_channels=3, nf=8)
    opt = torch.optim.SGD(D.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cpu')
    real, fake, img = _maps(2, 4, 16, 16), _maps(2, 4, 16, 16, seed=1).requires_grad_(), torch.randn(2, 3, 32, 32)
    before = [p.detach().clone() for p in D.parameters()]
    with torch.autocast('cpu'):
        d_loss, pen = wgan_gp_loss(D, real, fake, img, scaler=scaler)
    scaler.scale(d_loss).backward()
    scaler.step(opt); scaler.update()
    assert fake.grad is None  # the critic loss never reaches the student
    assert all(p.grad.isfinite().all() for p in D.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, D.parameters()))

def test_hinge_and_generator_losses():
    real, fake = torch.rand(5, 2, 3, 3), torch.rand(5, 2, 3, 3).requires_grad_()
    D = _Linear(18)
    with torch.no_grad(): D.lin.weight.mul_(20)
    sr, sf = D(real).detach().double(), D(fake).detach().double()
    h = hinge_loss(D, real, fake)
    assert abs(h.item() - (F.relu(1 - sr).mean() + F.relu(1 + sf).mean()).item()) <= 1e-5
    h.backward()
    assert fake.grad is None
    g = generator_loss(D, fake)
    assert abs(g.item() + sf.mean().item()) <= 1e-5
    g.backward()
    assert torch.allclose(fake.grad.flatten(1), -D.lin.weight.detach().expand(5, -1) / 5)

@pytest.mark.parametrize('f', [lambda D, r, f: wgan_gp_loss(D, r, f), lambda D, r, f: hinge_loss(D, r, f)])
def test_critic_shape_errors(f):
    D = _Linear(18)
    with pytest.raises(ValueError, match=r'real \(4, 2, 3, 3\), fake \(3, 2, 3, 3\)'): f(D, torch.rand(4, 2, 3, 3), torch.rand(3, 2, 3, 3))
    with pytest.raises(ValueError, match='one shape'): f(D, torch.rand(4), torch.rand(4))

@pytest.mark.parametrize('w', [-1., float('nan')])
def test_gp_weight_error(w):
    with pytest.raises(ValueError, match='gp_weight'): wgan_gp_loss(_Linear(18), torch.rand(4, 2, 3, 3), torch.rand(4, 2, 3, 3), gp_weight=w)

def test_pixel_wise_no_output_gradient():
    "A consumer of the maps that returns no gradient (and no loss gradient) gives the student no gradient; `gradcheck` passes with undefined output gradients"
    class _NoGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x): return x.sum(1)
        @staticmethod
        def backward(ctx, g): return None
    s, t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4)
    _NoGrad.apply(_pixel_wise(s, t, 1.)[1]).sum().backward()
    assert s.grad is None or not s.grad.any()
    s64, t64 = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: tuple(_pixel_wise(x, t64, 2.)[:2]), (s64,))
