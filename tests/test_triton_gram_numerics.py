"""Numerics of the Triton Gram helpers (``regkernels.triton.gram``, docs/gram.md): tensor-core
products, unit-stride layouts, correctly rounded divisions and roots.

Two test-only kernels below (``probe_fwd_kernel``, ``probe_bwd_kernel``) call the helpers with
the constexprs a launch gets from ``TG.tile_config`` (and every LAYOUT), independently of the
grouped kernels' own signatures:

* interpreted (TRITON_INTERPRET=1, CPU tensors): per-pair values and the backward's
  ``dX = P·X`` against float64 for float32 / float16 / bfloat16 inputs, each layout on its
  own memory layout (a row-contiguous X, the transposed view a "cols" Gram reads, strided);
* compiled for sm_90 without a GPU (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``, in a
  subprocess without TRITON_INTERPRET): the PTX has tensor-core MMAs of the right type for each
  dtype, no approximate division or square root, ptxas reports no spills, and LAYOUT 2 loads
  with the Gram index as the fast axis.

And the threshold decisions of diversity on cosines exactly at, just under and just over tau,
through the grouped kernels, equal the float64 reference's.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from regkernels import _ext  # noqa: E402
from regkernels.reference import gram as R  # noqa: E402
from regkernels.triton import gram as TG  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = _ext.triton_interpreted()

# ----------------------------------------------------------------- probe kernels

FRAME, DIVERSITY, ORTHOGONALITY, MHE = 0, 1, 2, 3


@triton.jit
def probe_fwd_kernel(X, SQ, OUT, p, n, xs_r, xs_c, A, B, tau, eps, pf,
                     KIND: tl.constexpr, INCLUSIVE: tl.constexpr, MHE_S: tl.constexpr,
                     LAYOUT: tl.constexpr, NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (ib, jb) writes the tile [I, J] of the kind's per-pair quantity to OUT (p × p):
    frame |V| off the diagonal plus the coefficients' sum on it, diversity mask·C², orthogonality V,
    MHE e_ij + h_ij·cos_ij."""
    ib = tl.program_id(0)
    jb = tl.program_id(1)
    rows_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rows_i < p
    V, rows_j, mask_j, valid = TG._gram_tile(X, xs_r, xs_c, rows_i, mask_i, jb, p, n,
                                             BLOCK_I, BLOCK_J, BLOCK_K, LAYOUT, NATIVE_DOT, DOT_PRECISION)
    ii = rows_i[:, None]
    jj = rows_j[None, :]
    sq_i = tl.load(SQ + rows_i, mask=mask_i, other=1.0)
    sq_j = tl.load(SQ + rows_j, mask=mask_j, other=1.0)
    if KIND == 0:
        gd, gr = TG._frame_coefficients(sq_i, sq_i * 0.5, A, B, pf)
        out = tl.where(ii == jj, (gd + gr)[:, None], tl.abs(V))
    elif KIND == 1:
        C, q_i, q_j = TG._diversity_cosine(V, sq_i, sq_j)
        keep = tl.where((ii != jj) & TG._over_threshold(C, tau, INCLUSIVE), 1.0, 0.0)
        out = C * C * keep
    elif KIND == 2:
        out = V
    else:
        nu_i = TG._mhe_nu(sq_i, eps)
        nu_j = TG._mhe_nu(sq_j, eps)
        cos, nn = TG._mhe_cosine(V, nu_i, nu_j)
        off = valid & (ii != jj)
        delta = TG._mhe_delta(cos, off)
        e = tl.where(off, TG._mhe_energy(delta, MHE_S), 0.0)
        h = tl.where(off, TG._mhe_denergy_dcos(delta, MHE_S) * TG._inv_pairs(pf), 0.0)
        out = e + h * cos
    tl.store(OUT + ii * p + jj, out, mask=valid)


@triton.jit
def probe_bwd_kernel(X, SQ, T, DX, p, n, xs_r, xs_c, ds_r, ds_c, tau, eps,
                     KIND: tl.constexpr, MHE_S: tl.constexpr,
                     LAYOUT: tl.constexpr, NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program ib: ``dX[I, :] = diag_I·X[I, :] + Σ_J P[I, J] X[J, :]`` for diversity (KIND 1,
    inclusive) or MHE (KIND 3), the backward's P and row-norm diagonal from the row sums T
    (t_i, resp. u_i). DX is zero on entry."""
    ib = tl.program_id(0)
    pf = p.to(tl.float32)
    rows_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rows_i < p
    sq_i = tl.load(SQ + rows_i, mask=mask_i, other=1.0)
    t_i = tl.load(T + rows_i, mask=mask_i, other=0.0)
    if KIND == 1:
        diag = TG._diversity_diag(sq_i, t_i)
    else:
        nu_i = TG._mhe_nu(sq_i, eps)
        diag = TG._mhe_diag(sq_i, t_i, eps)
    diag = tl.where(mask_i, diag, 0.0)
    local = tl.arange(0, BLOCK_I)
    D = tl.where(local[:, None] == local[None, :], diag[:, None], 0.0)
    TG._accumulate_rows(DX, ds_r, ds_c, rows_i, mask_i, D, X, xs_r, xs_c, rows_i, mask_i, n,
                        BLOCK_K, LAYOUT, NATIVE_DOT, DOT_PRECISION)
    for jb in range(0, tl.cdiv(p, BLOCK_J)):
        V, rows_j, mask_j, valid = TG._gram_tile(X, xs_r, xs_c, rows_i, mask_i, jb, p, n,
                                                 BLOCK_I, BLOCK_J, BLOCK_K, LAYOUT, NATIVE_DOT, DOT_PRECISION)
        ii = rows_i[:, None]
        jj = rows_j[None, :]
        sq_j = tl.load(SQ + rows_j, mask=mask_j, other=1.0)
        if KIND == 1:
            C, q_i, q_j = TG._diversity_cosine(V, sq_i, sq_j)
            keep = tl.where((ii != jj) & TG._over_threshold(C, tau, True), 1.0, 0.0)
            P = TG._div(2.0 * tl.where(valid, C * keep, 0.0), q_i[:, None] * q_j[None, :])
        else:
            nu_j = TG._mhe_nu(sq_j, eps)
            cos, nn = TG._mhe_cosine(V, nu_i, nu_j)
            off = valid & (ii != jj)
            delta = TG._mhe_delta(cos, off)
            h = tl.where(off, TG._mhe_denergy_dcos(delta, MHE_S) * TG._inv_pairs(pf), 0.0)
            P = TG._div(h, nn)
        P = tl.where(valid, P, 0.0)
        TG._accumulate_rows(DX, ds_r, ds_c, rows_i, mask_i, P, X, xs_r, xs_c, rows_j, mask_j, n,
                            BLOCK_K, LAYOUT, NATIVE_DOT, DOT_PRECISION)


_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


def compile_sm90(kernel: str, dtype: str, kind: int, layout: int, precision: str | None = None, mhe_s: int = 2,
                 blocks: tuple[int, int, int] | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, stride_type: str = "i64"):
    """Compile a probe for sm_90 (no GPU needed) with ``TG.tile_config(dtype, interpreted=False)``
    (``precision``, ``blocks``, warps and stages override it); returns the CompiledKernel."""
    import torch
    from triton.backends.compiler import GPUTarget

    cfg = TG.tile_config(getattr(torch, dtype), interpreted=False)
    if precision is not None:
        cfg["DOT_PRECISION"] = precision
    if blocks is not None:
        cfg.update(BLOCK_I=blocks[0], BLOCK_J=blocks[1], BLOCK_K=blocks[2])
    options = {"num_warps": num_warps or cfg.pop("num_warps"), "num_stages": num_stages or cfg.pop("num_stages")}
    cfg.pop("num_warps", None)
    cfg.pop("num_stages", None)
    if kernel == "fwd":
        fn = probe_fwd_kernel
        sig = {"X": _PTR[dtype], "SQ": "*fp32", "OUT": "*fp32", "p": "i32", "n": "i32", "xs_r": "i64",
               "xs_c": "i64", "A": "fp32", "B": "fp32", "tau": "fp32", "eps": "fp32", "pf": "fp32"}
        const = dict(KIND=kind, INCLUSIVE=True, MHE_S=mhe_s, LAYOUT=layout, **cfg)
    else:
        fn = probe_bwd_kernel
        sig = {"X": _PTR[dtype], "SQ": "*fp32", "T": "*fp32", "DX": "*fp32", "p": "i32", "n": "i32",
               "xs_r": "i64", "xs_c": "i64", "ds_r": "i64", "ds_c": "i64", "tau": "fp32", "eps": "fp32"}
        const = dict(KIND=kind, MHE_S=mhe_s, LAYOUT=layout, **cfg)
    for name in ("xs_r", "xs_c", "ds_r", "ds_c"):
        if name in sig:
            sig[name] = stride_type
    for name in const:
        sig[name] = "constexpr"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


# ----------------------------------------------------------------- interpreted values

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs the probes on CPU tensors (TRITON_INTERPRET=1)")

# (dtype, atol, rtol) vs float64 of the same rounded input, atol relative to the largest |truth|
# entry: every dtype is computed in float32 (the interpreter's products are float32 numpy)
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-5, 2e-5), (torch.bfloat16, 5e-5, 5e-5)]
DTYPE_IDS = ["float32", "float16", "bfloat16"]
P_, N_ = 40, 37            # 2 × 2 Gram blocks of 32 and 2 inner chunks under the interpreter
POISON = 7                 # a stride a unit-stride LAYOUT must not read
A_, B_, TAU, EPS = 0.6, 1.4, 0.1, 1e-4


def _store(X: torch.Tensor, layout: int):
    """X (p × n) in the memory layout ``layout`` stands for: (tensor holding it, s_r, s_c) as
    the helpers address it (``base + i·s_r + t·s_c``); a unit-stride layout gets POISON for the
    stride it must ignore."""
    p, n = X.shape
    if layout == 1:   # row-contiguous: the "rows" side of a contiguous W
        return X.contiguous(), n, POISON
    if layout == 2:   # X = Wᵀ of a contiguous W (n × p): the "cols" side
        return X.T.contiguous(), POISON, p
    buf = torch.zeros(p * (2 * n + 3) + 2 * n, dtype=X.dtype)
    view = buf.as_strided((p, n), (2 * n + 3, 2))
    view.copy_(X)
    return buf, 2 * n + 3, 2


def _input(dtype):
    return (torch.randn(P_, N_, dtype=torch.float64) / N_ ** 0.5).to(dtype)


def _probe_fwd(X, kind, layout, tau=TAU):
    cfg = TG.tile_config(X.dtype, interpreted=True)
    buf, s_r, s_c = _store(X, layout)
    sq = X.double().square().sum(1).float()
    out = torch.full((P_, P_), float("nan"))
    grid = (triton.cdiv(P_, cfg["BLOCK_I"]), triton.cdiv(P_, cfg["BLOCK_J"]))
    probe_fwd_kernel[grid](buf, sq, out, P_, N_, s_r, s_c, A_, B_, tau, EPS, float(P_),
                           KIND=kind, INCLUSIVE=True, MHE_S=2, LAYOUT=layout, **cfg)
    return out, sq


def _fwd_truth(X64, sq, kind, tau=TAU):
    sq = sq.double()
    V = X64 @ X64.T
    eye = torch.eye(P_, dtype=torch.bool)
    if kind == FRAME:
        hi = torch.relu(sq + sq / 2 - B_)
        return torch.where(eye, torch.diag(4 * hi / P_), V.abs())
    if kind == DIVERSITY:
        q = sq.sqrt().clamp_min(1e-12)
        C = V / (q[:, None] * q[None, :])
        return C.square() * ((C.abs() >= tau) & ~eye)
    if kind == ORTHOGONALITY:
        return V
    nu = (sq + EPS).sqrt()
    cos = V / (nu[:, None] * nu[None, :])
    delta = torch.where(eye, 1.0, 2 - 2 * cos)
    e = 1 / delta
    h = 2 / delta.square() / (P_ * (P_ - 1) / 2)
    return torch.where(eye, 0.0, e + h * cos)


@needs_interpreter
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", [FRAME, DIVERSITY, ORTHOGONALITY, MHE], ids=["frame", "diversity", "orth", "mhe"])
def test_probe_forward_every_layout(kind, dtype, atol, rtol):
    X = _input(dtype)
    outs = [_probe_fwd(X, kind, layout) for layout in (0, 1, 2)]
    truth = _fwd_truth(X.double(), outs[0][1], kind)
    scale = truth.abs().max().item()
    for out, _ in outs:
        torch.testing.assert_close(out.double(), truth, atol=atol * scale, rtol=rtol)
    # the same tile, whichever way it was addressed
    assert torch.equal(outs[1][0], outs[0][0]) and torch.equal(outs[2][0], outs[0][0])


def _bwd_truth(X64, kind):
    X = X64.clone().requires_grad_()
    if kind == DIVERSITY:
        R.diversity_penalty(X, TAU, True).backward()
        with torch.no_grad():
            q = X64.norm(dim=1).clamp_min(1e-12)
            C = (X64 @ X64.T) / (q[:, None] * q[None, :])
            keep = (C.abs() >= TAU) & ~torch.eye(P_, dtype=torch.bool)
            t = (C.square() * keep).sum(1)
    else:
        R.mhe_penalty(X, 2, False, EPS).backward()
        with torch.no_grad():
            nu = (X64.square().sum(1) + EPS).sqrt()
            cos = (X64 @ X64.T) / (nu[:, None] * nu[None, :])
            delta = torch.where(torch.eye(P_, dtype=torch.bool), 1.0, 2 - 2 * cos)
            h = torch.where(torch.eye(P_, dtype=torch.bool), 0.0, 2 / delta.square()) / (P_ * (P_ - 1) / 2)
            t = (h * cos).sum(1)
    return X.grad, t


@needs_interpreter
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", [DIVERSITY, MHE], ids=["diversity", "mhe"])
@pytest.mark.parametrize("layout", [0, 1, 2])
def test_probe_backward_gradient(kind, layout, dtype, atol, rtol):
    X = _input(dtype)
    truth, t = _bwd_truth(X.double(), kind)
    cfg = TG.tile_config(dtype, interpreted=True)
    buf, s_r, s_c = _store(X, layout)
    dbuf, d_r, d_c = _store(torch.zeros(P_, N_), layout)
    sq = X.double().square().sum(1).float()
    probe_bwd_kernel[(triton.cdiv(P_, cfg["BLOCK_I"]),)](buf, sq, t.float(), dbuf, P_, N_, s_r, s_c, d_r, d_c,
                                                         TAU, EPS, KIND=kind, MHE_S=2, LAYOUT=layout, **cfg)
    dX = dbuf.as_strided((P_, N_), (N_, 1) if layout == 1 else (1, P_) if layout == 2 else (d_r, d_c))
    torch.testing.assert_close(dX.double(), truth, atol=atol * truth.abs().max().item(), rtol=rtol)


def test_tile_config(monkeypatch):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        interp = TG.tile_config(dtype, interpreted=True)
        assert interp == dict(BLOCK_I=TG.BLOCK_I, BLOCK_J=TG.BLOCK_J, BLOCK_K=TG.BLOCK_K, NATIVE_DOT=False,
                              DOT_PRECISION="ieee")
        gpu = TG.tile_config(dtype, interpreted=False)
        assert gpu["NATIVE_DOT"] is True and gpu["DOT_PRECISION"] == "tf32x3"
        assert (gpu["BLOCK_I"], gpu["BLOCK_J"], gpu["BLOCK_K"]) == (TG.GPU_BLOCK_I, TG.GPU_BLOCK_J, TG.GPU_BLOCK_K)
        assert min(gpu["BLOCK_I"], gpu["BLOCK_J"], gpu["BLOCK_K"]) >= 16  # tl.dot's smallest tile
        assert gpu["num_warps"] == TG.GPU_NUM_WARPS
        assert gpu["num_stages"] == (TG.GPU_NUM_STAGES_FP32 if dtype == torch.float32 else TG.GPU_NUM_STAGES)
    monkeypatch.setattr(TG, "FP32_DOT", "ieee")
    assert TG.tile_config(torch.float32, interpreted=False)["DOT_PRECISION"] == "ieee"
    monkeypatch.setattr(TG, "FP32_DOT", "tf32")
    with pytest.raises(ValueError, match="FP32_DOT must be 'tf32x3' or 'ieee'"):
        TG.tile_config(torch.float32, interpreted=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        TG.tile_config(torch.float64, interpreted=False)


# ----------------------------------------------------------------- diversity decisions at tau

# Rows of norm 4 with integer entries: every V_ij is an integer and q = 4, so each cosine
# (0.25, 0.5, 0.625, 0.75) is exact in float32 and in float64, in any input dtype. A tau at,
# one float32 ulp under or over a cosine must decide as the float64 reference does.
_TIE_ROWS = [[4] + [0] * 15, [1] * 16, [3] + [1] * 7 + [0] * 8, [2] * 4 + [0] * 12]
_COSINES = [0.25, 0.5, 0.625, 0.75]


def _taus():
    out = []
    for c in _COSINES:
        c32 = np.float32(c)
        out += [float(np.nextafter(c32, np.float32(0))), c, float(np.nextafter(c32, np.float32(1)))]
    return out


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS)
def test_diversity_decisions_at_tau(dtype):
    W = torch.tensor([_TIE_ROWS], dtype=dtype)
    for tau in _taus():
        for inclusive in (True, False):
            values, stats = TG.gram_penalty_forward([W], "diversity", [0], [tau, float(inclusive)])
            truth = R.diversity_penalty(W.double(), tau, inclusive)
            expect = sum(c * c * n for c, n in zip([0.25, 0.5, 0.625, 0.75], [1, 2, 1, 2])
                         if (c >= tau if inclusive else c > tau))
            assert truth.item() == expect
            assert values.item() == expect, (tau, inclusive)
            # the backward recomputes the tiles and the mask: its gradient is the reference's
            grad = torch.ones(1)
            (dW,) = TG.gram_penalty_backward([W], "diversity", [0], [tau, float(inclusive)], stats, grad)
            X = W.double().requires_grad_()
            R.diversity_penalty(X, tau, inclusive).backward()
            torch.testing.assert_close(dW.double(), X.grad, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------- sm_90 static compile

def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# (probe, dtype, kind, layout, precision override)
STATIC_CASES = [
    ("fwd", "bfloat16", DIVERSITY, 1, None),
    ("fwd", "float16", MHE, 1, None),
    ("fwd", "float32", MHE, 2, None),
    ("fwd", "float32", DIVERSITY, 1, "ieee"),
    ("bwd", "bfloat16", DIVERSITY, 2, None),
    ("bwd", "float16", MHE, 1, None),
    ("bwd", "float32", MHE, 1, None),
]


def static_report(cases) -> list[dict]:
    """Compile each probe for sm_90 (run without TRITON_INTERPRET, no GPU needed): per case the
    PTX's MMA instructions and approximate divisions / roots, ptxas's registers and stack
    (spill) bytes from the cubin, and the order of the blocked layouts of the 2-D global loads
    (``tt.load``, or the ``async_copy_global_to_local`` that pipelines them into shared memory)."""
    out = []
    for kernel, dtype, kind, layout, precision in cases:
        ck = compile_sm90(kernel, dtype, kind, layout, precision)
        ptx = ck.asm["ptx"]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        reg, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
        ttgir = ck.asm["ttgir"]
        layouts = dict(re.findall(r"^(#blocked\d*) = #ttg\.blocked<(.*)>$", ttgir, re.M))
        load_orders = sorted({re.search(r"order = \[([\d, ]+)\]", layouts[m]).group(1)
                              for m in re.findall(r"(?:tt\.load|ttg\.async_copy_global_to_local) .*?"
                                                 r"tensor<\d+x\d+x!tt\.ptr<\w+>, (#blocked\d*)>", ttgir)})
        out.append(dict(case=[kernel, dtype, kind, layout, precision], regs=reg, stack=stack,
                        mma=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.\w+\.f32\.(\w+)\.\w+", ptx)
                                       + re.findall(r"\bmma\.sync\.aligned\.\w+\.row\.col\.f32\.(\w+)\.", ptx))),
                        n_mma=len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\b", ptx)),
                        approx=sorted(set(re.findall(r"\b(div\.full\.f32|div\.approx\.\S+|sqrt\.approx\.\S+|"
                                                     r"rsqrt\.approx\.\S+|rcp\.approx\.\S+)", ptx))),
                        load_orders=load_orders))
    return out


@pytest.fixture(scope="module")
def static():
    if not os.path.exists(_tool("cuobjdump")):
        pytest.skip("Triton's bundled cuobjdump is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    code = ("import json, test_triton_gram_numerics as t; "
            "print('STATIC' + json.dumps(t.static_report(t.STATIC_CASES)))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("STATIC"))
    return {tuple(r["case"][:4]) + (r["case"][4],): r for r in json.loads(line[len("STATIC"):])}


@pytest.mark.parametrize("case", STATIC_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sm90_static(static, case):
    r = static[tuple(case)]
    kernel, dtype, kind, layout, precision = case
    # tensor cores: the Gram tile on the input dtype, float32 at tf32 (tf32x3), none for "ieee"
    if precision == "ieee":
        assert r["n_mma"] == 0, r
    else:
        want = {"bfloat16": "bf16", "float16": "f16", "float32": "tf32"}[dtype]
        assert want in r["mma"] and r["n_mma"] > 0, r
        if kernel == "bwd" and dtype != "float32":
            # P·X: float32 P split into bf16 halves (bf16x3) beside the fp16 Gram tile
            assert "bf16" in r["mma"], r
    # correctly rounded: no approximate division, reciprocal or square root anywhere
    assert r["approx"] == [], r
    assert r["stack"] == 0, r   # no spills
    # LAYOUT 2: the Gram index is the fast axis of every load (order [0, 1]); 1: the inner index
    assert r["load_orders"] == (["0, 1"] if layout == 2 else ["1, 0"]), r


# ----------------------------------------------------------------- sm_90: the real kernels

def real_kernels_report() -> list[dict]:
    """Compile the grouped kernels through their launchers for sm_90 (gpu_static's stub driver,
    CPU tensors, nothing runs): a forward + backward of every kind (MHE with and without half) on
    a 96 × 80 bfloat16 matrix and a 40 × 72 float32 one, the backward on the P path and, with
    P_MAX_SIDE = 0, on the split path. Per compiled kernel: its name, input dtype, whether the PTX
    has an approximate division / reciprocal / square root, and its tensor-core instruction count."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from regkernels.bench import gpu_static as GS

    driver.set_active(GS._StubDriver.make())
    gen = torch.Generator().manual_seed(0)
    # mhe params (s, half, eps, angular): the angular variants too (arccos built from sqrt_rn and _div)
    calls = [("frame", (0.5, 2.0)), ("diversity", (0.3, 1.0)), ("orthogonality", ()), ("mhe", (2, 0.0, 1e-4, 0.0)),
             ("mhe", (1, 1.0, 1e-4, 0.0)), ("mhe", (0, 0.0, 1e-4, 0.0)), ("mhe", (2, 1.0, 1e-4, 1.0)),
             ("mhe", (0, 0.0, 1e-4, 1.0))]
    for dtype, shape in ((torch.bfloat16, (96, 80)), (torch.float32, (40, 72))):
        for p_max in (TG.P_MAX_SIDE, 0):
            old, TG.P_MAX_SIDE = TG.P_MAX_SIDE, p_max
            try:
                for kind, params in calls:
                    W = torch.randn((1,) + shape, generator=gen).to(dtype)
                    side = 1 if kind == "frame" else 0  # the cols layout once
                    values, stats = TG.gram_penalty_forward([W], kind, [side], list(map(float, params)))
                    TG.gram_penalty_backward_flat([W], kind, [side], list(map(float, params)), stats,
                                                  torch.ones(1), dtype)
            finally:
                TG.P_MAX_SIDE = old
    # FP32_DOT = "ieee": float32 without tensor cores, both backward paths
    old_dot, old_p = TG.FP32_DOT, TG.P_MAX_SIDE
    try:
        TG.FP32_DOT = "ieee"
        for p_max in (old_p, 0):
            TG.P_MAX_SIDE = p_max
            W = torch.randn((1, 40, 72), generator=gen)
            values, stats = TG.gram_penalty_forward([W], "diversity", [0], [0.3, 1.0])
            TG.gram_penalty_backward_flat([W], "diversity", [0], [0.3, 1.0], stats, torch.ones(1), W.dtype)
    finally:
        TG.FP32_DOT, TG.P_MAX_SIDE = old_dot, old_p
    out = []
    for fn in vars(TG).values():
        if not isinstance(fn, JITFunction):
            continue
        for caches in fn.device_caches.values():
            for ck in caches[0].values():
                ptx = ck.asm["ptx"]
                x = ck.src.signature.get("X", ck.src.signature.get("PART", ""))
                variant = GS._variant(ck)
                ieee = variant.get("DOT_PRECISION") == "ieee" or variant.get("IEEE") == "True"
                out.append(dict(kernel=fn.__name__, dtype=str(x), ieee=ieee,
                                approx=sorted(set(re.findall(r"\b(div\.full\.f32|div\.approx\.\S+|sqrt\.approx\.\S+|"
                                                             r"rsqrt\.approx\.\S+|rcp\.approx\.\S+)", ptx))),
                                n_mma=len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\b", ptx))))
    return out


@pytest.fixture(scope="module")
def real_static():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    code = ("import json, test_triton_gram_numerics as t; "
            "print('STATIC' + json.dumps(t.real_kernels_report()))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("STATIC"))
    return json.loads(line[len("STATIC"):])


def test_sm90_real_kernels(real_static):
    """Every compiled kernel of a gram_penalty forward + backward: no approximate division or
    square root (the thresholds, δ, cosines, hinges and values are correctly rounded), and the
    Gram / coefficient / product kernels on tensor cores for bfloat16 and float32 (tf32x3), and
    on none with FP32_DOT = "ieee"."""
    names = {r["kernel"] for r in real_static}
    assert {"_row_norm_kernel", "_gram_fwd_kernel", "_finalize_kernel", "_gram_coef_kernel",
            "_gram_product_kernel", "_gram_bwd_kernel", "_split_sum_kernel"} <= names, names
    for r in real_static:
        assert r["approx"] == [], r
        if r["kernel"] in ("_gram_fwd_kernel", "_gram_coef_kernel", "_gram_product_kernel", "_gram_bwd_kernel"):
            assert (r["n_mma"] == 0) if r["ieee"] else (r["n_mma"] > 0), r
    ieee = {r["kernel"] for r in real_static if r["ieee"]}
    assert {"_gram_fwd_kernel", "_gram_coef_kernel", "_gram_product_kernel", "_gram_bwd_kernel"} <= ieee, ieee
