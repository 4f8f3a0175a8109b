"""mlstm_ext as a chunkwise kernel of the ``xlstm`` package (mlstm_ext.register_backend()).

An xLSTMLarge model with chunkwise_kernel="chunkwise--mlstm_ext" against the same model (same
weights) on mlstm_kernels' own PyTorch kernel "chunkwise--native_autograd": logits, final states
and parameter gradients, in training and inference mode; "chunkwise--mlstm_ext_custbw" against
"chunkwise--native_custbw"; bf16 against a float64 model.

xlstm and mlstm-kernels are optional dependencies; the tests that need them are skipped when they
are absent (install: pip install --no-deps xlstm==2.0.6 mlstm-kernels==2.0.6 einops==0.8.2).
The first two tests need neither.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import mlstm_ext
from conftest import BF16, F32, F64, assert_close, errors, requires_cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_XLSTM = all(importlib.util.find_spec(m) is not None for m in ("xlstm", "mlstm_kernels", "einops"))
needs_xlstm = pytest.mark.skipif(
    not HAVE_XLSTM, reason="xlstm / mlstm-kernels / einops not installed (pip install --no-deps "
    "xlstm==2.0.6 mlstm-kernels==2.0.6 einops==0.8.2)")


def run_child(code):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_import_does_not_import_optional_packages():
    out = run_child("import sys, mlstm_ext; print(sorted(m for m in ('xlstm', 'mlstm_kernels', 'einops') "
                    "if m in sys.modules))")
    assert out.strip() == "[]", out


def test_register_backend_without_packages_raises():
    """With mlstm_kernels unavailable (blocked in sys.modules), a clear ImportError."""
    out = run_child(
        "import sys\n"
        "sys.modules['mlstm_kernels'] = None\n"
        "import mlstm_ext\n"
        "try:\n"
        "    mlstm_ext.register_backend()\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n")
    assert "ImportError: mlstm_ext.register_backend() needs the optional package mlstm-kernels" in out, out
    assert "pip install --no-deps xlstm==2.0.6 mlstm-kernels==2.0.6" in out, out


# ----------------------------------------------------------------------------------------------
# With xlstm / mlstm_kernels


@needs_xlstm
def test_registry_lookup():
    from mlstm_kernels.torch import get_available_mlstm_kernels, get_mlstm_kernel

    from mlstm_kernels.torch import get_available_mlstm_step_kernels, get_mlstm_step_kernel

    names = mlstm_ext.register_backend()
    assert names == {"exact": "chunkwise--mlstm_ext", "normaliser_constant": "chunkwise--mlstm_ext_custbw",
                     "step": "mlstm_ext"}
    assert mlstm_ext.register_backend() == names  # idempotent
    from mlstm_ext import xlstm_backend

    assert get_mlstm_kernel("chunkwise--mlstm_ext") is xlstm_backend.mlstm_chunkwise__mlstm_ext
    assert get_mlstm_kernel("chunkwise--mlstm_ext_custbw") is xlstm_backend.mlstm_chunkwise__mlstm_ext_custbw
    assert {"chunkwise--mlstm_ext", "chunkwise--mlstm_ext_custbw"} <= set(get_available_mlstm_kernels())
    assert get_mlstm_step_kernel("mlstm_ext") is mlstm_ext.mlstm_step
    assert "mlstm_ext" in get_available_mlstm_step_kernels()


@needs_xlstm
@pytest.mark.parametrize("init", [False, True], ids=["zero-init", "init"])
def test_kernel_vs_native_autograd(seed, init):
    """The registered kernel and mlstm_kernels' native_autograd, called as xlstm calls them."""
    from mlstm_kernels.torch import get_mlstm_kernel

    from test_chunkwise import make_qkvif

    mlstm_ext.register_backend()
    qkvif, st = make_qkvif(2, 2, 64, 8, 16, F32, init, seed=seed)
    kw = dict(return_last_states=True, eps=1e-6, chunk_size=16, autocast_kernel_dtype=BF16)
    ours = get_mlstm_kernel("chunkwise--mlstm_ext")(*qkvif, *st, **kw)
    ref = get_mlstm_kernel("chunkwise--native_autograd")(*qkvif, *st, **kw)
    assert_close(ours[0], ref[0], 2e-5, "H")
    for name, a, b in zip(("C", "n", "m"), ours[1], ref[1]):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, 2e-5, name)


def small_config(kernel, mode, step_kernel="native"):
    from xlstm.xlstm_large import xLSTMLargeConfig

    return xLSTMLargeConfig(
        embedding_dim=32, num_heads=2, num_blocks=2, vocab_size=128, chunk_size=16,
        chunkwise_kernel=kernel, sequence_kernel="native_sequence__native", step_kernel=step_kernel,
        mode=mode, return_last_states=True, autocast_kernel_dtype="bfloat16")


def make_models(kernels, mode, seed, dtype=F32, step_kernels=None):
    """One xLSTMLarge per kernel name (and step kernel name), all with the same (random) weights."""
    from xlstm.xlstm_large import xLSTMLarge

    mlstm_ext.register_backend()
    torch.manual_seed(seed)
    steps = step_kernels or ["native"] * len(kernels)
    models = [xLSTMLarge(small_config(kernels[0], mode, steps[0]))]
    for name, step in zip(kernels[1:], steps[1:]):
        m = xLSTMLarge(small_config(name, mode, step))
        m.load_state_dict(models[0].state_dict())
        models.append(m)
    with torch.no_grad():  # gate biases away from their defaults, so that m moves
        g = torch.Generator().manual_seed(seed + 1)
        for b in range(len(models[0].backbone.blocks)):
            ibias = torch.randn(2, generator=g)
            for m in models:
                layer = m.backbone.blocks[b].mlstm_layer
                layer.fgate_preact.bias.copy_(torch.linspace(1.0, 4.0, 2))
                layer.igate_preact.bias.copy_(ibias)
    return [m.to(dtype) for m in models]


def compare_states(a, b, tol):
    assert a.keys() == b.keys()
    for blk in a:
        for name, x, y in zip(("C", "n", "m"), a[blk], b[blk]):
            assert x.shape == y.shape and x.dtype == y.dtype, (blk, name, x.shape, y.shape)
            assert_close(x, y, tol, f"block {blk} {name}")


@needs_xlstm
@pytest.mark.parametrize("S", [32, 37], ids=["S32", "S37"])
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_xlstm_forward_matches_native(seed, mode, S):
    """Logits and final states equal native_autograd's to float32 rounding. Inference mode pads
    S = 37 to the chunk (mlstm_kernels' wrapper) and continues with a one-token step from the
    states; train mode needs S a multiple of the chunk."""
    if mode == "train" and S % 16:
        pytest.skip("train mode needs S a multiple of chunk_size (use train_with_padding)")
    ours, native = make_models(["chunkwise--mlstm_ext", "chunkwise--native_autograd"], mode, seed)
    x = torch.randint(0, 128, (2, S), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        lo, so = ours(x)
        ln, sn = native(x)
        assert_close(lo, ln, 2e-5, "logits")
        compare_states(so, sn, 2e-5)
        if mode == "inference":  # generation step from the states (mlstm_kernels' step kernel)
            nxt = x[:, -1:]
            lo1, so = ours(nxt, so)
            ln1, sn = native(nxt, sn)
            assert_close(lo1, ln1, 2e-5, "logits after one step")
            compare_states(so, sn, 2e-5)


@needs_xlstm
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])])
def test_xlstm_generation_with_our_step_kernel(seed, device):
    """Inference: a prefill, then eight one-token steps (xlstm's generation loop) with
    step_kernel="mlstm_ext" against the native chunkwise and step kernels: logits and states equal
    to float32 rounding at every step (on CUDA our steps run the fused step kernel)."""
    ours, native = make_models(["chunkwise--mlstm_ext", "chunkwise--native_autograd"], "inference",
                               seed, step_kernels=["mlstm_ext", "native"])
    ours, native = ours.to(device), native.to(device)
    x = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        lo, so = ours(x)
        ln, sn = native(x)
        assert_close(lo, ln, 2e-5, "logits after the prefill")
        for t in range(8):
            nxt = lo[:, -1:].argmax(-1)
            lo, so = ours(nxt, so)
            ln, sn = native(nxt, sn)
            assert_close(lo, ln, 2e-5, f"logits at step {t}")
            compare_states(so, sn, 2e-5)


@needs_xlstm
@pytest.mark.parametrize("ours_name,native_name", [
    ("chunkwise--mlstm_ext", "chunkwise--native_autograd"),
    ("chunkwise--mlstm_ext_custbw", "chunkwise--native_custbw"),
], ids=["exact", "normaliser_constant"])
def test_xlstm_training_step_matches_native(seed, ours_name, native_name):
    """loss.backward() through the model: every parameter gradient equals the native backend's
    with the same gradient convention to float32 rounding, judged against the native backend in
    float64: ours is within 3x of the float32 native backend's own error (+1e-6). (The input-gate
    bias gradient is a sum with much cancellation: both backends round it at 1e-5..1e-4.)"""
    ours, native, native64 = make_models([ours_name, native_name, native_name], "train", seed)
    native64 = native64.to(F64)
    x = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(seed))
    for m in (ours, native, native64):
        logits, _ = m(x[:, :32])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), x[:, 1:].reshape(-1))
        loss.backward()
    for (name, po), (_, pn), (_, p64) in zip(ours.named_parameters(), native.named_parameters(),
                                             native64.named_parameters()):
        assert po.grad is not None and pn.grad is not None, name
        assert po.grad.dtype == F32 and torch.isfinite(po.grad).all(), name
        err_ours, _ = errors(po.grad, p64.grad)
        err_native, _ = errors(pn.grad, p64.grad)
        assert err_ours <= 3 * err_native + 1e-6, \
            f"grad {name}: ours {err_ours:.3g} vs float64, native float32 {err_native:.3g}"


@needs_xlstm
def test_xlstm_conventions_agree_under_head_norm(seed):
    """In xLSTMLarge the two gradient conventions give the same parameter gradients (up to the
    norm's eps): the per-head norm right after the mLSTM makes the loss invariant to the scale of
    each row of H, i.e. to the denominator that "normaliser_constant" holds fixed. (On the kernel
    alone they differ a lot: test_autograd.py::test_grad_conventions_differ.)"""
    exact, cust = make_models(["chunkwise--mlstm_ext", "chunkwise--mlstm_ext_custbw"], "train", seed)
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(seed))
    for m in (exact, cust):
        logits, _ = m(x)
        logits.square().mean().backward()
    # float32 rounding of the worst-conditioned gradient (the input-gate bias) is ~1e-4; the
    # conventions themselves differ by order 1 wherever they differ.
    for (name, pe), (_, pc) in zip(exact.named_parameters(), cust.named_parameters()):
        if pe.grad.abs().max() > 0:
            assert_close(pc.grad, pe.grad, 1e-3, f"grad {name}")


@needs_xlstm
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_xlstm_bf16_at_least_as_accurate_as_native(seed, mode):
    """A bf16 model on our kernel is at least as close to the float64 model as the same bf16
    model on native_autograd (which keeps its states in bf16; ours keeps them in float32). The
    native side runs in train mode: in inference mode native_autograd cannot take bf16 inputs (the
    wrapper's float32 initial states meet bf16 keys in a matmul)."""
    ours, native, ref = make_models(["chunkwise--mlstm_ext", "chunkwise--native_autograd",
                                     "chunkwise--native_autograd"], "train", seed)
    if mode == "inference":
        ours = make_models(["chunkwise--mlstm_ext"], "inference", seed)[0]
    ours, native, ref = ours.to(BF16), native.to(BF16), ref.to(F64)
    x = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        l64, _ = ref(x)
        lo, _ = ours(x)
        ln, _ = native(x)
    err_ours, _ = errors(lo, l64)
    err_native, _ = errors(ln, l64)
    assert lo.dtype == BF16 and torch.isfinite(lo).all()
    assert err_ours <= err_native * 1.05, f"ours {err_ours:.3g} vs native {err_native:.3g}"


@needs_xlstm
@pytest.mark.parametrize("mode,S", [("train", 32), ("train_with_padding", 37), ("inference", 37)])
def test_mlstm_backend_module_matches_native(seed, mode, S):
    """mlstm_kernels' mLSTMBackend (the module each xlstm layer holds) on our kernel vs on
    native_autograd, in each of its modes ("train_with_padding" pads with zeros and cannot return
    states; xLSTMLarge cannot use it, see README)."""
    from mlstm_kernels.torch.backend_module import mLSTMBackend, mLSTMBackendConfig

    from test_chunkwise import make_qkvif

    mlstm_ext.register_backend()
    rls = mode != "train_with_padding"
    backends = [mLSTMBackend(mLSTMBackendConfig(chunkwise_kernel=name, mode=mode, chunk_size=16,
                                                return_last_states=rls, step_kernel="native",
                                                sequence_kernel="native_sequence__native"))
                for name in ("chunkwise--mlstm_ext", "chunkwise--native_autograd")]
    qkvif, _ = make_qkvif(2, 2, S, 8, 16, F32, False, seed=seed)
    ours, ref = (b(*qkvif) for b in backends)
    if not rls:
        ours, ref = (ours, None), (ref, None)
    assert_close(ours[0], ref[0], 2e-5, "H")
    if rls:
        for name, a, b in zip(("C", "n", "m"), ours[1], ref[1]):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert_close(a, b, 2e-5, name)
