"Checks of `confusion_matrix`, `miou_from_confusion` and `MeanIoU` against a plain numpy reference"
import math
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset, DataLoader
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from ranger_fastai.metrics import confusion_matrix, miou_from_confusion, MeanIoU

def ref_iou(preds, targets, n, ignore_index=None):
    "Per-class IoU over all pixels of all batches, class by class with boolean masks (nan: class absent from both)"
    p = np.concatenate([np.asarray(x).ravel() for x in preds])
    t = np.concatenate([np.asarray(x).ravel() for x in targets])
    if ignore_index is not None: p, t = p[t != ignore_index], t[t != ignore_index]
    res = []
    for c in range(n):
        inter, union = np.sum((p == c) & (t == c)), np.sum((p == c) | (t == c))
        res.append(inter/union if union else math.nan)
    return np.array(res)

def ref_miou(preds, targets, n, ignore_index=None, include_background=True):
    iou = ref_iou(preds, targets, n, ignore_index)
    return float(np.nanmean(iou if include_background else iou[1:]))

def batches(seed, n_batches=4, bs=3, hw=(5, 6), n=4, acc=0.6):
    "Random label batches where predictions agree with targets with probability `acc`"
    rng = np.random.default_rng(seed)
    ts = [rng.integers(0, n, (bs, *hw)) for _ in range(n_batches)]
    ps = [np.where(rng.random(t.shape) < acc, t, rng.integers(0, n, t.shape)) for t in ts]
    return ps, ts

def accumulate(metric, ps, ts):
    metric.reset()
    for p,t in zip(ps, ts): metric.accum_values(torch.as_tensor(p), torch.as_tensor(t))
    return metric

@pytest.mark.parametrize('seed', range(5))
def test_matches_reference(seed):
    ps, ts = batches(seed)
    m = accumulate(MeanIoU(4), ps, ts)
    assert math.isclose(m.value, ref_miou(ps, ts, 4), rel_tol=1e-12)
    np.testing.assert_allclose(m.per_class.numpy(), ref_iou(ps, ts, 4))
    cm = m.cm.numpy()
    p, t = np.concatenate([x.ravel() for x in ps]), np.concatenate([x.ravel() for x in ts])
    assert all(cm[i, j] == np.sum((t == i) & (p == j)) for i in range(4) for j in range(4))

def test_independent_of_batching():
    ps, ts = batches(0, n_batches=1, bs=12)
    whole = accumulate(MeanIoU(4), ps, ts).value
    split = accumulate(MeanIoU(4), [ps[0][i:i+5] for i in range(0, 12, 5)], [ts[0][i:i+5] for i in range(0, 12, 5)]).value
    assert whole == split

def test_dataset_level_differs_from_batch_average():
    # batch 1 holds only class 0, predicted perfectly (mIoU 1); batch 2 holds all classes, half wrong
    rng = np.random.default_rng(0)
    t1 = np.zeros((2, 8, 8), dtype=np.int64); p1 = t1.copy()
    t2 = rng.integers(0, 3, (2, 8, 8)); p2 = np.where(rng.random(t2.shape) < 0.5, t2, rng.integers(0, 3, t2.shape))
    ps, ts = [p1, p2], [t1, t2]
    m = accumulate(MeanIoU(3), ps, ts)
    per_batch = np.mean([ref_miou([p], [t], 3) for p,t in zip(ps, ts)])
    assert math.isclose(m.value, ref_miou(ps, ts, 3), rel_tol=1e-12)
    assert abs(per_batch - m.value) > 0.05, (per_batch, m.value)

def test_ignore_index():
    ps, ts = batches(1)
    rng = np.random.default_rng(1)
    ts = [np.where(rng.random(t.shape) < 0.2, 255, t) for t in ts]
    m = accumulate(MeanIoU(4, ignore_index=255), ps, ts)
    assert math.isclose(m.value, ref_miou(ps, ts, 4, ignore_index=255), rel_tol=1e-12)
    # predictions on void pixels change nothing
    ps2 = [np.where(t == 255, 3, p) for p,t in zip(ps, ts)]
    assert accumulate(MeanIoU(4, ignore_index=255), ps2, ts).value == m.value
    with pytest.raises(ValueError, match=r'\[255\]'): accumulate(MeanIoU(4), ps, ts)

def test_absent_classes():
    t = np.array([[0, 0, 1, 1]]); p = np.array([[0, 0, 1, 2]])
    # class 3 absent from both: nan and left out; class 2 only predicted: IoU 0 and counted
    m = accumulate(MeanIoU(4), [p], [t])
    iou = m.per_class.numpy()
    assert np.isnan(iou[3]) and iou[2] == 0
    np.testing.assert_allclose(iou[:3], [1, 0.5, 0])
    assert math.isclose(m.value, 0.5)
    assert math.isclose(m.value, ref_miou([p], [t], 4))
    mean, iou = miou_from_confusion(torch.zeros(3, 3, dtype=torch.long))
    assert math.isnan(mean) and iou.isnan().all()

def test_include_background():
    ps, ts = batches(2)
    m = accumulate(MeanIoU(4, include_background=False), ps, ts)
    assert math.isclose(m.value, ref_miou(ps, ts, 4, include_background=False), rel_tol=1e-12)
    assert m.value != accumulate(MeanIoU(4), ps, ts).value

def test_scores_and_inferred_classes():
    ps, ts = batches(3)
    scores = [torch.nn.functional.one_hot(torch.as_tensor(p), 4).permute(0, 3, 1, 2).float() for p in ps]
    m = MeanIoU()
    for s,t in zip(scores, ts): m.accum_values(s, torch.as_tensor(t))
    assert m.cm.shape == (4, 4)
    assert math.isclose(m.value, ref_miou(ps, ts, 4), rel_tol=1e-12)
    assert MeanIoU().value is None

def test_errors():
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match='target holds labels'): confusion_matrix(t, torch.tensor([0, 1, 5]), 3)
    with pytest.raises(ValueError, match='pred holds labels'): confusion_matrix(torch.tensor([0, -1, 2]), t, 3)
    with pytest.raises(ValueError, match='shape'): confusion_matrix(t[:2], t, 3)
    with pytest.raises(ValueError, match='n_classes=0'): confusion_matrix(t, t, 0)
    with pytest.raises(ValueError, match='4 scores'): confusion_matrix(torch.zeros(1, 4, 3), t[None], 3)
    with pytest.raises(TypeError, match='integer labels'): confusion_matrix(t.float(), t, 3)
    with pytest.raises(ValueError, match='square'): miou_from_confusion(torch.zeros(2, 3))
    with pytest.raises(ValueError, match='needs n_classes'): MeanIoU().accum_values(t, t)
    with pytest.raises(ValueError, match='n_classes=-2'): MeanIoU(-2)

def test_learner_validate():
    "fastai's validate loop, 5 uneven batches: the reported value is the dataset-level mIoU, not the batch average"
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 3, (13, 6, 6), generator=g)
    t[:6] = torch.where(t[:6] == 2, 0, t[:6])   # class 2 only in the later images
    p = torch.where(torch.rand(t.shape, generator=g) < 0.7, t, torch.randint(0, 3, t.shape, generator=g))
    x = torch.nn.functional.one_hot(p, 3).permute(0, 3, 1, 2).float()
    dl = DataLoader(TensorDataset(x, t), batch_size=3)
    model = torch.nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad(): model.weight.copy_(torch.eye(3)[:, :, None, None])
    met = MeanIoU(3)
    learn = Learner(DataLoaders(dl, dl), model, loss_func=CrossEntropyLossFlat(axis=1), metrics=met)
    res = learn.validate()
    assert math.isclose(res[1], ref_miou([p.numpy()], [t.numpy()], 3), rel_tol=1e-9)
    per_batch = np.mean([ref_miou([p[i:i+3].numpy()], [t[i:i+3].numpy()], 3) for i in range(0, 13, 3)])
    assert abs(per_batch - res[1]) > 1e-3
    assert int(met.cm.sum()) == t.numel()
