"""The mlstm-kernels Triton peers of our ops, imported by their submodule paths.

- ``hintra()``: ``mlstm_chunkwise__parallel_fw_Hintra``, the H step (same signature as ours).
- ``xl_chunk()``: ``mlstm_chunkwise__xl_chunk``, the whole chunkwise mLSTM as an autograd
  Function: its forward under ``torch.no_grad()``, forward + backward with inputs that require
  grad. Convention ``(q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states, eps,
  chunk_size, ...)``; its backward treats the normaliser as a constant (SPEC.md, "Gradients").
- ``recurrent_fw_C()``: ``mlstm_chunkwise__recurrent_fw_C``, the chunk-border states; note its
  argument order ``(matK, matV, vecF, vecI, ...)``.

Each returns ``(fn, how)``: the function and a line saying how it was imported, or ``(None,
why_not)``. mlstm-kernels is used installed or, failing that, from a carried wheel
(``.whl/mlstm_kernels-*.whl`` of the repository; it is pure Python and zipimport loads it). Its
package ``__init__`` files import every kernel family and ``einops``; where the plain import fails
it is retried with a minimal ``einops.rearrange`` stand-in, then with the parent packages'
``__init__`` files skipped.
"""
import functools
import glob
import importlib
import importlib.util
import os
import sys
import types
from typing import Callable, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XL_CHUNK = "mlstm_kernels.torch.chunkwise.triton_xl_chunk"

Peer = Tuple[Optional[Callable], str]


def hintra() -> Peer:
    return load(XL_CHUNK + ".fw_parallel", "mlstm_chunkwise__parallel_fw_Hintra")


def xl_chunk() -> Peer:
    return load(XL_CHUNK + ".fwbw", "mlstm_chunkwise__xl_chunk")


def recurrent_fw_C() -> Peer:
    return load(XL_CHUNK + ".fw_recurrent", "mlstm_chunkwise__recurrent_fw_C")


def triton_default_config(DHQK: int, DHHV: int) -> Tuple[int, int, int, int, int, int]:
    """The launch config mlstm-kernels' Hintra wrapper picks when given no hints:
    (siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages)."""
    bdq = min(64, next_pow2(DHQK))
    bdv = min(128, next_pow2(DHHV))
    return (32, 32, bdq, bdv, 4 if bdq >= 64 else 2, 1)


def next_pow2(x: int) -> int:
    return 1 << (int(x) - 1).bit_length()


def version() -> str:
    mod = sys.modules.get("mlstm_kernels")
    return getattr(mod, "__version__", "?") if mod else "not loaded"


# ---------------------------------------------------------------------------------------------
# The loader


@functools.lru_cache(maxsize=None)
def load(module: str, attr: str) -> Peer:
    """``module.attr`` of mlstm-kernels, trying a plain import, then with an einops stand-in,
    then with the parent packages' __init__ files skipped."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # depends on the machine
        return None, f"triton not importable ({type(e).__name__}: {e})"
    notes: List[str] = []
    if not _find_spec("mlstm_kernels"):
        whl = _add_wheel_to_path()
        if whl is None:
            return None, "mlstm_kernels is not installed (and no .whl/mlstm_kernels-*.whl)"
        notes.append(f"from wheel {os.path.basename(whl)}")

    errors = []
    for attempt in ("plain", "einops-shim", "skip-parent-inits"):
        if attempt == "einops-shim":
            if _find_spec("einops"):
                continue  # the real einops is there: a stand-in would not help
            _install_einops_shim()
            notes.append("einops missing: minimal rearrange stand-in")
        if attempt == "skip-parent-inits":
            if not _stub_parent_packages(module):
                break
            notes.append("parent package __init__ files skipped")
        try:
            fn = getattr(importlib.import_module(module), attr)
            if attempt == "plain":  # after an earlier load's stand-ins
                if getattr(sys.modules.get("einops"), "STAND_IN", False):
                    notes.append("with the einops stand-in")
                if getattr(sys.modules.get("mlstm_kernels.torch"), "STUB", False):
                    notes.append("parent package __init__ files skipped")
            how = f"{module}.{attr} (mlstm_kernels {version()}" + "".join("; " + n for n in notes) + ")"
            return fn, how
        except Exception as e:
            errors.append(f"{attempt}: {type(e).__name__}: {e}")
            _purge("mlstm_kernels")
    return None, f"{module}.{attr} not importable: " + " | ".join(errors)


def _find_spec(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False


def _add_wheel_to_path() -> Optional[str]:
    """Puts the newest carried wheel .whl/mlstm_kernels-*.whl on sys.path (zipimport)."""
    for cand in sorted(glob.glob(os.path.join(REPO, ".whl", "mlstm_kernels-*.whl")), reverse=True):
        if cand not in sys.path:
            sys.path.append(cand)
        return cand
    return None


def _purge(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def _stub_parent_packages(module: str) -> bool:
    """Registers empty packages for the parents of ``module`` below ``mlstm_kernels`` (whose own
    __init__ only sets __version__), so that importing ``module`` runs none of their __init__s."""
    spec = importlib.util.find_spec("mlstm_kernels")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = list(spec.submodule_search_locations)[0]
    importlib.import_module("mlstm_kernels")
    parts = module.split(".")
    for depth in range(2, len(parts)):
        pkg = ".".join(parts[:depth])
        mod = types.ModuleType(pkg)
        mod.__path__ = [os.path.join(root, *parts[1:depth])]
        mod.__package__ = pkg
        mod.STUB = True
        sys.modules[pkg] = mod
    return True


def _install_einops_shim() -> None:
    """A minimal ``einops.rearrange``, enough for mlstm-kernels' gate helpers
    (``"b nh (nc l) -> b nh nc l"``): splits of parenthesised groups, no reordering."""
    def rearrange(t, pattern: str, **sizes):
        lhs, rhs = (s.strip() for s in pattern.split("->"))
        groups: List[List[str]] = []
        cur: Optional[List[str]] = None
        for tok in lhs.replace("(", " ( ").replace(")", " ) ").split():
            if tok == "(":
                cur = []
            elif tok == ")":
                groups.append(cur)
                cur = None
            elif cur is not None:
                cur.append(tok)
            else:
                groups.append([tok])
        if [n for g in groups for n in g] != rhs.split():
            raise NotImplementedError(f"einops stand-in: only splitting patterns, got {pattern!r}")
        shape = []
        for axis, g in enumerate(groups):
            if len(g) == 1:
                shape.append(sizes.get(g[0], t.shape[axis]))
            elif sum(n in sizes for n in g) < len(g) - 1:
                raise NotImplementedError(f"einops stand-in: sizes missing for {g}")
            else:
                shape += [sizes.get(n, -1) for n in g]
        return t.reshape(shape)

    mod = types.ModuleType("einops")
    mod.rearrange = rearrange
    mod.STAND_IN = True
    sys.modules["einops"] = mod
