"""One list of op cases per family: what tests/test_generated.py runs over every backend of the
family's TABLE × device × dtype.

An ``OpCase`` holds the public call, the reference, an independent float64 oracle (explicit
per-matrix formulas, dense operators built from impulse responses, LAPACK through torch.linalg:
never the reference's own code), a sample generator ``samples(device, dtype, requires_grad)``
and the bad-input table. A ``Sample`` keeps its leaf tensors apart from the arguments built from
them (``make``), so a test can convert the leaves (float64 oracle, contiguous copies, gradcheck,
vmap) and rebuild views, lists and generators the same way each time.

Shapes are chosen relative to the Triton kernels' block sizes (block ± 1) and include odd and
prime sizes, batches, transposed / strided / expanded views and empty batches where an op takes
them. ``heavy`` samples are left out of interpreted Triton and gradcheck (CI time).
"""
from __future__ import annotations

import copy
import importlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

import regkernels
from regkernels.reference import beta_lasso as R_beta_lasso
from regkernels.reference import conv as R_conv
from regkernels.reference import gram as R_gram
from regkernels.reference import jacobian as R_jacobian
from regkernels.reference import svd as R_svd

D64 = torch.float64


# --------------------------------------------------------------------------- the two records

@dataclass
class Sample:
    """One input of an op: ``make(*leaves)`` gives ``(args, kwargs)`` of the public call.

    ``leaves``: the tensors the test converts and differentiates (the bases of views, the weights
    of a list). ``grad``: used by the gradient tests; ``heavy``: kept out of interpreted Triton and
    gradcheck; ``compile``: traceable by torch.compile (no torch.Generator arguments).
    """

    id: str
    leaves: tuple[torch.Tensor, ...]
    make: Callable[..., tuple[tuple, dict]]
    grad: bool = True
    heavy: bool = False
    compile: bool = True

    @property
    def args(self) -> tuple:
        return self.make(*self.leaves)[0]

    @property
    def kwargs(self) -> dict:
        return self.make(*self.leaves)[1]

    def build(self, leaves: Sequence[torch.Tensor] | None = None) -> tuple[tuple, dict]:
        return self.make(*(self.leaves if leaves is None else leaves))


@dataclass
class Bad:
    """A call of the public op that must raise ``exc`` with a message matching ``match``."""

    id: str
    args: tuple
    kwargs: dict
    exc: type
    match: str


@dataclass
class OpCase:
    """Everything the generated tests need about one public op (see the module docstring).

    ``call(*args, backend=..., **kwargs)``: the public op. ``reference(*args, **kwargs)``: the
    oracle module's function, taking the public arguments. ``oracle(*args, **kwargs)``: float64,
    independent; returns ``oracle_view``'s form of the outputs, or None where it has no answer
    for a sample. ``normalize(out)``: the output as a tuple of dense tensors (sparse → dense,
    SVD → sign-free parts). ``grad_outputs``: indices of the normalized outputs that carry
    gradient (None = all). ``table_ops``: the names under which the family's TABLE may list it.
    """

    name: str
    family: str
    call: Callable
    reference: Callable
    oracle: Callable | None
    samples: Callable[[torch.device, torch.dtype, bool], Iterable[Sample]]
    differentiable: bool = True
    grad_outputs: tuple[int, ...] | None = None
    bad: list[Bad] = field(default_factory=list)
    normalize: Callable[[Any], tuple[torch.Tensor, ...]] = None
    oracle_view: Callable[[tuple], tuple] = None
    table_ops: tuple[str, ...] = ()
    func: str | None = None  # why torch.func checks do not apply, or None
    compile: str | None = None  # why torch.compile(fullgraph=True) does not apply, or None
    opcheck_skip: dict = field(default_factory=dict)  # raw op → why this case's arguments cannot opcheck it
    rtol64: float = 1e-9

    def __post_init__(self):
        if self.normalize is None:
            self.normalize = _as_tuple
        if self.oracle_view is None:
            self.oracle_view = lambda outs: outs
        self.table_ops = self.table_ops or (self.name,)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, (tuple, list)):
        return tuple(out)
    return (out,)


def table_of(family: str):
    """The family's TABLE, or None where ``regkernels.ops.<family>`` has none."""
    return getattr(importlib.import_module(f"regkernels.ops.{family}"), "TABLE", None)


def table_op(case: OpCase, table) -> str | None:
    """The TABLE op the case's public call dispatches on (its name, an alias, or the only op)."""
    ops = table.ops()
    for name in case.table_ops:
        if name in ops:
            return name
    if case.family == "beta_lasso" and len(ops) == 1:
        return ops[0]
    return None


# --------------------------------------------------------------------------- input helpers

def _det(seed: str, shape: Sequence[int], scale: float = 1.0) -> torch.Tensor:
    """Deterministic float64 Gaussian per sample id (the same input on every device and dtype)."""
    g = torch.Generator().manual_seed(_stable_hash(seed))
    return torch.randn(*shape, generator=g, dtype=D64) * scale


def _stable_hash(s: str) -> int:
    h = 1469598103934665603
    for ch in s.encode():
        h = ((h ^ ch) * 1099511628211) % (2**61)
    return h % (2**31)


def _leaf(x: torch.Tensor, device, dtype, requires_grad: bool) -> torch.Tensor:
    return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def _block(modules: Sequence[str], name: str, default: int) -> int:
    """A Triton block constant, read from the kernel module where Triton is installed."""
    from regkernels import _ext

    if not _ext.has_triton():
        return default
    for m in modules:
        try:
            return int(getattr(importlib.import_module(m), name))
        except (ImportError, AttributeError):
            continue
    return default


GRAM_BLOCK = _block(["regkernels.triton.gram"], "BLOCK_I", 32)
GRAM_BLOCK_K = _block(["regkernels.triton.gram"], "BLOCK_K", 32)
CONV_BLOCK_R = _block(["regkernels.triton.conv_matrix", "regkernels.triton.conv"], "BLOCK_R", 32)
CONV_BLOCK_C = _block(["regkernels.triton.conv_matrix", "regkernels.triton.conv"], "BLOCK_C", 128)
FRAME_BLOCK_A = _block(["regkernels.triton.conv_frame"], "MAX_BLOCK_A", 32)


def _matrix_samples(device, dtype, rg, shapes, *, make_args, views=True, empty=True, tag="",
                    heavy_above=4096) -> list[Sample]:
    """Samples of an op on one matrix batch W (..., m, n): plain shapes, then views and empties.

    ``make_args(W) -> (args, kwargs)`` puts W into the op's argument list.
    """
    out = []
    for shape in shapes:
        sid = "x".join(map(str, shape))
        base = _leaf(_det(tag + sid, shape, 1 / math.sqrt(shape[-1])), device, dtype, rg)
        out.append(Sample(sid, (base,), make_args, heavy=math.prod(shape) > heavy_above))
    if views:
        m, n = 9, 12
        t = _leaf(_det(tag + "T", (2, n, m), 1 / math.sqrt(m)), device, dtype, rg)
        out.append(Sample(f"2x{m}x{n}-transposed", (t,), lambda W: make_args(W.mT)))
        s = _leaf(_det(tag + "S", (2, 2 * m, 3 * n), 1 / math.sqrt(n)), device, dtype, rg)
        out.append(Sample(f"2x{m}x{n}-strided", (s,), lambda W: make_args(W[:, ::2, ::3])))
        e = _leaf(_det(tag + "E", (1, 5, 7), 1 / math.sqrt(7)), device, dtype, rg)
        out.append(Sample("3x5x7-expanded", (e,), lambda W: make_args(W.expand(3, 5, 7))))
    if empty:
        z = _leaf(torch.zeros(0, 4, 6, dtype=D64), device, dtype, rg)
        out.append(Sample("0x4x6-empty", (z,), make_args, grad=False))
    return out


def _per_matrix(W: torch.Tensor, fn: Callable[[torch.Tensor], Sequence[torch.Tensor]]):
    """Apply a single-matrix formula to every matrix of a batch, one Python loop (the oracles)."""
    batch = W.shape[:-2]
    mats = W.flatten(0, -3) if W.dim() > 2 else W[None]
    outs = [tuple(torch.as_tensor(v, dtype=D64) for v in _as_tuple(fn(M))) for M in mats]
    n_out = len(_as_tuple(fn(W.new_zeros(1, 1)))) if not outs else len(outs[0])
    return tuple(torch.stack([o[i] for o in outs]).reshape(batch) if outs else torch.zeros(batch, dtype=D64)
                 for i in range(n_out))


# --------------------------------------------------------------------------- Gram oracles

def _side(m: int, n: int, side: str) -> str:
    return ("cols" if m >= n else "rows") if side == "auto" else side


def _gram(M: torch.Tensor, side: str) -> torch.Tensor:
    M = M.double()
    return M @ M.T if _side(*M.shape, side) == "rows" else M.T @ M


def _d_r(M, side):
    V = _gram(M, side)
    k = V.shape[0]
    d = V.diagonal()
    r = (V.abs() * (1 - torch.eye(k, dtype=D64))).sum(1)  # off-diagonal |V_ij| by mask
    return d, r


def o_frame(W, A, B, side="auto"):
    def one(M):
        d, r = _d_r(M, side)
        return ((A - (d - r)).clamp_min(0) ** 2 + ((d + r) - B).clamp_min(0) ** 2).mean()
    return _per_matrix(W.double(), one)


def o_gershgorin(W, side="auto"):
    def one(M):
        d, r = _d_r(M, side)
        return (d - r).min(), (d + r).max()
    return _per_matrix(W.double(), one)


def o_frame_bounds(W):
    def one(M):
        ev = torch.linalg.eigvalsh(_gram(M, "auto"))
        return ev[0], ev[-1]
    return _per_matrix(W.double(), one)


def o_diversity(W, tau, inclusive=True):
    def one(M):
        M = M.double()
        U = M / M.norm(dim=1, keepdim=True).clamp_min(1e-12)
        total = M.new_zeros(())
        for i in range(U.shape[0]):
            for j in range(U.shape[0]):
                c = U[i] @ U[j]
                if i != j and (abs(c) >= tau if inclusive else abs(c) > tau):
                    total = total + c * c
        return 0.5 * total
    return _per_matrix(W.double(), one)


def o_orthogonality(W, side="auto", squared=True):
    def one(M):
        V = _gram(M, side)
        total = ((V - torch.eye(V.shape[0], dtype=D64)) ** 2).sum()
        return total if squared else total.sqrt()
    return _per_matrix(W.double(), one)


def o_mhe(W, s=2, half=False, eps=1e-4, angular=False):
    def one(M):
        M = M.double()
        if half:
            M = torch.cat([M, -M])
        nu = (M.pow(2).sum(1) + eps).sqrt()
        energies = []
        for i in range(M.shape[0]):
            for j in range(i + 1, M.shape[0]):
                cos = (M[i] @ M[j]) / (nu[i] * nu[j])
                if angular:  # the official code's normalised angle, offset by eps
                    a = torch.acos(cos) / math.pi + eps
                    energies.append(-torch.log(a) if s == 0 else a ** (-float(s)))
                    continue
                delta = 2 - 2 * cos
                energies.append(-torch.log(delta) if s == 0 else delta ** (-0.5 if s == 1 else -1.0))
        return torch.stack(energies).mean()
    return _per_matrix(W.double(), one)


def _srip_one(M, b, n_iter):
    V = _gram(M, "auto")
    Mx = V - torch.eye(V.shape[0], dtype=D64)
    v = b.double()
    for _ in range(n_iter):
        u = Mx @ v
        v = u / u.norm()
    return (Mx @ v).pow(2).sum()


def _srip_start(W, seed):
    """The public op's start vectors: one per matrix, float32, from a generator on W's device."""
    gen = torch.Generator(device=W.device).manual_seed(seed)
    return torch.rand(*W.shape[:-2], min(W.shape[-2:]), generator=gen, device=W.device, dtype=torch.float32)


SRIP_SEED = 7


def _start(W, generator):
    """The start vectors the public op draws: from the seeded generator, else the global RNG."""
    if generator is not None:
        return _srip_start(W, SRIP_SEED)
    return torch.rand(*W.shape[:-2], min(W.shape[-2:]), device=W.device, dtype=torch.float32)


def o_srip(W, n_iter=1, generator=None):
    b = _start(W, generator).reshape(-1, min(W.shape[-2:])).cpu()
    mats = W.double().reshape(-1, *W.shape[-2:]).cpu()
    vals = [_srip_one(M, bi, n_iter) for M, bi in zip(mats, b)]
    return (torch.stack(vals).reshape(W.shape[:-2]) if vals else torch.zeros(W.shape[:-2], dtype=D64),)


def r_srip(W, n_iter=1, generator=None):
    return R_gram.srip_penalty(W, _start(W, generator), n_iter)


def _gen(device):
    return torch.Generator(device=device).manual_seed(SRIP_SEED)


def _grouped(w, groups):
    """as_matrix spelled out: group g's filters flattened, rows = filters."""
    if w.dim() == 2:
        return w[None]
    return w.reshape(groups, w.shape[0] // groups, -1)


_MULTI_ORACLE = {
    "frame": lambda M, kw: o_frame(M, kw["A"], kw["B"], kw.get("side", "auto"))[0],
    "diversity": lambda M, kw: o_diversity(M, kw["tau"], kw.get("inclusive", True))[0],
    "orthogonality": lambda M, kw: o_orthogonality(M, kw.get("side", "auto"), kw.get("squared", True))[0],
    "mhe": lambda M, kw: o_mhe(M, kw.get("s", 2), kw.get("half", False), kw.get("eps", 1e-4),
                               kw.get("angular", False))[0],
}


def o_penalty_multi(weights, kind, groups=1, generator=None, **kw):
    gs = [groups] * len(weights) if isinstance(groups, int) else list(groups)
    vals = []
    gen = torch.Generator(device=weights[0].device).manual_seed(SRIP_SEED) if weights else None
    for w, g in zip(weights, gs):
        M = _grouped(w.double(), g)
        if kind == "srip":  # one start per matrix, drawn in list order from one generator
            b = torch.rand(M.shape[0], min(M.shape[-2:]), generator=gen, device=w.device, dtype=torch.float32)
            per = torch.stack([_srip_one(Mi.cpu(), bi.cpu(), kw.get("n_iter", 1)) for Mi, bi in zip(M.cpu(), b)])
        else:
            per = _MULTI_ORACLE[kind](M.cpu(), kw)
        vals.append(per.mean())
    return (torch.stack(vals) if vals else torch.zeros(0, dtype=D64),)


def r_penalty_multi(weights, kind, groups=1, generator=None, **kw):
    if kind == "srip":  # the reference takes the start vectors: drawn per weight in list order
        gen = torch.Generator(device=weights[0].device).manual_seed(SRIP_SEED)
        gs = [groups] * len(weights) if isinstance(groups, int) else list(groups)
        kw["b"] = [torch.rand(*regkernels.as_matrix(w, g).shape[:-2], min(regkernels.as_matrix(w, g).shape[-2:]),
                              generator=gen, device=w.device, dtype=torch.float32) for w, g in zip(weights, gs)]
    return R_gram.penalty_multi(weights, kind, groups, **kw)


# --------------------------------------------------------------------------- Gram cases

def _gram_shapes(extra=()):
    # odd / prime shapes, a batch, Triton block edges (block ± 1 rows and inner sizes), 64x576
    b, k = GRAM_BLOCK, GRAM_BLOCK_K
    return [(5, 7), (7, 5), (13, 2), (1, 3), (2, 6, 9), (2, 3, 5, 7), (b - 1, k + 1), (b + 1, k - 1),
            (64, 576), *extra]


def _gram_case(name, public, reference, oracle, kw_variants, *, min_rows=1, views=True, bad=(), grad_outputs=None,
               func=None, compile_ok=True):
    """A Gram op on W with keyword variants (each variant × each shape is one sample)."""
    def samples(device, dtype, rg):
        out = []
        for v, (vid, kw) in enumerate(kw_variants):
            def make(W, kw=kw):
                kwargs = dict(kw)
                if "generator" in kwargs:
                    kwargs["generator"] = _gen(W.device)
                return (W,), kwargs
            # the first variant over every shape and layout, the others over three shapes
            shapes = _gram_shapes() if v == 0 else [(5, 7), (2, 6, 9), (GRAM_BLOCK + 1, GRAM_BLOCK_K - 1)]
            shapes = [s for s in shapes if s[-2] >= min_rows or kw.get("half")]
            for s in _matrix_samples(device, dtype, rg, shapes, make_args=make, views=views and v == 0,
                                     empty=v == 0, tag=name + vid):
                s.id = f"{s.id}-{vid}" if vid else s.id
                s.compile = "generator" not in kw
                out.append(s)
        return out
    return OpCase(name, "gram", public, reference, oracle, samples, bad=list(bad), grad_outputs=grad_outputs,
                  func=func)


W0 = torch.randn(4, 5)

GRAM_CASES = [
    _gram_case("frame_penalty", regkernels.frame_penalty, R_gram.frame_penalty, o_frame,
               [("A0.5-B1.5", dict(A=0.5, B=1.5)), ("rows", dict(A=0.2, B=1.0, side="rows")),
                ("cols", dict(A=0.1, B=0.9, side="cols"))],
               bad=[
                   Bad("W-1d", (torch.randn(5), 0.0, 1.0), {}, ValueError,
                       r"frame_penalty: W must have at least 2 dims \(\.\.\., m, n\)"),
                   Bad("W-int64", (torch.ones(3, 3, dtype=torch.int64), 0.0, 1.0), {}, TypeError,
                       r"frame_penalty: W must have a floating dtype"),
                   Bad("W-list", ([[1.0]], 0.0, 1.0), {}, TypeError, r"frame_penalty: W must be a torch.Tensor"),
                   Bad("W-no-columns", (torch.randn(3, 0), 0.0, 1.0), {}, ValueError,
                       r"frame_penalty: W must have m >= 1 rows and n >= 1 columns"),
                   Bad("A-negative", (W0, -0.5, 1.0), {}, ValueError, r"frame_penalty: A must be >= 0; got A=-0.5"),
                   Bad("A-above-B", (W0, 2.0, 1.0), {}, ValueError, r"frame_penalty: need A <= B; got A=2.0, B=1.0"),
                   Bad("A-tensor", (W0, torch.tensor(0.0), 1.0), {}, TypeError, r"frame_penalty: A must be a real number"),
                   Bad("side-unknown", (W0, 0.0, 1.0), dict(side="diag"), ValueError,
                       r"frame_penalty: side must be 'auto', 'rows' or 'cols'; got 'diag'"),
                   Bad("backend-unknown", (W0, 0.0, 1.0), dict(backend="gpu"), ValueError,
                       r"frame_penalty: backend must be None or one of 'reference'"),
                   Bad("backend-positional", (W0, 0.0, 1.0, "auto", "reference"), {}, TypeError,
                       r"positional argument"),
               ]),
    _gram_case("gershgorin_bounds", regkernels.gershgorin_bounds, R_gram.gershgorin_bounds, o_gershgorin,
               [("", {}), ("cols", dict(side="cols"))], bad=[
                   Bad("side-unknown", (W0,), dict(side="both"), ValueError,
                       r"gershgorin_bounds: side must be 'auto', 'rows' or 'cols'"),
                   Bad("W-1d", (torch.randn(3),), {}, ValueError, r"gershgorin_bounds: W must have at least 2 dims"),
               ]),
    _gram_case("frame_bounds", regkernels.frame_bounds, R_gram.frame_bounds, o_frame_bounds, [("", {})], bad=[
        Bad("W-bool", (torch.ones(2, 2, dtype=torch.bool),), {}, TypeError,
            r"frame_bounds: W must have a floating dtype"),
    ]),
    _gram_case("diversity_penalty", regkernels.diversity_penalty, R_gram.diversity_penalty, o_diversity,
               [("tau0.1", dict(tau=0.1)), ("tau0.25-exclusive", dict(tau=0.25, inclusive=False))], bad=[
                   Bad("tau-negative", (W0, -0.1), {}, ValueError, r"diversity_penalty: tau must be >= 0.0; got tau=-0.1"),
                   Bad("tau-above-1", (W0, 1.5), {}, ValueError, r"diversity_penalty: tau must be <= 1.0; got tau=1.5"),
                   Bad("inclusive-str", (W0, 0.5), dict(inclusive="yes"), TypeError,
                       r"diversity_penalty: inclusive must be True or False"),
               ]),
    _gram_case("orthogonality_penalty", regkernels.orthogonality_penalty, R_gram.orthogonality_penalty,
               o_orthogonality, [("squared", {}), ("norm-rows", dict(side="rows", squared=False))], bad=[
                   Bad("side-unknown", (W0,), dict(side="row"), ValueError,
                       r"orthogonality_penalty: side must be 'auto', 'rows' or 'cols'"),
                   Bad("squared-int", (W0,), dict(squared=1), TypeError,
                       r"orthogonality_penalty: squared must be True or False"),
               ]),
    _gram_case("mhe_penalty", regkernels.mhe_penalty, R_gram.mhe_penalty, o_mhe,
               [("s0-half", dict(s=0, half=True)), ("s1", dict(s=1)), ("s2-eps0.1", dict(s=2, eps=0.1)),
                ("s2-half", dict(s=2, half=True)), ("angular-s0", dict(s=0, angular=True)),
                ("angular-s1-half", dict(s=1, half=True, angular=True)),
                ("angular-s2-eps0.01", dict(s=2, eps=0.01, angular=True))], min_rows=2, bad=[
                   Bad("s-3", (W0,), dict(s=3), ValueError, r"mhe_penalty: s must be 0 \(log energy\), 1 or 2"),
                   Bad("s-float", (W0,), dict(s=1.5), TypeError, r"mhe_penalty: s must be an integer"),
                   Bad("eps-zero", (W0,), dict(eps=0.0), ValueError, r"mhe_penalty: eps must be > 0; got eps=0.0"),
                   Bad("eps-negative", (W0,), dict(eps=-1e-4), ValueError, r"mhe_penalty: eps must be > 0"),
                   Bad("half-None", (W0,), dict(half=None), TypeError, r"mhe_penalty: half must be True or False"),
                   Bad("angular-str", (W0,), dict(angular="yes"), TypeError,
                       r"mhe_penalty: angular must be True or False"),
                   Bad("one-row-not-half", (torch.randn(1, 5),), {}, ValueError,
                       r"mhe_penalty: W needs at least 2 rows .* or half=True"),
               ]),
    _gram_case("srip_penalty", regkernels.srip_penalty, r_srip, o_srip,
               [("n2-seeded", dict(n_iter=2, generator=True)), ("n1-global-rng", dict(n_iter=1))], bad=[
                   Bad("n_iter-zero", (W0,), dict(n_iter=0), ValueError,
                       r"srip_penalty: n_iter must be >= 1; got n_iter=0"),
                   Bad("n_iter-float", (W0,), dict(n_iter=2.0), TypeError, r"srip_penalty: n_iter must be an integer"),
                   Bad("generator-int", (W0,), dict(generator=3), TypeError,
                       r"srip_penalty: generator must be a torch.Generator or None"),
                   Bad("W-int32", (torch.ones(2, 2, 3, dtype=torch.int32),), {}, TypeError,
                       r"srip_penalty: W must have a floating dtype"),
               ]),
]


# penalty_multi: a list of layer weights (conv, linear, grouped conv) per kind
MULTI_KINDS = [
    ("frame", dict(A=0.5, B=1.5)), ("diversity", dict(tau=0.1, inclusive=False)),
    ("orthogonality", dict(side="cols")), ("mhe", dict(s=0, half=True)), ("srip", dict(n_iter=2)),
]


def _multi_samples(device, dtype, rg):
    out = []
    b = GRAM_BLOCK
    layer_sets = [
        ("conv3x3-linear", [(6, 3, 3, 3), (5, 7)], 1),
        ("grouped", [(8, 3, 3, 3), (6, 5)], [4, 1]),
        (f"block{b - 1}-{b + 1}", [(b - 1, 2, 3, 3), (b + 1, b - 1)], 1),
        ("transposed-linear", "T", 1),
    ]
    for kind, kw in MULTI_KINDS:
        for lid, shapes, groups in layer_sets:
            if kind == "srip" and groups != 1:
                continue  # the srip start vectors of a grouped layer are drawn per group (checked in test_gram)
            sid = f"{kind}-{lid}"
            if shapes == "T":
                leaves = (_leaf(_det(sid, (7, 5), 0.4), device, dtype, rg),
                          _leaf(_det(sid + "b", (4, 2, 3), 0.4), device, dtype, rg))

                def make(a, c, kind=kind, kw=kw):
                    return ([a.mT, c], kind), dict(kw, **({"generator": _gen(a.device)} if kind == "srip" else {}))
            else:
                leaves = tuple(_leaf(_det(sid + str(i), s, 1 / math.sqrt(math.prod(s[1:]))), device, dtype, rg)
                               for i, s in enumerate(shapes))

                def make(*ws, kind=kind, kw=kw, groups=groups):
                    extra = {"generator": _gen(ws[0].device)} if kind == "srip" else {}
                    return (list(ws), kind), dict(kw, groups=groups, **extra)
            out.append(Sample(sid, leaves, make, compile=kind != "srip"))
    return out


MULTI_CASE = OpCase(
    "penalty_multi", "gram",
    lambda weights, kind, backend=None, **kw: regkernels.penalty_multi(weights, kind, backend=backend, **kw),
    r_penalty_multi, o_penalty_multi, _multi_samples,
    bad=[
        Bad("weights-tensor", (W0, "frame"), dict(A=0.0, B=1.0), TypeError,
            r"penalty_multi: weights must be a list or tuple of weight tensors"),
        Bad("weights-str-entry", ([W0, "w"], "frame"), dict(A=0.0, B=1.0), TypeError,
            r"penalty_multi: weights\[1\] must be a torch.Tensor"),
        Bad("weights-1d", ([torch.randn(4)], "frame"), dict(A=0.0, B=1.0), ValueError,
            r"penalty_multi: weights\[0\] must have at least 2 dims"),
        Bad("kind-unknown", ([W0], "nuclear"), {}, ValueError,
            r"penalty_multi: kind must be one of 'frame', 'diversity', 'orthogonality', 'mhe', 'srip'; got 'nuclear'"),
        Bad("frame-missing-B", ([W0], "frame"), dict(A=0.0), TypeError,
            r"penalty_multi: kind='frame' takes keyword arguments A, B, side .* missing \['B'\]"),
        Bad("mhe-unknown-tau", ([W0], "mhe"), dict(tau=0.1), TypeError,
            r"penalty_multi: kind='mhe' takes keyword arguments s, half, eps, angular .* unknown \['tau'\]"),
        Bad("A-above-B", ([W0], "frame"), dict(A=2.0, B=1.0), ValueError, r"penalty_multi: need A <= B"),
        Bad("groups-length", ([W0, W0], "frame"), dict(groups=[1], A=0.0, B=1.0), ValueError,
            r"penalty_multi: groups must be one int or one per weight \(2\)"),
        Bad("groups-not-dividing", ([torch.randn(6, 2, 3, 3)], "frame"), dict(groups=4, A=0.0, B=1.0), ValueError,
            r"penalty_multi: groups must divide the output channels of weights\[0\]"),
        Bad("mhe-one-row", ([torch.randn(1, 4)], "mhe"), {}, ValueError,
            r"penalty_multi: as_matrix\(weights\[0\]\) needs at least 2 rows"),
        Bad("two-devices", ([W0, torch.randn(3, 3, device="meta")], "frame"), dict(A=0.0, B=1.0), ValueError,
            r"penalty_multi: all tensors must be on one device; got weights\[0\] on cpu, weights\[1\] on meta"),
    ])

GRAM_CASES.append(MULTI_CASE)


# --------------------------------------------------------------------------- conv oracles

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _expand(v, d):
    return (v,) * d if isinstance(v, int) else tuple(v)


def conv_apply(x, weight, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """What nn.ConvNd computes: circular = F.pad(mode='circular') then padding 0."""
    d = weight.dim() - 2
    if padding_mode == "circular":
        pads = [q for p in reversed(_expand(padding, d)) for q in (p, p)]
        x, padding = F.pad(x, pads, mode="circular"), 0
    return CONV[d](x, weight, None, stride, padding, dilation, groups)


def impulse_matrix(weight, input_size, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros", **_):
    """T from impulse responses: column j = conv(e_j), e_j the j-th basis input (float64)."""
    weight = weight.detach().double().cpu()
    c_in = weight.shape[1] * groups
    n = c_in * math.prod(input_size)
    if weight.shape[0] == 0:  # no output channels: T has no rows (F.conv refuses an empty weight)
        return torch.zeros(0, n, dtype=D64)
    basis = torch.eye(n, dtype=D64).reshape(n, c_in, *input_size)
    return conv_apply(basis, weight, stride, padding, dilation, groups, padding_mode).reshape(n, -1).T


def o_conv_to_matrix(weight, input_size, **kw):
    return (impulse_matrix(weight, input_size, **kw),)


def _conv_frame_parts(weight, input_size, side, **kw):
    T = impulse_matrix(weight, input_size, **kw)
    m, n = T.shape
    rows = side == "rows" or (side == "auto" and m < n)
    V = T @ T.T if rows else T.T @ T
    d = V.diagonal()
    r = V.abs().sum(1) - d.abs()
    return d, r


def o_conv_frame(weight, input_size, A, B, side="auto", **kw):
    d, r = _conv_frame_parts(weight, input_size, side, **kw)
    if d.numel() == 0:
        return (torch.zeros((), dtype=D64),)
    return ((((A - (d - r)).clamp_min(0) ** 2) + ((d + r) - B).clamp_min(0) ** 2).mean(),)


def o_conv_gershgorin(weight, input_size, side="auto", **kw):
    d, r = _conv_frame_parts(weight, input_size, side, **kw)
    if d.numel() == 0:
        return torch.tensor(math.inf, dtype=D64), torch.tensor(-math.inf, dtype=D64)
    return (d - r).min(), (d + r).max()


def o_conv_input_orthogonality(weight, stride=1):
    """OCNN input side (docs/conv.md#input-side) from T's impulse responses: on an unpadded input
    wide enough, one pixel per phase r ∈ [0, S)^d away from the edges (every tap reading it has its
    output, every column it reaches is inside), its rows of TᵀT for every input channel against the
    identity rows, summed over the phases."""
    o, c, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    S = _expand(stride, len(kernel))
    first = [-(-(k - 1) // s) * s for k, s in zip(kernel, S)]  # a multiple of S, ≥ k − 1
    size = [f + 2 * s + 2 * k for f, s, k in zip(first, S, kernel)]
    T = impulse_matrix(weight, size, stride=S)  # (o·∏m, c·∏size)
    V = (T.T @ T).reshape(c, *size, c, *size)
    total = torch.zeros((), dtype=D64)
    for r in itertools.product(*[range(s) for s in S]):
        u = tuple(f + ri for f, ri in zip(first, r))
        rows = V[(slice(None),) + u].clone()  # (c, c', *size)
        for ch in range(c):
            rows[(ch, ch) + u] -= 1.0
        total = total + (rows ** 2).sum()
    return total


def o_conv_orthogonality(weight, stride=1, padding=None, side="rows"):
    """OCNN penalty with the 2-D correlation written out as loops (1-D weights as (k, 1) kernels);
    side="cols": ``o_conv_input_orthogonality``."""
    if side == "cols":
        return (o_conv_input_orthogonality(weight, stride),)
    K = weight.detach().double().cpu()
    if K.dim() == 3:
        K = K[..., None]
        stride = (_expand(stride, 1)[0], 1)
    sh, sw = _expand(stride, 2)
    o, c, kh, kw = K.shape
    if padding is None:
        P = ((kh - 1) // sh * sh, (kw - 1) // sw * sw)
    else:
        P = _expand(padding, 2) if K.dim() == 4 and weight.dim() == 4 else (_expand(padding, 1)[0], 0)
    s = ((2 * P[0]) // sh + 1, (2 * P[1]) // sw + 1)
    total = torch.zeros((), dtype=D64)
    for a in range(o):
        for b in range(o):
            for y in range(s[0]):
                for x in range(s[1]):
                    acc = torch.zeros((), dtype=D64)
                    for i in range(kh):
                        for j in range(kw):
                            u, v = y * sh - P[0] + i, x * sw - P[1] + j
                            if 0 <= u < kh and 0 <= v < kw:
                                acc = acc + (K[a, :, u, v] * K[b, :, i, j]).sum()
                    target = 1.0 if (a == b and y == s[0] // 2 and x == s[1] // 2) else 0.0
                    total = total + (acc - target) ** 2
    return (total,)


def _circular_operator(weight, input_size):
    """The periodic operator of the Sedghi ops: circular padding of k − 1 on one side per dim, so the
    output has the input's size for odd and even kernels alike (a shift leaves singular values be)."""
    weight = weight.detach().double().cpu()
    c_in, n = weight.shape[1], weight.shape[1] * math.prod(input_size)
    basis = torch.eye(n, dtype=D64).reshape(n, c_in, *input_size)
    pads = [q for k in reversed(weight.shape[2:]) for q in (k - 1, 0)]
    return CONV[weight.dim() - 2](F.pad(basis, pads, mode="circular"), weight).reshape(n, -1).T


def o_conv_singular_values(weight, input_size):
    if weight.shape[0] == 0:
        return (torch.zeros(0, dtype=D64),)
    return (torch.linalg.svdvals(_circular_operator(weight, input_size)).sort().values,)


def o_clip_conv(weight, input_size, lo, hi):
    """Only a kernel as large as the input is projected exactly (no truncation): then the new
    operator's singular values are the clamped old ones. Other samples have no oracle."""
    if tuple(weight.shape[2:]) != tuple(input_size):
        return None
    sv = torch.linalg.svdvals(_circular_operator(weight, input_size)).clamp(lo, hi)
    return (sv.sort().values,)


def _sorted_flat(outs):
    return (outs[-1].flatten().sort().values,)


def _dense(out):
    return (out.to_dense() if out.layout != torch.strided else out,)


# --------------------------------------------------------------------------- conv cases

CONV_GEOMETRIES = [
    # (id, weight shape, input size, kwargs)
    ("4x2x3x3@5x4-s2x1-p1-g2", (4, 1, 3, 3), (5, 4), dict(stride=(2, 1), padding=1, groups=2)),
    ("3x2x3x3@4x4-p1", (3, 2, 3, 3), (4, 4), dict(padding=1)),
    ("2x2x5x3@3x2-circular", (2, 2, 5, 3), (3, 2), dict(padding=2, padding_mode="circular")),
    ("2x3x3@7-d2-p2", (2, 3, 3), (7,), dict(dilation=2, padding=2)),
    ("2x1x2x2x2@3x3x2-p1", (2, 1, 2, 2, 2), (3, 3, 2), dict(padding=1)),
    # T's rows and columns at the Triton tile edges (BLOCK_R ± 1 rows, BLOCK_C ± 1 columns)
    (f"1x1x3@{CONV_BLOCK_R + 1}-p1", (1, 1, 3), (CONV_BLOCK_R + 1,), dict(padding=1)),
    (f"1x3x3@{(CONV_BLOCK_C + 1) // 3}", (1, 3, 3), ((CONV_BLOCK_C + 1) // 3,), {}),
    (f"{CONV_BLOCK_R - 1}x1x1@1", (CONV_BLOCK_R - 1, 1, 1), (1,), {}),
]


# the implicit frame statistics tile channel rows a' by FRAME_BLOCK_A (Triton): C_out at the block edges
FRAME_GEOMETRIES = CONV_GEOMETRIES[:5] + [
    (f"{FRAME_BLOCK_A + 1}x2x3@5-p1", (FRAME_BLOCK_A + 1, 2, 3), (5,), dict(padding=1)),
    (f"{FRAME_BLOCK_A - 1}x1x2x2@3x2-p1", (FRAME_BLOCK_A - 1, 1, 2, 2), (3, 2), dict(padding=1)),
]


def _conv_samples(geometries, extra_args=(), extra_kw=None, *, views=True, empty=True, scale=0.5, tag="",
                  empty_kw=(("padding", 1),)):
    def samples(device, dtype, rg):
        out = []
        for gid, shape, size, kw in geometries:
            w = _leaf(_det(tag + gid, shape, scale), device, dtype, rg)

            def make(w, size=size, kw=kw):
                return (w, size, *extra_args), dict(kw, **(extra_kw or {}))
            out.append(Sample(gid, (w,), make))
        if views:
            gid, shape, size, kw = geometries[0]
            s = _leaf(_det(tag + "strided", (2 * shape[0], *shape[1:]), scale), device, dtype, rg)
            out.append(Sample(gid + "-strided", (s,), lambda w: ((w[::2], size, *extra_args),
                                                                 dict(kw, **(extra_kw or {})))))
            t = _leaf(_det(tag + "T", shape, scale), device, dtype, rg)
            out.append(Sample(gid + "-kernel-transposed", (t,),
                              lambda w: ((w.transpose(-1, -2).contiguous().transpose(-1, -2), size, *extra_args),
                                         dict(kw, **(extra_kw or {})))))
            e = _leaf(_det(tag + "E", (1, *shape[1:]), scale), device, dtype, rg)
            out.append(Sample(gid + "-expanded", (e,), lambda w: ((w.expand(shape[0], *shape[1:]), size, *extra_args),
                                                                  dict(kw, **(extra_kw or {})))))
        if empty:
            z = _leaf(torch.zeros(0, 3, 3, 3, dtype=D64), device, dtype, rg)
            out.append(Sample("0x3x3x3@5x4-empty", (z,), lambda w: ((w, (5, 4), *extra_args),
                                                                     dict(empty_kw, **(extra_kw or {}))), grad=False))
        return out
    return samples


def _conv_to_matrix_samples(layouts):
    return lambda device, dtype, rg: _conv_to_matrix_layout_samples(layouts, device, dtype, rg)


def _conv_to_matrix_layout_samples(layouts, device, dtype, rg):
    out = []
    for layout in layouts:
        geos = CONV_GEOMETRIES if layout == "dense" else CONV_GEOMETRIES[:4]
        for s in _conv_samples(geos, extra_kw=None if layout == "dense" else {"layout": layout},
                               views=layout == "dense", empty=layout != "coo", tag=layout)(device, dtype, rg):
            if layout != "dense":
                s.id += f"-{layout}"
            out.append(s)
    return out


CW = torch.randn(4, 2, 3, 3)


def o_conv_frame_multi(weights, input_size, A, B, side="auto", **kw):
    return (torch.stack([o_conv_frame(w, input_size, A, B, side, **kw)[0] for w in weights]),)


def _conv_frame_multi_samples(device, dtype, rg):
    """Lists of 1–3 layers of one geometry (the frame geometries, both sides named), layers of
    different scales (each is range-scaled on its own), and a list of a strided and an expanded view."""
    out = []
    for j, (gid, shape, size, kw) in enumerate(FRAME_GEOMETRIES):
        L = (1, 3, 2)[j % 3]
        kw = dict(kw, side=("auto", "rows", "cols")[j % 3])
        leaves = tuple(_leaf(_det(f"multi{gid}-{l}", shape, 0.3 * (l + 1)), device, dtype, rg) for l in range(L))

        def make(*ws, size=size, kw=kw):
            return (list(ws), size, 0.5, 2.0), dict(kw)
        # three layers are heavy for interpreted Triton (one program per (group, class, channel))
        out.append(Sample(f"{gid}-L{L}-{kw['side']}", leaves, make, heavy=L == 3))
    gid, shape, size, kw = FRAME_GEOMETRIES[0]
    s = _leaf(_det("multi-strided", (2 * shape[0], *shape[1:]), 0.5), device, dtype, rg)
    e = _leaf(_det("multi-E", (1, *shape[1:]), 0.5), device, dtype, rg)
    out.append(Sample(gid + "-strided-expanded", (s, e),
                      lambda s, e: (([s[::2], e.expand(shape)], size, 0.5, 2.0), dict(kw))))
    return out

CONV_CASES = [
    # the sparse layouts are a table op of their own (ops/conv.py)
    OpCase("conv_to_matrix_sparse", "conv", regkernels.conv_to_matrix, R_conv.conv_to_matrix, o_conv_to_matrix,
           _conv_to_matrix_samples(("coo", "csr")), normalize=_dense, rtol64=1e-12,
           compile="the sparse index plan is built on the host from data-dependent sizes (torch.compile cannot "
                   "trace it); the dense layout compiles",
           func="torch.func transforms run backwards with grad mode on, which the sparse layouts' refusal of "
                "double backward cannot tell from create_graph=True (they raise); the dense layout transforms"),
    OpCase("conv_to_matrix", "conv", regkernels.conv_to_matrix, R_conv.conv_to_matrix, o_conv_to_matrix,
           _conv_to_matrix_samples(("dense",)), normalize=_dense, rtol64=1e-12, bad=[
               Bad("weight-2d", (CW[0, 0], (5, 5)), {}, ValueError, r"conv_to_matrix: weight must have 3 or 4 or 5 dims"),
               Bad("weight-6d", (CW[None, None], (5, 5)), {}, ValueError, r"weight must have 3 or 4 or 5 dims"),
               Bad("weight-int64", (CW.long(), (5, 5)), {}, TypeError,
                   r"conv_to_matrix: weight must have a floating dtype"),
               Bad("weight-numpy", (CW.numpy(), (5, 5)), {}, TypeError, r"weight must be a torch.Tensor"),
               Bad("kernel-size-0", (torch.randn(4, 2, 0, 3), (5, 5)), {}, ValueError,
                   r"weight must have kernel sizes >= 1"),
               Bad("input_size-1-of-2", (CW, (5,)), {}, ValueError,
                   r"conv_to_matrix: input_size must be a sequence of 2 positive"),
               Bad("input_size-zero", (CW, (5, 0)), {}, ValueError, r"input_size must be a sequence of 2 positive ints"),
               Bad("input_size-int", (CW, 5), {}, TypeError, r"input_size must be a sequence of 2 positive ints"),
               Bad("input_size-float", (CW, (5.0, 5)), {}, TypeError, r"input_size must be a sequence"),
               Bad("stride-zero", (CW, (5, 5)), dict(stride=0), ValueError,
                   r"conv_to_matrix: stride must be an int or a sequence of 2 ints, each >= 1; got 0"),
               Bad("stride-3-of-2", (CW, (5, 5)), dict(stride=(1, 1, 1)), ValueError,
                   r"stride must be an int or a sequence of 2"),
               Bad("stride-float", (CW, (5, 5)), dict(stride=1.5), TypeError, r"stride must be an int or a sequence"),
               Bad("dilation-zero", (CW, (5, 5)), dict(dilation=(1, 0)), ValueError, r"dilation must be .* each >= 1"),
               Bad("padding-negative", (CW, (5, 5)), dict(padding=-1), ValueError, r"padding must be .* each >= 0; got -1"),
               Bad("groups-not-dividing", (CW, (5, 5)), dict(groups=3), ValueError,
                   r"groups must divide the output channels C_out"),
               Bad("groups-zero", (CW, (5, 5)), dict(groups=0), ValueError, r"groups must be >= 1"),
               Bad("padding_mode-reflect", (CW, (5, 5)), dict(padding_mode="reflect"), ValueError,
                   r"padding_mode must be 'zeros' or"),
               Bad("layout-bsr", (CW, (5, 5)), dict(layout="bsr"), ValueError, r"layout must be 'dense', 'coo' or 'csr'"),
               Bad("max_dense_bytes-negative", (CW, (5, 5)), dict(max_dense_bytes=-1), ValueError,
                   r"max_dense_bytes must be >= 0"),
               Bad("output-size-zero", (CW, (2, 2)), {}, ValueError,
                   r"output size must be >= 1 per dim.*got output size \(0, 0\)"),
               Bad("circular-padding-above-input", (CW, (2, 2)), dict(padding=3, padding_mode="circular"), ValueError,
                   r"padding must be <= input_size per dim for padding_mode='circular'"),
               Bad("dense-too-large", (torch.randn(64, 64, 3, 3), (32, 32)), dict(padding=1), ValueError,
                   r"conv_to_matrix: the dense matrix of shape \(65536, 65536\) needs 17179869184 bytes.*"
                   r"layout='coo' or layout='csr'"),
               Bad("dense-above-max_dense_bytes", (torch.randn(2, 2, 3, 3, dtype=D64), (5, 5)),
                   dict(padding=1, max_dense_bytes=1000), ValueError,
                   r"shape \(50, 50\) needs 20000 bytes.*max_dense_bytes=1000"),
           ]),
    OpCase("conv_frame_penalty", "conv", regkernels.conv_frame_penalty, R_conv.conv_frame_penalty, o_conv_frame,
           _conv_samples(FRAME_GEOMETRIES, (0.5, 2.0), tag="frame"), rtol64=1e-10, bad=[
               Bad("A-negative", (CW, (5, 5), -0.1, 1.0), {}, ValueError, r"conv_frame_penalty: A must be >= 0"),
               Bad("A-above-B", (CW, (5, 5), 2.0, 1.0), {}, ValueError, r"conv_frame_penalty: need A <= B"),
               Bad("A-str", (CW, (5, 5), "a", 1.0), {}, TypeError, r"A must be a real number"),
               Bad("side-unknown", (CW, (5, 5), 0.5, 1.0), dict(side="both"), ValueError, r"side must be 'auto', 'rows'"),
               Bad("reference-too-large", (torch.randn(32, 32, 3, 3, dtype=D64) / 17, (23, 23), 0.5, 2.0),
                   dict(padding=1, backend="reference"), ValueError,
                   r"conv_frame_penalty: the explicit reference \(dense T of shape \(16928, 16928\) plus its Gram "
                   r"matrix\) needs .* bytes"),
           ]),
    OpCase("conv_frame_penalty_multi", "conv", regkernels.conv_frame_penalty_multi, R_conv.conv_frame_penalty_multi,
           o_conv_frame_multi, _conv_frame_multi_samples, rtol64=1e-10, bad=[
               Bad("weights-tensor", (CW, (5, 5), 0.5, 1.0), {}, TypeError,
                   r"conv_frame_penalty_multi: weights must be a list or tuple of weight tensors"),
               Bad("weights-empty", ([], (5, 5), 0.5, 1.0), {}, ValueError,
                   r"conv_frame_penalty_multi: weights must hold at least one weight tensor"),
               Bad("weights-str-entry", ([CW, "w"], (5, 5), 0.5, 1.0), {}, TypeError,
                   r"conv_frame_penalty_multi: weights\[1\] must be a torch.Tensor"),
               Bad("two-shapes", ([CW, CW[:2]], (5, 5), 0.5, 1.0), {}, ValueError,
                   r"conv_frame_penalty_multi: weights must all have one shape .* weights\[0\] has \(4, 2, 3, 3\), "
                   r"weights\[1\] has \(2, 2, 3, 3\)"),
               Bad("two-dtypes", ([CW, CW.double()], (5, 5), 0.5, 1.0), {}, TypeError,
                   r"conv_frame_penalty_multi: weights must all have one dtype; weights\[0\] is torch.float32, "
                   r"weights\[1\] is torch.float64"),
               Bad("two-devices", ([CW, CW.to("meta")], (5, 5), 0.5, 1.0), {}, ValueError,
                   r"conv_frame_penalty_multi: weights must all be on one device; weights\[0\] is on cpu, "
                   r"weights\[1\] on meta"),
               Bad("A-above-B", ([CW], (5, 5), 2.0, 1.0), {}, ValueError, r"conv_frame_penalty_multi: need A <= B"),
               Bad("groups-not-dividing", ([CW], (5, 5), 0.5, 1.0), dict(groups=3), ValueError,
                   r"conv_frame_penalty_multi: groups must divide the output channels"),
               Bad("side-unknown", ([CW], (5, 5), 0.5, 1.0), dict(side="both"), ValueError,
                   r"conv_frame_penalty_multi: side must be 'auto', 'rows'"),
           ]),
    OpCase("conv_gershgorin_bounds", "conv", regkernels.conv_gershgorin_bounds, R_conv.conv_gershgorin_bounds,
           o_conv_gershgorin, _conv_samples(FRAME_GEOMETRIES, tag="gersh", empty=False), rtol64=1e-10, bad=[
               Bad("groups-not-dividing", (CW, (5, 5)), dict(groups=3), ValueError, r"conv_gershgorin_bounds: groups must"),
               Bad("reference-too-large", (torch.randn(32, 32, 3, 3, dtype=D64) / 17, (23, 23)),
                   dict(padding=1, backend="reference"), ValueError, r"conv_gershgorin_bounds: the explicit reference"),
           ]),
]


def _ocnn_samples(device, dtype, rg):
    out = []
    for sid, shape, kw in [("3x2x3x3-s1", (3, 2, 3, 3), dict(stride=1)), ("4x3x2x2-s2", (4, 3, 2, 2), dict(stride=2)),
                           ("2x1x5x5-s2-p1", (2, 1, 5, 5), dict(stride=2, padding=1)),
                           ("3x2x5-s1-1d", (3, 2, 5), dict(stride=(1,))),
                           # input side: a dead phase (stride 3 > k = 2), c > o; 1-D, c < o
                           ("2x3x2x3-s3x1-cols", (2, 3, 2, 3), dict(stride=(3, 1), side="cols")),
                           ("3x2x4-s2-1d-cols", (3, 2, 4), dict(stride=(2,), side="cols"))]:
        w = _leaf(_det("ocnn" + sid, shape, 0.5), device, dtype, rg)
        out.append(Sample(sid, (w,), lambda w, kw=kw: ((w,), dict(kw))))
    s = _leaf(_det("ocnn-strided", (6, 2, 3, 3), 0.5), device, dtype, rg)
    out.append(Sample("3x2x3x3-strided", (s,), lambda w: ((w[::2],), {})))
    e = _leaf(_det("ocnn-E", (1, 2, 3, 3), 0.5), device, dtype, rg)
    out.append(Sample("3x2x3x3-expanded", (e,), lambda w: ((w.expand(3, 2, 3, 3),), {})))
    z = _leaf(torch.zeros(0, 3, 3, 3, dtype=D64), device, dtype, rg)
    out.append(Sample("0x3x3x3-empty", (z,), lambda w: ((w,), {}), grad=False))
    return out


def o_conv_orthogonality_multi(weights, stride=1, padding=None, side="rows"):
    return (torch.stack([o_conv_orthogonality(w, stride, padding, side)[0] for w in weights]),)


def _ocnn_multi_samples(device, dtype, rg):
    out = []
    for sid, shape, n, kw in [("3x3x2x3x3-s1", (3, 2, 3, 3), 3, dict(stride=1)),
                              ("2x4x3x2x2-s2", (4, 3, 2, 2), 2, dict(stride=2)),
                              ("2x2x3x3x3-s2-p1", (2, 3, 3, 3), 2, dict(stride=2, padding=1)),
                              ("1x3x2x5-1d", (3, 2, 5), 1, dict(stride=(1,))),
                              ("2x3x2x3x3-s2-cols", (3, 2, 3, 3), 2, dict(stride=2, side="cols")),
                              ("2x2x3x2x2-s1-cols", (2, 3, 2, 2), 2, dict(stride=1, side="cols"))]:
        leaves = tuple(_leaf(_det(f"ocnn-multi{sid}{i}", shape, 0.5), device, dtype, rg) for i in range(n))
        out.append(Sample(sid, leaves, lambda *ws, kw=kw: ((list(ws),), dict(kw))))
    # views: a transposed (non-contiguous) weight next to a contiguous one of the same shape
    t = _leaf(_det("ocnn-multi-T", (2, 3, 3, 3), 0.5), device, dtype, rg)
    c = _leaf(_det("ocnn-multi-C", (3, 2, 3, 3), 0.5), device, dtype, rg)
    out.append(Sample("2x3x2x3x3-transposed", (t, c), lambda t, c: (([t.transpose(0, 1), c],), {})))
    z = _leaf(torch.zeros(0, 3, 3, 3, dtype=D64), device, dtype, rg)
    out.append(Sample("2x0x3x3x3-empty", (z,), lambda z: (([z, z],), {}), grad=False))
    return out


SEDGHI_GEOMETRIES = [
    ("3x2x3x3@5x4", (3, 2, 3, 3), (5, 4), {}), ("2x4x1x3@3x6", (2, 4, 1, 3), (3, 6), {}),
    ("3x3x5x5@5x5", (3, 3, 5, 5), (5, 5), {}), ("4x2x3@7", (4, 2, 3), (7,), {}),
]
CLIP_GEOMETRIES = SEDGHI_GEOMETRIES[:2] + [
    # kernels as large as the input: exact projection (odd, even and 1-D sizes)
    ("3x4x6x5@6x5-full", (3, 4, 6, 5), (6, 5), {}), ("3x4x4x6@4x6-full", (3, 4, 4, 6), (4, 6), {}),
    ("3x4x8@8-full", (3, 4, 8), (8,), {}),
]


CONV_CASES += [
    OpCase("conv_orthogonality_penalty", "conv", regkernels.conv_orthogonality_penalty,
           R_conv.conv_orthogonality_penalty, o_conv_orthogonality, _ocnn_samples, rtol64=1e-10, bad=[
               Bad("weight-int32", (CW.int(),), {}, TypeError, r"conv_orthogonality_penalty: weight must have a"),
               Bad("stride-zero", (CW,), dict(stride=0), ValueError, r"conv_orthogonality_penalty: stride must be"),
               Bad("padding-negative", (CW,), dict(padding=(-1, 0)), ValueError, r"padding must be .* each >= 0"),
               Bad("side-auto", (CW,), dict(side="auto"), ValueError,
                   r"conv_orthogonality_penalty: side must be 'rows' \(output side.*\) or 'cols' .*; got 'auto'"),
               Bad("side-cols-padding", (CW,), dict(side="cols", padding=1), ValueError,
                   r"conv_orthogonality_penalty: padding selects the output side's shifts \(side='rows'\); .* "
                   r"pass padding=None; got padding=1"),
           ]),
    OpCase("conv_orthogonality_penalty_multi", "conv", regkernels.conv_orthogonality_penalty_multi,
           R_conv.conv_orthogonality_penalty_multi, o_conv_orthogonality_multi, _ocnn_multi_samples, rtol64=1e-10,
           bad=[
               Bad("weights-tensor", (CW,), {}, TypeError,
                   r"conv_orthogonality_penalty_multi: weights must be a list or tuple of weight tensors"),
               Bad("weights-empty", ([],), {}, ValueError,
                   r"conv_orthogonality_penalty_multi: weights must hold at least one weight tensor"),
               Bad("weights-str-entry", ([CW, "w"],), {}, TypeError,
                   r"conv_orthogonality_penalty_multi: weights\[1\] must be a torch.Tensor"),
               Bad("weights-int32", ([CW.int()],), {}, TypeError,
                   r"conv_orthogonality_penalty_multi: weights\[0\] must have a floating dtype"),
               Bad("weights-2d", ([CW, torch.randn(4, 2)],), {}, ValueError,
                   r"conv_orthogonality_penalty_multi: weights\[1\] must have 3 or 4 or 5 dims"),
               Bad("shapes-differ", ([CW, torch.randn(4, 3, 3, 3)],), {}, ValueError,
                   r"conv_orthogonality_penalty_multi: all weights must have one shape, dtype and device; got "
                   r"weights\[0\] with shape \(4, 2, 3, 3\), weights\[1\] with shape \(4, 3, 3, 3\)"),
               Bad("dtypes-differ", ([CW, CW.double()],), {}, ValueError,
                   r"conv_orthogonality_penalty_multi: all weights must have one shape, dtype and device; got "
                   r"weights\[0\] with dtype torch.float32, weights\[1\] with dtype torch.float64"),
               Bad("devices-differ", ([CW, torch.empty(4, 2, 3, 3, device="meta")],), {}, ValueError,
                   r"conv_orthogonality_penalty_multi: all weights must have one shape, dtype and device; got "
                   r"weights\[0\] with device cpu, weights\[1\] with device meta"),
               Bad("stride-zero", ([CW],), dict(stride=0), ValueError,
                   r"conv_orthogonality_penalty_multi: stride must be"),
               Bad("padding-negative", ([CW],), dict(padding=(-1, 0)), ValueError,
                   r"conv_orthogonality_penalty_multi: padding must be .* each >= 0"),
               Bad("side-int", ([CW],), dict(side=1), ValueError,
                   r"conv_orthogonality_penalty_multi: side must be 'rows' .* or 'cols' .*; got 1"),
               Bad("side-cols-padding", ([CW],), dict(side="cols", padding=0), ValueError,
                   r"conv_orthogonality_penalty_multi: padding selects the output side's shifts"),
           ]),
    OpCase("conv_singular_values", "conv", regkernels.conv_singular_values,
           lambda w, size, **kw: R_conv.conv_singular_values(w, size), o_conv_singular_values,
           _conv_samples(SEDGHI_GEOMETRIES, tag="sedghi", empty_kw=()),
           opcheck_skip={"regkernels::batched_svd": "the real 2C×2C embedding holds every singular value twice, "
                                                    "so U and V (and their gradients) are not unique; the op is "
                                                    "opchecked through the batched_svd case"},
           oracle_view=_sorted_flat, rtol64=1e-10, bad=[
               Bad("kernel-above-input", (CW, (2, 5)), {}, ValueError,
                   r"conv_singular_values: weight's kernel \(3, 3\) must fit the circular input"),
               Bad("input_size-3-of-2", (CW, (5, 5, 5)), {}, ValueError, r"input_size must be a sequence of 2 positive"),
           ]),
    OpCase("clip_conv_singular_values", "conv", regkernels.clip_conv_singular_values,
           lambda w, size, lo, hi, **kw: R_conv.clip_conv_singular_values(w, size, lo, hi), o_clip_conv,
           # no views: an expanded kernel is rank-deficient per frequency, and the singular vectors
           # that its zero singular values are clamped up along are not unique
           _conv_samples(CLIP_GEOMETRIES, (0.5, 1.5), tag="clip", views=False, empty_kw=()),
           differentiable=False, oracle_view=_sorted_flat, rtol64=1e-10,
           opcheck_skip={"regkernels::batched_svd": "the real 2C×2C embedding holds every singular value twice, "
                                                    "so U and V are not unique; the op is opchecked through the "
                                                    "batched_svd case"}, bad=[
               Bad("lo-above-hi", (CW, (5, 5), 2.0, 1.0), {}, ValueError, r"clip_conv_singular_values: need lo <= hi"),
               Bad("lo-negative", (CW, (5, 5), -1.0, 1.0), {}, ValueError, r"lo must be >= 0"),
               Bad("kernel-above-input", (CW, (2, 2), 0.5, 1.0), {}, ValueError, r"must fit the circular input"),
           ]),
]


# --------------------------------------------------------------------------- conv_spectral_norm

def _operator_norm(T):
    return torch.linalg.matrix_norm(T, 2) if T.numel() else torch.zeros((), dtype=D64)


def _per_layer(weight, fn):
    ws = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    vals = torch.stack([fn(w) for w in ws])
    return vals[0] if isinstance(weight, torch.Tensor) else vals


def o_spectral_norm_power(weight, input_size, **kw):
    """σ_max of the dense T from impulse responses (LAPACK), for samples iterated to convergence
    (``tol=1e-14``: every sample then stops, or runs out of steps, within 1e-9 of σ_max)."""
    if kw.get("tol") != SPECTRAL_CONVERGED_TOL:
        return None
    return (_per_layer(weight, lambda w: _operator_norm(impulse_matrix(w, input_size, **kw))),)


def _periodic_grid(input_size, kernel, stride=1, padding=0, dilation=1, padding_mode="zeros", **_):
    """Per dim (grid N, stride g, row multiplicity m) of the periodic conv the bound embeds T in,
    spelled out from docs/conv.md#conv_spectral_norm."""
    d = len(input_size)
    out = []
    for n, k, s, p, dl in zip(input_size, kernel, _expand(stride, d), _expand(padding, d), _expand(dilation, d)):
        o = (n + 2 * p - dl * (k - 1) - 1) // s + 1
        if padding_mode == "circular":
            g = math.gcd(s, n)
            rows = [(s * i // g) % (n // g) for i in range(o)]
            out.append((n, g, max(rows.count(r) for r in set(rows))))
        else:
            N = s
            while N < n + p or N < s * o:
                N += s
            out.append((N, s, 1))
    return out


def _periodic_matrix(weight, input_size, groups=1, dilation=1, **kw):
    """The dense periodic conv of stride g on the grid N from impulse responses: the basis inputs
    tiled periodically (so taps wrap as often as they need), then a plain conv."""
    weight = weight.detach().double().cpu()
    d = weight.dim() - 2
    grid = _periodic_grid(input_size, weight.shape[2:], dilation=dilation, **kw)
    dl = _expand(dilation, d)
    c_in = weight.shape[1] * groups
    sizes = [N for N, _, _ in grid]
    n = c_in * math.prod(sizes)
    z = torch.eye(n, dtype=D64).reshape(n, c_in, *sizes)
    for i, ((N, _, _), k, di) in enumerate(zip(grid, weight.shape[2:], dl)):
        reach = N + di * (k - 1)
        z = torch.cat([z] * (-(-reach // N)), dim=2 + i).narrow(2 + i, 0, reach)
    y = CONV[d](z, weight, None, tuple(g for _, g, _ in grid), 0, dl, groups)
    return y.reshape(n, -1).T, math.prod([m for _, _, m in grid])


def o_spectral_norm_bound(weight, input_size, **kw):
    """What the Gram bound converges to (generic layers: a simple top singular value per frequency):
    √m·σ_max of the dense periodic conv. Checked on samples with enough Gram steps."""
    if kw.get("n_iter", 6) < SPECTRAL_CONVERGED_GRAM:
        return None

    def one(w):
        if w.numel() == 0:
            return torch.zeros((), dtype=D64)
        C, m = _periodic_matrix(w, input_size, **{k: v for k, v in kw.items() if k not in ("method", "n_iter")})
        return math.sqrt(m) * _operator_norm(C)
    return (_per_layer(weight, one),)


SPECTRAL_CONVERGED_TOL = 1e-14
# power steps to reach it: these two need about 700 (a near-double top singular value), the others
# reach it within 300 (measured)
SPECTRAL_SLOW = {"3x2x3@9-d2-p3-s2-circular", "3x2x3x3@4x4-p1-L3"}
SPECTRAL_CONVERGED_GRAM = 12
SPECTRAL_SEED = 11
# geometries of T: zero / circular padding, strides, dilation, groups, 1-3 spatial dims, a circular
# padding wider than half the kernel (rows of T repeated: m = 2)
SPECTRAL_GEOMETRIES = CONV_GEOMETRIES[:5] + [
    ("3x2x3@9-d2-p3-s2-circular", (3, 2, 3), (9,), dict(dilation=2, padding=3, stride=2, padding_mode="circular")),
    ("4x3x4x4@6x6-s2-p1", (4, 3, 4, 4), (6, 6), dict(stride=2, padding=1)),
    ("3x3x3x3@6x6-s3-circular", (3, 3, 3, 3), (6, 6), dict(stride=3, padding_mode="circular")),
    ("3x2x1x1@4x3-p2-circular", (3, 2, 1, 1), (4, 3), dict(padding=2, padding_mode="circular")),
]


def _spectral_gen(device):
    return torch.Generator(device=device).manual_seed(SPECTRAL_SEED)


def _spectral_samples(method):
    """Every geometry iterated to convergence (power: a seeded start, stopping at 1e-14 within 300
    steps, 1000 for the slow ones; bound: 12 Gram steps), a list of three layers, the views and the
    empty weight; then one sample without a generator, traceable by torch.compile (power: 8 steps,
    none skipped; bound: the defaults), which has no oracle."""
    def conv_kw(sid):
        if method == "bound":
            return dict(method="bound", n_iter=SPECTRAL_CONVERGED_GRAM)
        return dict(n_iter=1000 if sid in SPECTRAL_SLOW else 300, tol=SPECTRAL_CONVERGED_TOL)

    def samples(device, dtype, rg):
        out = []
        geometries = _conv_samples(SPECTRAL_GEOMETRIES, tag="spectral" + method, empty_kw=(("padding", 1),))
        for s in geometries(device, dtype, rg):
            make = s.make

            def with_kw(*leaves, make=make, sid=s.id):
                args, kw = make(*leaves)
                extra = {"generator": _spectral_gen(leaves[0].device)} if method == "power" else {}
                return args, dict(kw, **conv_kw(sid), **extra)
            out.append(Sample(s.id, s.leaves, with_kw, grad=s.grad, compile=method != "power"))
        gid, shape, size, kw = SPECTRAL_GEOMETRIES[1]
        leaves = tuple(_leaf(_det(f"spectral-list{method}{l}", shape, 0.5 * (l + 1)), device, dtype, rg)
                       for l in range(3))

        def make_list(*ws, size=size, kw=kw, sid=f"{gid}-L3"):
            extra = {"generator": _spectral_gen(ws[0].device)} if method == "power" else {}
            return (list(ws), size), dict(kw, **conv_kw(sid), **extra)
        out.append(Sample(f"{gid}-L3", leaves, make_list, compile=method != "power"))
        gid, shape, size, kw = SPECTRAL_GEOMETRIES[0]
        w = _leaf(_det(f"spectral-defaults{method}", shape, 0.5), device, dtype, rg)
        defaults = dict(kw, method=method) if method == "bound" else dict(kw, n_iter=8, tol=0.0)
        out.append(Sample(f"{gid}-defaults", (w,), lambda w, kw=defaults, size=size: ((w, size), dict(kw))))
        return out
    return samples


def _sigma_and_tol(out):
    return (out.sigma, out.rel_tol)


def _sigma_only(outs):
    return (outs[0],)


SW = torch.randn(4, 2, 3, 3)

CONV_CASES += [
    OpCase("conv_spectral_norm", "conv", regkernels.conv_spectral_norm, R_conv.conv_spectral_norm,
           o_spectral_norm_power, _spectral_samples("power"), normalize=_sigma_and_tol, oracle_view=_sigma_only,
           grad_outputs=(0,), rtol64=1e-9, bad=[
               Bad("weight-int64", (SW.long(), (5, 5)), {}, TypeError,
                   r"conv_spectral_norm: weight must have a floating dtype"),
               Bad("weight-str", ("w", (5, 5)), {}, TypeError,
                   r"conv_spectral_norm: weight must be a torch.Tensor .* or a list / tuple of them; got str"),
               Bad("weight-2d", (SW[0, 0], (5, 5)), {}, ValueError,
                   r"conv_spectral_norm: weight must have 3 or 4 or 5 dims"),
               Bad("weights-empty", ([], (5, 5)), {}, ValueError,
                   r"conv_spectral_norm: weight must be a tensor .* or a non-empty list of them; got an empty list"),
               Bad("weights-str-entry", ([SW, "w"], (5, 5)), {}, TypeError,
                   r"conv_spectral_norm: weight\[1\] must be a torch.Tensor"),
               Bad("weights-two-shapes", ([SW, SW[:2]], (5, 5)), {}, ValueError,
                   r"conv_spectral_norm: the weights of a list must have one shape, dtype and device; got weight\[0\] "
                   r"with shape \(4, 2, 3, 3\), weight\[1\] with shape \(2, 2, 3, 3\)"),
               Bad("weights-two-dtypes", ([SW, SW.double()], (5, 5)), {}, ValueError,
                   r"conv_spectral_norm: .* weight\[0\] with dtype torch.float32, weight\[1\] with dtype "
                   r"torch.float64"),
               Bad("input_size-1-of-2", (SW, (5,)), {}, ValueError,
                   r"conv_spectral_norm: input_size must be a sequence of 2 positive"),
               Bad("stride-zero", (SW, (5, 5)), dict(stride=0), ValueError, r"conv_spectral_norm: stride must be"),
               Bad("groups-not-dividing", (SW, (5, 5)), dict(groups=3), ValueError,
                   r"conv_spectral_norm: groups must divide the output channels"),
               Bad("padding_mode-reflect", (SW, (5, 5)), dict(padding_mode="reflect"), ValueError,
                   r"conv_spectral_norm: padding_mode must be 'zeros' or 'circular'"),
               Bad("output-size-zero", (SW, (2, 2)), {}, ValueError, r"conv_spectral_norm: the output size must be"),
               Bad("method-unknown", (SW, (5, 5)), dict(method="exact"), ValueError,
                   r"conv_spectral_norm: method must be 'power' or 'bound'; got 'exact'"),
               Bad("n_iter-zero", (SW, (5, 5)), dict(n_iter=0), ValueError,
                   r"conv_spectral_norm: n_iter must be >= 1; got n_iter=0"),
               Bad("n_iter-float", (SW, (5, 5)), dict(n_iter=10.0), TypeError,
                   r"conv_spectral_norm: n_iter must be an integer"),
               Bad("tol-negative", (SW, (5, 5)), dict(tol=-1e-3), ValueError, r"conv_spectral_norm: tol must be >= 0"),
               Bad("tol-nan", (SW, (5, 5)), dict(tol=math.nan), ValueError, r"conv_spectral_norm: tol must be finite"),
               Bad("generator-seed", (SW, (5, 5)), dict(generator=3), TypeError,
                   r"conv_spectral_norm: generator must be a torch.Generator or None; got int"),
               Bad("generator-other-device", (SW.to("meta"), (5, 5)), dict(generator=torch.Generator()), ValueError,
                   r"conv_spectral_norm: generator must be on the weight's device \(meta\); got a cpu generator"),
               Bad("positional-method", (SW, (5, 5), 1, 0, 1, 1, "zeros", "bound"), {}, TypeError,
                   r"takes from 2 to 7 positional arguments"),
               Bad("power-too-large", (torch.randn(64, 64, 3, 3, requires_grad=True), (256, 256)),
                   dict(padding=1, n_iter=1000), ValueError,
                   r"conv_spectral_norm: the power iterates \(every step kept for the backward\) need .* bytes .* "
                   r"over MAX_WORK_BYTES=.*torch.no_grad\(\)"),
               Bad("bound-too-large", (torch.randn(512, 512, 3, 3), (128, 128)), dict(method="bound", padding=1),
                   ValueError, r"conv_spectral_norm: the per-frequency blocks and their Gram powers need .* bytes"),
           ]),
    # the same public op and table row, method="bound": its own case so each method gets the
    # generated gradcheck, compile and torch.func checks
    OpCase("conv_spectral_norm_bound", "conv", regkernels.conv_spectral_norm, R_conv.conv_spectral_norm,
           o_spectral_norm_bound, _spectral_samples("bound"), normalize=_sigma_and_tol, oracle_view=_sigma_only,
           grad_outputs=(0,), rtol64=1e-9, table_ops=("conv_spectral_norm",)),
    # input_size=None: the bound for every input size (docs/conv.md#a-bound-for-every-input-size). No
    # closed form to compare with; tests/test_conv_spectral_bound.py checks it against dense operators
    # of many sizes. Here the generated gradcheck, compile, torch.func and bad-input checks.
    OpCase("conv_spectral_norm_any_size", "conv", regkernels.conv_spectral_norm, R_conv.conv_spectral_norm,
           None, _conv_samples([
               ("3x4x3x3-p1", (3, 4, 3, 3), None, dict(padding=1)),
               ("4x3x4x4-s2-p1", (4, 3, 4, 4), None, dict(stride=2, padding=1)),
               ("3x2x3-d2", (3, 2, 3), None, dict(dilation=2)),
               ("4x2x3x3-g2", (4, 2, 3, 3), None, dict(groups=2, padding=1)),
               ("3x2x1x1-circular", (3, 2, 1, 1), None, dict(padding_mode="circular")),
           ], extra_kw=dict(method="bound"), empty=False, tag="anysize"),
           normalize=_sigma_and_tol, grad_outputs=(0,), rtol64=1e-9, table_ops=("conv_spectral_norm",), bad=[
               Bad("power", (SW, None), {}, ValueError,
                   r"conv_spectral_norm: input_size=None \(a bound for every input size\) needs method='bound'"),
               Bad("circular-repeats-rows", (SW, None), dict(method="bound", padding=2, padding_mode="circular"),
                   ValueError, r"conv_spectral_norm: input_size=None with padding_mode='circular' needs "
                               r"2·padding <= dilation·\(kernel − 1\)"),
               Bad("grid-too-coarse", (SW, None), dict(method="bound", grid=(1, 1)), ValueError,
                   r"conv_spectral_norm: grid \(1, 1\) is too coarse for kernel"),
           ]),
]


# --------------------------------------------------------------------------- SVD

def _orthogonal(*batch_and_n, seed):
    n = batch_and_n[-1]
    Q, Rf = torch.linalg.qr(_det(seed, (*batch_and_n, n)))
    return Q * Rf.diagonal(dim1=-2, dim2=-1).sign()[..., None, :]


def _well_conditioned(shape, seed):
    """``Q₁ diag(s) Q₂``, s in [0.3, 2.5]: the eigh oracle squares the condition number."""
    *b, m, n = shape
    k = min(m, n)
    s = 0.3 + 2.2 * torch.rand(*b, k, generator=torch.Generator().manual_seed(_stable_hash(seed)), dtype=D64)
    U, V = _orthogonal(*b, m, seed=seed + "U")[..., :k], _orthogonal(*b, n, seed=seed + "V")[..., :k, :]
    return (U * s[..., None, :]) @ V


def _svd_normalize(out):
    U, S, Vh = out
    return S, (U * S[..., None, :]) @ Vh


def o_batched_svd(X):
    X64 = X.detach().double().cpu()
    mats = X64.flatten(0, -3) if X64.dim() > 2 else X64[None]
    k = min(X64.shape[-2:])
    S = torch.stack([torch.linalg.svdvals(M) for M in mats]) if mats.shape[0] else torch.zeros(0, k, dtype=D64)
    return S.reshape(*X64.shape[:-2], k), X64


def _clamp_via_eigh(X, lo, hi):
    """``X V diag(clamp(σ)/σ) Vᵀ`` with ``XᵀX = V diag(σ²) Vᵀ`` (eigh, no SVD); wide X via Xᵀ."""
    if X.shape[-2] < X.shape[-1]:
        return _clamp_via_eigh(X.mT, lo, hi).mT
    if X.numel() == 0:
        return X.clone()
    lam, V = torch.linalg.eigh(X.mT @ X)
    sigma = lam.clamp_min(0).sqrt()
    return X @ (V * (sigma.clamp(lo, hi) / sigma)[..., None, :]) @ V.mT


def o_clamp(X, lo, hi):
    return (_clamp_via_eigh(X.detach().double().cpu(), lo, hi),)


SVD_SHAPES = [(5, 7, 4), (2, 3, 4, 6), (1, 9), (9, 1), (2, 61, 64), (2, 64, 64), (3, 17, 17), (2, 33, 31)]


def _svd_samples(extra_args=(), *, well_conditioned=False):
    def samples(device, dtype, rg):
        out = []
        for shape in SVD_SHAPES:
            sid = "x".join(map(str, shape))
            X = _well_conditioned(shape, sid) if well_conditioned else _det("svd" + sid, shape)
            x = _leaf(X, device, dtype, rg)
            out.append(Sample(sid, (x,), lambda x: ((x, *extra_args), {}), heavy=max(shape[-2:]) > 32))
        base = _leaf(_well_conditioned((3, 8, 10), "svdT") if well_conditioned else _det("svdT", (3, 8, 10)),
                     device, dtype, rg)
        out.append(Sample("3x10x8-transposed", (base,), lambda x: ((x.mT, *extra_args), {})))
        big = _leaf(_well_conditioned((3, 16, 11), "svdS") if well_conditioned else _det("svdS", (3, 16, 11)),
                    device, dtype, rg)
        out.append(Sample("3x8x10-strided", (big,), lambda x: ((x[:, ::2, 1:], *extra_args), {}),
                          grad=not well_conditioned))
        one = _leaf(_well_conditioned((1, 6, 5), "svdE") if well_conditioned else _det("svdE", (1, 6, 5)),
                    device, dtype, rg)
        out.append(Sample("4x6x5-expanded", (one,), lambda x: ((x.expand(4, 6, 5), *extra_args), {})))
        for shape in [(0, 3, 4), (2, 0, 3)]:
            z = _leaf(torch.zeros(shape, dtype=D64), device, dtype, rg)
            out.append(Sample("x".join(map(str, shape)) + "-empty", (z,), lambda x: ((x, *extra_args), {}), grad=False))
        return out
    return samples


def _svb_call(W, eps, backend=None):
    out = W.detach().clone()
    regkernels.svb_([out], eps, backend=backend)
    return out


def _svb_reference(W, eps):
    out = W.detach().clone()
    R_svd.svb_([out], eps)
    return out


def o_svb(W, eps):
    M = W.detach().double().cpu()
    mat = M.reshape(M.shape[0], -1)
    return (_clamp_via_eigh(mat, 1 / (1 + eps), 1 + eps).reshape(M.shape),)


def _svb_samples(device, dtype, rg):
    out = []
    for sid, shape in [("6x9", (6, 9)), ("9x6", (9, 6)), ("6x3x3x3-conv", (6, 3, 3, 3)), ("33x31", (33, 31))]:
        w = _leaf(3 * _well_conditioned((shape[0], math.prod(shape[1:])), "svb" + sid).reshape(shape),
                  device, dtype, False)
        out.append(Sample(sid, (w,), lambda w: ((w, 0.1), {}), grad=False))
    return out


SVD_CASES = [
    OpCase("batched_svd", "svd", regkernels.batched_svd, R_svd.batched_svd, o_batched_svd, _svd_samples(),
           normalize=_svd_normalize, grad_outputs=(0,), rtol64=1e-10, bad=[
               Bad("X-1d", (torch.randn(4),), {}, ValueError, r"batched_svd: X must have at least 2 dims \(\.\.\., m, n\)"),
               Bad("X-int64", (torch.ones(3, 3, dtype=torch.int64),), {}, TypeError,
                   "batched_svd: X must have a floating dtype"),
               Bad("X-list", ([[1.0, 2.0]],), {}, TypeError, "batched_svd: X must be a torch.Tensor"),
               Bad("backend-unknown", (torch.randn(3, 3),), dict(backend="fast"), ValueError,
                   "batched_svd: backend must be None or one of"),
               Bad("backend-positional", (torch.randn(3, 3), "reference"), {}, TypeError, r"positional argument"),
           ]),
    OpCase("clamp_singular_values", "svd", regkernels.clamp_singular_values,
           lambda X, lo, hi, **kw: R_svd.clamp_singular_values(X, lo, hi), o_clamp,
           _svd_samples((0.8, 1.6), well_conditioned=True), rtol64=1e-9, bad=[
               Bad("X-1d", (torch.randn(3), 0.5, 1), {}, ValueError, "clamp_singular_values: X must have at least 2 dims"),
               Bad("X-int32", (torch.ones(3, 3, dtype=torch.int32), 0.5, 1), {}, TypeError, "floating dtype"),
               Bad("lo-negative", (torch.randn(3, 3), -0.1, 1), {}, ValueError, "clamp_singular_values: lo must be >= 0"),
               Bad("lo-above-hi", (torch.randn(3, 3), 2.0, 1.0), {}, ValueError, "clamp_singular_values: need lo <= hi"),
               Bad("lo-tensor", (torch.randn(3, 3), torch.tensor(0.5), 1.0), {}, TypeError, "lo must be a real number"),
               Bad("backend-positional", (torch.randn(3, 3), 0.5, 1.0, "reference"), {}, TypeError,
                   r"positional argument"),
           ]),
    OpCase("svb_", "svd", _svb_call, _svb_reference, o_svb, _svb_samples, differentiable=False,
           table_ops=("svb_", "batched_svd"), rtol64=1e-9,
           compile="in place over a list of weights; its kernels compile as batched_svd", bad=[
               Bad("eps-zero", (torch.randn(3, 3), 0.0), {}, ValueError, r"svb_: eps must be > 0"),
               Bad("eps-str", (torch.randn(3, 3), "0.1"), {}, TypeError, "svb_: eps must be a real number"),
           ]),
]


# --------------------------------------------------------------------------- Jacobian penalty

def _mlp(d_in, hidden, C, seed):
    torch.manual_seed(_stable_hash(seed))
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, C)).double()


def _jacobian_samples(device, dtype, rg):
    out = []
    for sid, (B, D, H, C), kw in [("6x5-exact", (6, 5, 7, 4), dict(exact=True)),
                                  ("5x5-proj1-seeded", (5, 5, 7, 4), dict(generator=True)),
                                  ("4x3-proj3-seeded", (4, 3, 5, 3), dict(n_proj=3, generator=True)),
                                  ("1x13-exact", (1, 13, 3, 2), dict(exact=True))]:
        model = _mlp(D, H, C, sid).to(device)
        x = _det("jac" + sid, (B, D)).to(device=device, dtype=dtype).requires_grad_(True)

        def make(x, model=model, kw=kw):
            m = copy.deepcopy(model).to(x.dtype)
            kwargs = dict(kw)
            if kwargs.pop("generator", False):
                kwargs["generator"] = torch.Generator(device=x.device).manual_seed(SRIP_SEED)
            return (m(x), x), kwargs
        out.append(Sample(sid, (x,), make, compile=False))
    return out


def o_jacobian(y, x, n_proj=1, exact=False, generator=None):
    """Per-sample Jacobians from torch.autograd.functional.jacobian of the whole batch."""
    if not exact:
        return None  # the projections are drawn in the input's dtype: checked against the reference
    B, C = y.shape
    Js = [torch.autograd.grad(y[:, c].sum(), x, retain_graph=True)[0].detach().double() for c in range(C)]
    return (sum(J.pow(2).sum() for J in Js) / B,)


JACOBIAN_CASES = [
    OpCase("jacobian_penalty", "jacobian", regkernels.jacobian_penalty, R_jacobian.jacobian_penalty, o_jacobian,
           _jacobian_samples, rtol64=1e-10,
           compile="the op calls torch.autograd.grad on the caller's graph, which dynamo does not trace",
           func="the op is itself a torch.autograd.grad over the caller's graph (y computed from x); "
                "torch.func transforms do not see that graph",
           bad=[
               Bad("y-1d", (torch.randn(3, requires_grad=True), torch.randn(3, 2, requires_grad=True)), {}, ValueError,
                   r"jacobian_penalty: y must have"),
               Bad("x-no-grad", (torch.randn(3, 2, requires_grad=True), torch.randn(3, 2)), {}, ValueError,
                   r"jacobian_penalty: x must require grad"),
               Bad("batch-mismatch", (torch.randn(3, 2, requires_grad=True), torch.randn(4, 2, requires_grad=True)),
                   {}, ValueError, r"jacobian_penalty: x and y must share the batch dim B"),
               Bad("n_proj-zero", (torch.randn(3, 2, requires_grad=True), torch.randn(3, 2, requires_grad=True)),
                   dict(n_proj=0), ValueError, r"jacobian_penalty: n_proj must be >= 1"),
               Bad("exact-int", (torch.randn(3, 2, requires_grad=True), torch.randn(3, 2, requires_grad=True)),
                   dict(exact=1), TypeError, r"jacobian_penalty: exact must be a bool"),
               Bad("generator-int", (torch.randn(3, 2, requires_grad=True), torch.randn(3, 2, requires_grad=True)),
                   dict(generator=3), TypeError, r"jacobian_penalty: generator must be a torch.Generator or None"),
           ]),
]


# --------------------------------------------------------------------------- β-LASSO

BETA_LASSO_CONFIGS = {
    "plain": dict(lr=0.05, lam=0.02, beta=1.0),
    "momentum": dict(lr=0.05, lam=0.02, beta=1.0, momentum=0.9),
    "dampening-wd": dict(lr=0.05, lam=0.02, beta=0.5, momentum=0.8, dampening=0.3, weight_decay=1e-2),
    "nesterov-wd": dict(lr=0.05, lam=0.02, beta=2.0, momentum=0.9, nesterov=True, weight_decay=5e-3),
}
BETA_LASSO_STEPS = 5


def _beta_lasso_run(params, grads, backend=None, **cfg):
    """BETA_LASSO_STEPS steps of BetaLasso with the given gradients (one per step and tensor)."""
    from regkernels.optim import BetaLasso

    ps = [p.detach().clone() for p in params]
    opt = BetaLasso(ps, backend=backend, **cfg)
    for step in range(BETA_LASSO_STEPS):
        for p, g in zip(ps, grads):
            p.grad = g[step].clone()
        opt.step()
    return tuple(ps)


def _beta_lasso_reference(params, grads, **cfg):
    ps = [p.detach().clone() for p in params]
    bufs = [None] * len(ps)
    for step in range(BETA_LASSO_STEPS):
        for i, (p, g) in enumerate(zip(ps, grads)):
            bufs[i] = R_beta_lasso.beta_lasso_update_(p, g[step], bufs[i], **cfg)
    return tuple(ps)


def o_beta_lasso(params, grads, lr, lam, beta, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """The update written out in float64 (docs/beta_lasso.md)."""
    outs = []
    for p, g in zip(params, grads):
        t = p.detach().double().cpu().clone()
        buf = None
        for step in range(BETA_LASSO_STEPS):
            d = g[step].double().cpu() + weight_decay * t
            if momentum:
                buf = d.clone() if buf is None else momentum * buf + (1 - dampening) * d
                d = d + momentum * buf if nesterov else buf
            t = t - lr * (d + lam * torch.sign(t))
            t = torch.where(t.abs() >= beta * lam, t, torch.zeros_like(t))
        outs.append(t)
    return tuple(outs)


def _beta_lasso_samples(device, dtype, rg):
    out = []
    runs = [(name, cfg, [(7, 13), (0,), (1,), (33, 5, 3, 3), (4097,)]) for name, cfg in BETA_LASSO_CONFIGS.items()]
    runs.insert(0, ("momentum-small", BETA_LASSO_CONFIGS["momentum"], [(3, 4), (0,), (5,)]))
    for name, cfg, shapes in runs:
        params = tuple((_det(f"bl{name}{i}", s) * 0.1).to(device=device, dtype=dtype) for i, s in enumerate(shapes))
        grads = [torch.stack([_det(f"blg{name}{i}{k}", s) for k in range(BETA_LASSO_STEPS)]).to(device=device, dtype=dtype)
                 for i, s in enumerate(shapes)]

        def make(*ps, grads=grads, cfg=cfg):
            return (list(ps), grads), dict(cfg)
        out.append(Sample(name, params, make, grad=False, compile=False))
    return out


BETA_LASSO_CASES = [
    OpCase("BetaLasso", "beta_lasso", _beta_lasso_run, _beta_lasso_reference, o_beta_lasso, _beta_lasso_samples,
           differentiable=False, table_ops=("beta_lasso_step_", "beta_lasso", "BetaLasso"), rtol64=1e-12,
           func="an optimizer step (in place, no gradient)",
           compile="an optimizer step; the raw op compiles in tests/test_beta_lasso.py", bad=[
               Bad("lr-negative", ([torch.zeros(3)], [torch.zeros(5, 3)]), dict(lr=-1.0, lam=0.1, beta=1.0),
                   ValueError, r"BetaLasso: lr"),
               Bad("backend-unknown", ([torch.zeros(3)], [torch.zeros(5, 3)]),
                   dict(lr=0.1, lam=0.1, beta=1.0, backend="fast"), ValueError, r"BetaLasso: backend must be"),
           ]),
]


CASES: list[OpCase] = GRAM_CASES + CONV_CASES + SVD_CASES + JACOBIAN_CASES + BETA_LASSO_CASES
FAMILIES = ("gram", "conv", "svd", "beta_lasso", "jacobian")

# Public names of regkernels.__all__ that dispatch on no table, with the reason.
NOT_DISPATCHED = {
    "as_matrix": "a reshape of a weight into its matrices; no kernel, no backend argument",
}
