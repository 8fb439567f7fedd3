#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU, run from the repo root: `bash bench/gpu_check.sh` (about 5 minutes).
#   (a) nvidia-smi, torch version and CUDA availability (stops here if there is no CUDA)
#   (b) the CUDA tests of tests/test_torch_contract.py (`-k cuda`), then tests/test_optimizer.py and tests/test_fastai_integration.py
#   (c) python bench/optimizer_step.py --device cuda --rounds 9
#   (d) a 1-epoch distillation fit of a `to_fp16` student on the built-in digit scenes, all three terms, finite losses
# Every step runs even if an earlier one failed (except (a) without CUDA); the exit status is non-zero if any failed.
# Environment: PYTHON (default .venv/bin/python; the venv is created with `pip install -e '.[dev]'` if missing),
# STEPS (default "a b c d"), DEVICE (default cuda; for (c) and (d)), FP16 (default 1: `to_fp16` in (d)).
# A CPU dry run of (d): `STEPS=d DEVICE=cpu FP16=0 bash bench/gpu_check.sh`.
set -uo pipefail

STEPS=${STEPS:-a b c d}
export DEVICE=${DEVICE:-cuda} FP16=${FP16:-1}
FAILED=()

section() { printf '\n==================== %s ====================\n' "$*"; }
# Run a step with a time limit (seconds), record its name if it fails
step() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        FAILED+=("$name (rc $rc$([ $rc -eq 124 ] && echo ", timed out after ${limit}s"))")
        echo ">>> FAILED: $name (rc $rc, $((SECONDS - t0))s)"
    else
        echo ">>> ok: $name ($((SECONDS - t0))s)"
    fi
}
want() { [[ " $STEPS " == *" $1 "* ]]; }

if [ -z "${PYTHON:-}" ]; then
    PYTHON=.venv/bin/python
    if [ ! -x "$PYTHON" ]; then
        section "creating .venv (pip install -e '.[dev]')"
        python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' || { echo "FATAL: could not create .venv"; exit 2; }
    fi
fi
echo "python: $PYTHON ($("$PYTHON" --version 2>&1)), steps: $STEPS, DEVICE=$DEVICE FP16=$FP16, $(date -u +%FT%TZ)"

if want a; then
    section "(a) GPU and torch"
    if command -v nvidia-smi >/dev/null; then nvidia-smi || FAILED+=("nvidia-smi"); else echo "nvidia-smi: not found"; fi
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cuda available:', torch.cuda.is_available()); torch.cuda.is_available() and print('device 0:', torch.cuda.get_device_name(0))"
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "FATAL: torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES, or a CPU-only torch build?): nothing else to check here"
        exit 1
    fi
fi

if want b; then
    section "(b1) pytest tests/test_torch_contract.py -k cuda"
    step "pytest test_torch_contract -k cuda" 240 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_torch_contract.py -k cuda
    section "(b2) pytest tests/test_optimizer.py tests/test_fastai_integration.py"
    step "pytest test_optimizer + test_fastai_integration" 200 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_optimizer.py tests/test_fastai_integration.py
fi

if want c; then
    section "(c) bench/optimizer_step.py --device $DEVICE --rounds 9"
    step "bench/optimizer_step.py" 240 "$PYTHON" bench/optimizer_step.py --device "$DEVICE" --rounds 9
fi

if want d; then
    section "(d) distillation fit, to_fp16=$FP16, device $DEVICE"
    step "to_fp16 distillation fit" 180 "$PYTHON" - <<'EOF'
"A 1-epoch distillation fit (pixel-wise, pair-wise, holistic) of a small student on the built-in digit scenes, finite losses"
import math, os, warnings
import torch
from fastai.vision.all import Learner, CrossEntropyLossFlat, Callback, MixedPrecision, set_seed, noop
from ranger_fastai.all import *  # ranger, Learner.distill, Discriminator
from ranger_fastai.data import digit_scenes_dls
from ranger_fastai.models import SegNet
warnings.filterwarnings('ignore', category=FutureWarning)
dev, fp16 = os.environ.get('DEVICE', 'cuda'), os.environ.get('FP16', '1') == '1'
print(f"torch {torch.__version__}, device {dev}, to_fp16 {fp16}")

class PredDtype(Callback):
    "The dtypes of the student's predictions in training batches"
    order = 99
    def before_fit(self): self.dtypes = set()
    def after_pred(self):
        if self.training: self.dtypes.add(self.learn.pred.dtype)

dls = digit_scenes_dls(n_train=96, n_valid=32, size=32, bs=16, seed=0, device=torch.device(dev))
n_cls = len(dls.vocab)
def seg_learner(width, seed=0):
    "A `SegNet` of `width` with ranger, no progress bar or table (the recorder's values are printed below)"
    set_seed(seed, reproducible=True)
    learn = Learner(dls, SegNet(n_cls, width), loss_func=CrossEntropyLossFlat(axis=1), opt_func=ranger)
    learn.logger = noop
    return learn
def recorded(learn): return dict(zip(learn.recorder.metric_names[1:], learn.recorder.values[-1]))

teacher = seg_learner(16, seed=1)
with teacher.no_bar(): teacher.fit(1, 3e-3)
print('teacher:', recorded(teacher))
student = seg_learner(8).distill(teacher, pairs=[('dec3', 'dec3')], discriminator=Discriminator(n_cls, nf=16, n_layers=3, attn_layers=(2,)))
if fp16: student = student.to_fp16()
probe = PredDtype()
with student.no_bar(): student.fit(1, 3e-3, cbs=probe)

assert next(student.model.parameters()).device.type == torch.device(dev).type, "the student is not on the device"
assert next(teacher.model.parameters()).device.type == torch.device(dev).type, "the teacher is not on the device"
assert any(isinstance(c, MixedPrecision) for c in student.cbs) == fp16
if fp16: assert torch.float16 in probe.dtypes, f"to_fp16: predictions were {probe.dtypes}, expected float16 under autocast"
names, vals = student.recorder.metric_names, recorded(student)
print("student recorder:", {k: (round(float(v), 5) if v is not None else None) for k, v in vals.items()})
for k in ('train_loss', 'valid_loss', 'train_pi_loss', 'train_pa_loss', 'train_ho_loss', 'train_total_loss', 'train_d_loss',
          'valid_pi_loss', 'valid_pa_loss', 'valid_ho_loss', 'valid_total_loss'):
    assert k in vals, f"no {k} in the recorder: {names}"
    assert vals[k] is not None and math.isfinite(float(vals[k])), f"{k} = {vals[k]} is not finite"
assert all(math.isfinite(float(l)) for l in student.recorder.losses), "a non-finite batch loss"
print("OK: finite losses, all three terms" + (", float16 predictions" if fp16 else ""))
EOF
fi

section "summary"
if [ ${#FAILED[@]} -ne 0 ]; then
    echo "FAILED steps (${#FAILED[@]}):"; printf '  - %s\n' "${FAILED[@]}"; exit 1
fi
echo "all steps passed ($SECONDS s)"
