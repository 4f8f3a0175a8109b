"""Every rejected input raises RuntimeError with csrc/validate.cpp's message (CPU, and CUDA when
present: both go through the same validation)."""
import re

import pytest
import torch

import mlstm_ext
from conftest import make_inputs, op, requires_cuda

NAMES = ["matQ", "matK", "matV", "vecI", "vecF", "matC_all", "vecN_all", "scaM_all"]
# Base inputs: B=2, NH=3, S=8, DHQK=4, DHHV=5, L=4 (NC=2); all sizes distinct where it matters.
B, NH, S, DHQK, DHHV, L = 2, 3, 8, 4, 5, 4
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def grow(t, d, by=1):
    """t with size(d) larger by `by` (real values, so only the size is wrong)."""
    return torch.cat([t, t.narrow(d, 0, 1).expand(*[by if i == d else -1 for i in range(t.dim())])], d)


def set_(**changes):
    """A mutation: replace tensors (callables of the old tensor) and keyword arguments."""
    def mutate(t, kw):
        for k, fn in changes.items():
            if k in t:
                t[k] = fn(t[k])
            else:
                kw[k] = fn
    return mutate


LAYOUT = {"matQ": "(B, NH, S, DHQK)", "matK": "(B, NH, S, DHQK)", "matV": "(B, NH, S, DHHV)",
          "vecF": "(B, NH, S)", "matC_all": "(B, NH, (NC+1)*DHQK, DHHV)",
          "vecN_all": "(B, NH, (NC+1)*DHQK)", "scaM_all": "(B, NH, NC+1)"}
RANK = {"matQ": 4, "matK": 4, "matV": 4, "vecF": 3, "matC_all": 4, "vecN_all": 3, "scaM_all": 3}

SLOTS = ("{}.size(2) must hold NC+1 or NC state slots of DHQK = 4 rows "
         "(expected (NC+1)*DHQK = 12 or NC*DHQK = 8; NC = S / chunk_size = 2), got {}")
F32_SCALAR = "{} must be finite{} in the compute dtype (Float: magnitude at most 3.4e38), got "
OTHER_CHUNK = " (states made with another chunk_size or sequence length?)"

CASES = []
# Wrong rank, one dim fewer and one more, for each tensor.
for nm, r in RANK.items():
    CASES.append((f"rank-{nm}-less", set_(**{nm: lambda t: t[0]}), f"{nm} must have {r} dims {LAYOUT[nm]}, got {r - 1} dims with shape ["))
    CASES.append((f"rank-{nm}-more", set_(**{nm: lambda t: t.unsqueeze(0)}), f"{nm} must have {r} dims {LAYOUT[nm]}, got {r + 1} dims with shape [1, "))
for r, fn in [(2, lambda t: t[0]), (5, lambda t: t.reshape(B, NH, 2, 4, 1))]:
    CASES.append((f"rank-vecI-{r}", set_(vecI=fn), f"vecI must have 3 dims (B, NH, S) or 4 dims (B, NH, NC, L), got {r} dims with shape ["))

# Shape mismatches against (B, NH, S, DHQK, DHHV, NC, L).
sizes = [B, NH, S, DHQK]
for d in range(4):
    what = "DHQK (matQ.size(3))" if d == 3 else "matQ's"
    CASES.append((f"matK-size{d}", set_(matK=lambda t, d=d: grow(t, d)), f"matK.size({d}) must be {what} = {sizes[d]}, got {sizes[d] + 1} (matK has shape ["))
for nm in ["matV", "vecI", "vecF"]:
    for d, what in enumerate(["B", "NH", "S"]):
        CASES.append((f"{nm}-size{d}", set_(**{nm: lambda t, d=d: grow(t, d)}), f"{nm}.size({d}) must be {what} = {sizes[d]}, got {sizes[d] + 1}"))
for nm in ["matC_all", "vecN_all", "scaM_all"]:
    for d, what in enumerate(["B", "NH"]):
        CASES.append((f"{nm}-size{d}", set_(**{nm: lambda t, d=d: grow(t, d)}), f"{nm}.size({d}) must be {what} = {sizes[d]}, got {sizes[d] + 1}"))
CASES += [
    ("vecI4d-NC", set_(vecI=lambda t: t.reshape(B, NH, 4, 2)), "vecI.size(2) must be NC = S / chunk_size = 2, got 4"),
    ("vecI4d-L", set_(vecI=lambda t: grow(t.reshape(B, NH, 2, 4), 3)), "vecI.size(3) must be L = chunk_size = 4, got 5"),
    ("matC-DHHV", set_(matC_all=lambda t: grow(t, 3)), "matC_all.size(3) must be DHHV (matV.size(3)) = 5, got 6"),
    ("matV-DHHV", set_(matV=lambda t: grow(t, 3)), "matC_all.size(3) must be DHHV (matV.size(3)) = 6, got 5"),
    ("matC-rows-not-multiple", set_(matC_all=lambda t: grow(t, 2)), SLOTS.format("matC_all", 13) + OTHER_CHUNK),
    ("matC-too-many-slots", set_(matC_all=lambda t: grow(t, 2, 8)), SLOTS.format("matC_all", 20) + OTHER_CHUNK),
    ("matC-too-few", set_(matC_all=lambda t: t[:, :, :4]), SLOTS.format("matC_all", 4) + " (too few state slots)"),
    ("vecN-rows-not-multiple", set_(vecN_all=lambda t: t[:, :, :10]), SLOTS.format("vecN_all", 10) + OTHER_CHUNK),
    ("vecN-too-few", set_(vecN_all=lambda t: t[:, :, :4]), SLOTS.format("vecN_all", 4) + " (too few state slots)"),
    ("scaM-too-few", set_(scaM_all=lambda t: t[:, :, :1]), "scaM_all.size(2) must hold NC+1 or NC state slots (expected (NC+1) = 3 or NC = 2; NC = S / chunk_size = 2), got 1 (too few state slots)"),
    ("scaM-too-many", set_(scaM_all=lambda t: grow(t, 2, 3)), "scaM_all.size(2) must hold NC+1 or NC state slots (expected (NC+1) = 3 or NC = 2; NC = S / chunk_size = 2), got 6" + OTHER_CHUNK),
    ("states-empty", set_(matC_all=lambda t: t[:, :, :0], vecN_all=lambda t: t[:, :, :0],
                          scaM_all=lambda t: t[:, :, :0]), SLOTS.format("matC_all", 0) + " (too few state slots)"),
    # Chunking.
    ("S-not-multiple", set_(chunk_size=3), "the sequence length S = 8 (matQ.size(2)) must be a multiple of chunk_size = 3"),
    ("S-less-than-L", set_(chunk_size=16), "the sequence length S = 8 (matQ.size(2)) must be a multiple of chunk_size = 16"),
    ("chunk-zero", set_(chunk_size=0), "chunk_size must be positive, got 0"),
    ("chunk-negative", set_(chunk_size=-4), "chunk_size must be positive, got -4"),
    # Dtypes.
    ("matQ-int", set_(matQ=lambda t: t.to(torch.int32)), "matQ must be float32, bfloat16, float16 or float64 (CPU), got Int"),
    ("matK-bf16", set_(matK=lambda t: t.bfloat16()), "matK must have matQ's dtype (Float), got BFloat16"),
    ("matV-half", set_(matV=lambda t: t.half()), "matV must have matQ's dtype (Float), got Half"),
    ("matK-v-float32-q-bf16", set_(matQ=lambda t: t.bfloat16()), "matK must have matQ's dtype (BFloat16), got Float"),
    ("output-dtype-int", set_(output_dtype=torch.int32), "output_dtype must be float32, bfloat16, float16 or float64, got Int"),
    ("output-dtype-bool", set_(output_dtype=torch.bool), "output_dtype must be float32, bfloat16, float16 or float64, got Bool"),
    # Scalars.
    ("eps-negative", set_(eps=-1e-3), F32_SCALAR.format("eps", " and >= 0") + "-0.001"),
    ("eps-nan", set_(eps=float("nan")), F32_SCALAR.format("eps", " and >= 0")),
    ("eps-inf", set_(eps=float("inf")), F32_SCALAR.format("eps", " and >= 0")),
    ("eps-too-big-for-float32", set_(eps=1e39), F32_SCALAR.format("eps", " and >= 0")),
    ("qk_scale-nan", set_(qk_scale=float("nan")), F32_SCALAR.format("qk_scale", "")),
    ("qk_scale-inf", set_(qk_scale=float("-inf")), F32_SCALAR.format("qk_scale", "")),
    ("qk_scale-too-big-for-float32", set_(qk_scale=1e39), F32_SCALAR.format("qk_scale", "")),
]
for nm in ["vecI", "vecF", "matC_all", "vecN_all", "scaM_all"]:
    CASES.append((f"{nm}-long", set_(**{nm: lambda t: t.long()}), f"{nm} must be a floating tensor (float32, bfloat16, float16 or float64), got Long"))
    CASES.append((f"{nm}-bool", set_(**{nm: lambda t: t > 0}), f"{nm} must be a floating tensor (float32, bfloat16, float16 or float64), got Bool"))
# Launch hints: positive when given.
for nm in ["siz_b_LQ", "siz_b_LKV", "siz_b_DHQK", "siz_b_DHHV", "num_warps", "num_stages"]:
    for val in (0, -1):
        CASES.append((f"{nm}={val}", set_(**{nm: val}), f"launch hint {nm} must be positive when given, got {val}"))


def base(device):
    inp = make_inputs(B=B, NH=NH, S=S, DHQK=DHQK, DHHV=DHHV, L=L, device=device, seed=5)
    return dict(zip(NAMES, inp.args())), dict(chunk_size=L)


def call(fn, t, kw):
    return fn(*[t[nm] for nm in NAMES], **kw)


def test_base_inputs_are_valid():
    t, kw = base("cpu")
    outs = call(op, t, kw)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutate,msg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected(device, mutate, msg):
    t, kw = base(device)
    mutate(t, kw)
    with pytest.raises(RuntimeError, match=re.escape("parallel_fw_hintra: " + msg)):
        call(op, t, kw)


@pytest.mark.parametrize("mutate,msg", [CASES[0][1:], CASES[-1][1:]])
def test_rejected_by_wrapper(mutate, msg):
    t, kw = base("cpu")
    mutate(t, kw)
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        call(mlstm_ext.parallel_fw_hintra, t, kw)


# Mixed devices. Real mixes (CPU/CUDA) are in test_cuda_op.py; on a CPU-only machine the only other
# device is 'meta', and a meta tensor sends the call to the Meta (fake) kernel, not to validate.cpp.
def test_all_meta_gives_shapes():
    t, kw = base("cpu")
    t = {nm: x.to("meta") for nm, x in t.items()}
    matH, vecN, vecM = call(op, t, dict(kw, output_dtype=torch.float16))
    assert matH.device.type == vecN.device.type == vecM.device.type == "meta"
    assert matH.shape == (B, NH, S, DHHV) and vecN.shape == vecM.shape == (B, NH, S)
    assert matH.dtype == torch.float32 and vecN.dtype == vecM.dtype == torch.float16


@pytest.mark.parametrize("on_meta", ["matQ", "matK", "scaM_all"])
def test_mixed_cpu_meta_rejected(on_meta):
    """One meta tensor among CPU tensors must be rejected, not answered with uninitialised
    (or meta) outputs."""
    t, kw = base("cpu")
    t[on_meta] = t[on_meta].to("meta")
    with pytest.raises(RuntimeError, match="device"):
        call(op, t, kw)


@pytest.mark.parametrize("mutate,msg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected_on_meta(mutate, msg):
    """The Meta kernel (what torch.compile / torch.export trace with) runs the same validation."""
    t, kw = base("cpu")
    mutate(t, kw)
    t = {nm: x.to("meta") for nm, x in t.items()}
    with pytest.raises(RuntimeError, match=re.escape("parallel_fw_hintra: " + msg)):
        call(op, t, kw)


@pytest.mark.parametrize("mutate,msg", [c[1:] for c in CASES if c[0] in
                                        ("vecF-size2", "scaM-too-few", "eps-negative", "qk_scale-nan")],
                         ids=["vecF-size2", "scaM-too-few", "eps-negative", "qk_scale-nan"])
def test_rejected_when_compiled(mutate, msg):
    """torch.compile(fullgraph) refuses an invalid call while tracing, with eager's message."""
    torch._dynamo.reset()
    t, kw = base("cpu")
    mutate(t, kw)

    def fn(*args):
        return op(*args, **kw)

    with pytest.raises(Exception, match=re.escape(msg)):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(*[t[nm] for nm in NAMES])


def test_float64_runs_on_cpu_and_is_refused_on_cuda():
    t, kw = base("cpu")
    t = {nm: x.double() for nm, x in t.items()}
    outs = call(op, t, dict(kw, output_dtype=torch.float64))
    assert outs[0].dtype == torch.float64 and all(torch.isfinite(o).all() for o in outs)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="float64 inputs run on the CPU only"):
            call(op, {nm: x.cuda() for nm, x in t.items()}, kw)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_requiring_grad_are_refused(device):
    """No backward exists for the H step: an input that requires grad (under grad mode) is an
    error naming the inputs, never results whose backward() silently gives None."""
    t, kw = base(device)
    t["matQ"].requires_grad_(True)
    t["matC_all"].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"parallel_fw_hintra: this op has no backward, but matQ, matC_all require grad"):
        call(op, t, kw)
    with torch.no_grad():
        outs = call(op, t, kw)
    assert all(torch.isfinite(o).all() and not o.requires_grad for o in outs)
    detached = call(op, {nm: x.detach() for nm, x in t.items()}, kw)
    for a, b in zip(outs, detached):
        assert torch.equal(a, b)
