"""Tests generated from tests/op_cases.py × each family's backend TABLE × device × dtype.

Ids say what ran: ``frame_penalty-triton-cuda-bf16-64x576-A0.5-B1.5`` is the public op, the named
backend, the tensors' device, the input dtype and the sample. A combination this machine cannot
run (no CUDA device, an extension built without CUDA, Triton on CPU tensors without
TRITON_INTERPRET=1) is collected and skipped with the table's reason.

Tolerances: float64 kernels agree with the reference to ``case.rtol64`` relative to the output's
scale. Lower precisions are judged as flash-attention's tests judge them: against the float64
truth (the oracle, else the reference) of the same rounded input, a kernel may be off by at most
twice what the reference itself is off in that dtype, plus one rounding unit of the output's scale.
"""
from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from regkernels.ops._table import BACKENDS, dtype_name
from op_cases import CASES, D64, table_of, table_op

pytestmark = [pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state"),
              pytest.mark.filterwarnings("ignore:Sparse invariant checks")]

HAS_CUDA = torch.cuda.is_available()
DEVICES = ("cpu", "cuda")
LOW = (torch.float16, torch.bfloat16)
# one rounding unit of the output's scale, per dtype (the "+ atol" of the low-precision rule)
UNIT = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2e-6, torch.float64: 1e-12}
FACTOR = 2.0
# interpreted Triton runs one numpy program per block: few, small samples (CI time)
INTERPRETED_SAMPLES = {torch.float32: 5, torch.float16: 2, torch.bfloat16: 2}
SMALL = 160  # gradcheck / opcheck / compile / torch.func samples: at most this many input elements
GRAD_SAMPLES = 6  # gradient comparisons per (op, backend, device, dtype), spread over the samples
REFERENCE_LOW_SAMPLES = 2  # the named reference in fp16 / bf16 (it is the reference function itself)
RNG_SEED = 1234  # the global RNG is seeded before every call (srip's start vector without a generator)
# torch.compile backend of test_compile_fullgraph: dynamo's fullgraph trace and AOT autograd through
# the custom ops' fakes and autograd (what can break at registration); REGKERNELS_TEST_COMPILE=inductor
# also generates code (slower; tests/test_*.py keep one inductor compile per op)
COMPILE_BACKEND = os.environ.get("REGKERNELS_TEST_COMPILE", "aot_eager")


# --------------------------------------------------------------------------- collection

def _combos():
    """(case, op, backend, device, dtype, skip reason) for every row of every family's TABLE."""
    for case in CASES:
        table = table_of(case.family)
        if table is None:
            yield case, None, None, None, None, f"regkernels.ops.{case.family} has no TABLE"
            continue
        op = table_op(case, table)
        if op is None:
            yield case, None, None, None, None, f"the {case.family} TABLE has no op {case.name!r}"
            continue
        for backend in dict.fromkeys(r.backend for r in table.rows_for(op)):
            for device in DEVICES:
                row = table.row(op, backend, device)
                if row is None:
                    continue
                why = "needs a CUDA device; none on this machine" if device == "cuda" and not HAS_CUDA \
                    else table.unusable(op, backend, device)
                for dtype in row.dtypes:
                    yield case, op, backend, device, dtype, why


COMBOS = list(_combos())


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _spread(samples, n):
    step = max(1, -(-len(samples) // n))
    return samples[::step][:n]


def _sample_ids(case, dtype, backend=None, device="cpu", *, need_grad=False):
    samples = list(case.samples(torch.device("cpu"), dtype, False))
    if need_grad:
        samples = _spread([s for s in samples if s.grad], GRAD_SAMPLES)
    if backend is not None and _interpreted(backend, device):
        samples = _spread([s for s in samples if not s.heavy], INTERPRETED_SAMPLES.get(dtype, 2))
    elif backend == "reference" and (dtype in LOW or need_grad and dtype != D64):
        samples = _spread(samples, REFERENCE_LOW_SAMPLES)
    return [s.id for s in samples]


def _params(*, per_sample: bool, need_grad=False, one_dtype=False, only=None):
    out = []
    seen = set()
    for case, op, backend, device, dtype, why in COMBOS:
        if only is not None and not only(case):
            continue
        if op is None:
            out.append(pytest.param(case, None, None, None, None, id=f"{case.name}-no-table",
                                    marks=pytest.mark.skip(reason=why)))
            continue
        if one_dtype:
            key = (case.name, backend, device)
            if key in seen:
                continue
            row = table_of(case.family).row(op, backend, device)
            if dtype != (torch.float32 if torch.float32 in row.dtypes else row.dtypes[0]):
                continue
            seen.add(key)
        marks = [pytest.mark.skip(reason=why)] if why else []
        base = f"{case.name}-{backend}-{device}-{dtype_name(dtype)}"
        if not per_sample:
            out.append(pytest.param(case, backend, device, dtype, None, id=base, marks=marks))
            continue
        for sid in _sample_ids(case, dtype, backend, device, need_grad=need_grad):
            out.append(pytest.param(case, backend, device, dtype, sid, id=f"{base}-{sid}", marks=marks))
    return out


def _sample(case, device, dtype, sid, requires_grad=False):
    for s in case.samples(torch.device(device), dtype, requires_grad):
        if s.id == sid:
            return s
    raise AssertionError(f"{case.name}: no sample {sid!r}")


def _small(case, device, dtype, *, need_grad=True):
    """The first light sample (non-empty, at most SMALL input elements) for the heavy checks."""
    for s in case.samples(torch.device(device), dtype, False):
        n = sum(t.numel() for t in s.leaves)
        if 0 < n <= SMALL and not s.heavy and (s.grad or not need_grad):
            return s
    pytest.skip(f"{case.name} has no sample of at most {SMALL} elements")


# --------------------------------------------------------------------------- comparisons

def _call(case, sample, backend, leaves=None):
    args, kwargs = sample.build(leaves)
    torch.manual_seed(RNG_SEED)
    return case.normalize(case.call(*args, backend=backend, **kwargs))


def _reference(case, sample, leaves=None):
    args, kwargs = sample.build(leaves)
    torch.manual_seed(RNG_SEED)
    return case.normalize(case.reference(*args, **kwargs))


def _to64(leaves):
    return [t.detach().to(D64) for t in leaves]


def _truth(case, sample):
    """Float64 truth of the sample's (rounded) input and how to view an output for it."""
    args, kwargs = sample.build(_to64(sample.leaves))
    if case.oracle is not None:
        torch.manual_seed(RNG_SEED)
        want = case.oracle(*args, **kwargs)
        if want is not None:
            return tuple(torch.as_tensor(w, dtype=D64) for w in want), case.oracle_view
    torch.manual_seed(RNG_SEED)
    return tuple(t.double() for t in case.normalize(case.reference(*args, **kwargs))), (lambda outs: outs)


def _max_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.numel() == 0:
        return 0.0
    both_nan = a.isnan() & b.isnan()
    same_inf = torch.isinf(a) & (a == b)
    diff = (a - b).abs().masked_fill(both_nan | same_inf, 0)
    return float(diff.max())


def _scale(t):
    t = t.detach().double().cpu()
    finite = t[torch.isfinite(t)]
    return max(1.0, float(finite.abs().max())) if finite.numel() else 1.0


def _check_vs_truth(what, outs, refs, truths, dtype):
    """|kernel − truth| ≤ FACTOR·|reference − truth| + UNIT·scale (max over each output)."""
    assert len(outs) == len(truths), f"{what}: {len(outs)} outputs, truth has {len(truths)}"
    for i, (o, r, t) in enumerate(zip(outs, refs, truths)):
        assert o.shape == t.shape, f"{what}: output {i} has shape {tuple(o.shape)}, truth {tuple(t.shape)}"
        e_k, e_r = _max_err(o, t), _max_err(r, t)
        bound = FACTOR * e_r + UNIT[dtype] * _scale(t)
        assert e_k <= bound, (f"{what}: output {i} off the float64 truth by {e_k:.3g}; the reference in "
                              f"{dtype_name(dtype)} is off by {e_r:.3g} (bound {bound:.3g})")


def _check_fp64(what, outs, refs, rtol):
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape, f"{what}: output {i} shape {tuple(o.shape)} vs reference {tuple(r.shape)}"
        err = _max_err(o, r)
        assert err <= rtol * _scale(r), f"{what}: output {i} off the reference by {err:.3g}"


def _equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


# --------------------------------------------------------------------------- reference vs oracle

ORACLE_PARAMS = [pytest.param(c, sid, id=f"{c.name}-oracle-cpu-fp64-{sid}")
                 for c in CASES if c.oracle is not None for sid in _sample_ids(c, D64)]


@pytest.mark.parametrize("case, sid", ORACLE_PARAMS)
def test_reference_vs_oracle(case, sid):
    sample = _sample(case, "cpu", D64, sid)
    args, kwargs = sample.build()
    torch.manual_seed(RNG_SEED)
    want = case.oracle(*args, **kwargs)
    if want is None:
        pytest.skip(f"{case.name}: the oracle has no answer for {sid} (checked against the reference only)")
    got = case.oracle_view(_reference(case, sample))
    _check_fp64(f"{case.name} reference vs oracle", got, [torch.as_tensor(w, dtype=D64) for w in want],
                case.rtol64)


# --------------------------------------------------------------------------- values

@pytest.mark.parametrize("case, backend, device, dtype, sid", _params(per_sample=True))
def test_values(case, backend, device, dtype, sid):
    sample = _sample(case, device, dtype, sid)
    before = [t.detach().clone() for t in sample.leaves]
    outs = _call(case, sample, backend)
    for t, b in zip(sample.leaves, before):
        assert _equal(t.detach(), b), f"{case.name}: backend {backend!r} modified its input"
    refs = _reference(case, sample)
    what = f"{case.name} backend={backend!r} {device} {dtype_name(dtype)} {sid}"
    assert [o.dtype for o in outs] == [r.dtype for r in refs], what
    assert all(o.device.type == device for o in outs), what
    if backend == "reference":  # the named reference is the reference itself
        assert all(_equal(o, r) for o, r in zip(outs, refs)), f"{what}: differs from the reference function"
        return
    if dtype == D64:
        _check_fp64(what, outs, refs, case.rtol64)
        return
    truths, view = _truth(case, sample)
    _check_vs_truth(what, view(outs), view(refs), truths, dtype)


# --------------------------------------------------------------------------- gradients

def _cotangents(outs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=D64).to(device=o.device, dtype=o.dtype) for o in outs]


def _grad_outputs(case, outs):
    idx = range(len(outs)) if case.grad_outputs is None else case.grad_outputs
    return [outs[i] for i in idx]


def _grads(case, sample, fn, leaves):
    outs = _grad_outputs(case, fn(leaves))
    cots = _cotangents(outs)
    loss = sum((o.double() * c.double()).sum() for o, c in zip(outs, cots))
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(gs, leaves)]


def _fresh(leaves, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_(True) for t in leaves]


DIFF = lambda case: case.differentiable  # noqa: E731


@pytest.mark.parametrize("case, backend, device, dtype, sid", _params(per_sample=True, need_grad=True, only=DIFF))
def test_gradients(case, backend, device, dtype, sid):
    sample = _sample(case, device, dtype, sid, requires_grad=True)
    what = f"{case.name} backend={backend!r} {device} {dtype_name(dtype)} {sid} gradient"
    got = _grads(case, sample, lambda ls: _call(case, sample, backend, ls), _fresh(sample.leaves))
    ref = _grads(case, sample, lambda ls: _reference(case, sample, ls), _fresh(sample.leaves))
    for g, leaf in zip(got, sample.leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, what
    if backend == "reference":
        assert all(_equal(a, b) for a, b in zip(got, ref)), what
        return
    if dtype == D64:
        _check_fp64(what, got, ref, case.rtol64 * 10)
        return
    truth = _grads(case, sample, lambda ls: _reference(case, sample, ls), _fresh(sample.leaves, D64))
    _check_vs_truth(what, got, ref, truth, dtype)


# --------------------------------------------------------------------------- gradcheck (float64)

GRADCHECK = [p for p in _params(per_sample=False, only=DIFF) if p.values[3] in (None, D64)]


@pytest.mark.parametrize("case, backend, device, dtype, sid", GRADCHECK)
def test_gradcheck(case, backend, device, dtype, sid):
    sample = _small(case, device, D64)
    leaves = _fresh(sample.leaves)

    def fn(*ls):
        return tuple(_grad_outputs(case, _call(case, sample, backend, ls)))
    # interpreted Triton runs each kernel call in Python: the full Jacobian (one backward per output
    # element, 4000 of them for a small conv matrix) took minutes, so it is checked along random
    # directions (gradcheck's fast mode: analytical uᵀJv against the numerical one)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=_interpreted(backend, device))


# --------------------------------------------------------------------------- opcheck of the raw ops reached

class _RecordFunctions(TorchFunctionMode):
    """torch.ops.regkernels calls made from Python, with their arguments as passed (grad flags kept)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = getattr(func, "_qualified_op_name", None) or getattr(func, "_name", None)
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and str(op).startswith("regkernels"):
            self.calls.setdefault(_qualname(func), (func, _snapshot(args, True), _snapshot(kwargs, True)))
        return func(*args, **kwargs)


class _RecordDispatch(TorchDispatchMode):
    """Every torch.ops.regkernels op the dispatcher runs (backward ops included)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "regkernels":
            # below autograd: a backward op's saved inputs may require grad, but the op is not
            # differentiated (opcheck would differentiate it and hit the double-backward refusal)
            self.calls.setdefault(_qualname(func), (func, _snapshot(args, False), _snapshot(kwargs, False)))
        return func(*args, **kwargs)


def _qualname(func) -> str:
    name = func._schema.name if hasattr(func, "_schema") else func._qualified_op_name
    return name.replace(".", "::", 1) if "::" not in name else name


def _snapshot(tree, keep_grad):
    def one(t):
        if isinstance(t, torch.Tensor):
            c = t.detach().clone()
            return c.requires_grad_(keep_grad and t.requires_grad) if c.is_floating_point() else c
        return t
    return tree_map(one, tree)


def reached_ops(case, sample, backend):
    """{qualified name: (op, args, kwargs)} of the regkernels ops one call (and its backward) runs."""
    functions, dispatch = _RecordFunctions(), _RecordDispatch()
    with functions, dispatch:
        outs = _call(case, sample, backend)
        if case.differentiable and any(t.requires_grad for t in sample.leaves):
            outs = [o for o in _grad_outputs(case, outs) if o.requires_grad]
            if outs:
                torch.autograd.backward([o.sum() for o in outs])
    calls = dict(dispatch.calls)
    calls.update(functions.calls)  # the Python-level arguments keep requires_grad
    return calls


@pytest.mark.parametrize("case, backend, device, dtype, sid", _params(per_sample=False, one_dtype=True))
def test_opcheck(case, backend, device, dtype, sid):
    sample = _small(case, device, dtype, need_grad=False)
    if case.differentiable:
        sample = _small(case, device, dtype, need_grad=True)
        sample = _sample(case, device, dtype, sample.id, requires_grad=True)
    calls = reached_ops(case, sample, backend)
    if not calls:
        pytest.skip(f"backend {backend!r} of {case.name} reaches no torch.ops.regkernels op")
    for name, (op, args, kwargs) in sorted(calls.items()):
        if name in case.opcheck_skip:
            continue
        packet = getattr(torch.ops.regkernels, name.split("::")[1].split(".")[0])
        torch.library.opcheck(packet, args, kwargs)


# --------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("case, backend, device, dtype, sid", _params(per_sample=False, one_dtype=True))
def test_compile_fullgraph(case, backend, device, dtype, sid):
    if case.compile is not None:
        pytest.skip(case.compile)
    sample = next((s for s in case.samples(torch.device(device), dtype, False)
                   if s.compile and 0 < sum(t.numel() for t in s.leaves) <= SMALL), None)
    if sample is None:
        pytest.skip(f"{case.name} has no traceable sample (a torch.Generator argument is not traceable)")
    args_leaves = [t.detach() for t in sample.leaves]

    def fn(*ls):
        args, kwargs = sample.build(ls)
        return case.normalize(case.call(*args, backend=backend, **kwargs))

    torch._dynamo.reset()
    diff = case.differentiable
    with warnings.catch_warnings(), torch._inductor.config.patch(fallback_random=True):
        warnings.simplefilter("ignore")
        leaves_c = _fresh(args_leaves) if diff else args_leaves
        torch.manual_seed(1)
        compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)(*leaves_c)
    leaves_e = _fresh(args_leaves) if diff else args_leaves
    torch.manual_seed(1)
    eager = fn(*leaves_e)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype != D64 else dict(atol=1e-10, rtol=1e-10)
    if dtype in LOW:
        tol = dict(atol=UNIT[dtype] * 4, rtol=UNIT[dtype] * 4)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, **tol, equal_nan=True)
    if diff:
        gc = _grads(case, sample, lambda ls: _grad_outputs(case, compiled), leaves_c)
        ge = _grads(case, sample, lambda ls: _grad_outputs(case, eager), leaves_e)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, **tol, equal_nan=True)


# --------------------------------------------------------------------------- torch.func on backend=None

FUNC_PARAMS = [pytest.param(c, d, id=f"{c.name}-default-{d}-{'fp64' if d == 'cpu' else 'fp32'}",
                            marks=[] if d == "cpu" or HAS_CUDA else
                            [pytest.mark.skip(reason="needs a CUDA device; none on this machine")])
               for c in CASES if c.differentiable for d in DEVICES]


@pytest.mark.parametrize("case, device", FUNC_PARAMS)
def test_torch_func(case, device):
    if case.func is not None:
        pytest.skip(case.func)
    dtype = D64 if device == "cpu" else torch.float32
    sample = _small(case, device, dtype)
    leaves = [t.detach() for t in sample.leaves]
    outs0 = _grad_outputs(case, _call(case, sample, None))
    cots = _cotangents(outs0)

    def loss(*ls):
        outs = _grad_outputs(case, _call(case, sample, None, ls))
        return sum((o * c).sum() for o, c in zip(outs, cots))

    want = _grads(case, sample, lambda ls: _call(case, sample, None, ls), _fresh(leaves))
    argnums = tuple(range(len(leaves)))
    got = torch.func.grad(loss, argnums=argnums)(*leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)

    outs, vjp_fn = torch.func.vjp(lambda *ls: tuple(_grad_outputs(case, _call(case, sample, None, ls))), *leaves)
    for o, o0 in zip(outs, outs0):
        torch.testing.assert_close(o, o0.detach(), atol=1e-6, rtol=1e-6, equal_nan=True)
    for a, b in zip(vjp_fn(tuple(cots)), want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)

    # vmap over two inputs stacked along a new leading dim equals one call per input
    second = [t * 0.75 + 0.01 for t in leaves]
    stacked = [torch.stack([a, b]) for a, b in zip(leaves, second)]
    batched = torch.func.vmap(lambda *ls: tuple(_call(case, sample, None, ls)), randomness="same")(*stacked)
    for i, ls in enumerate((leaves, second)):
        for b, o in zip(batched, _call(case, sample, None, ls)):
            torch.testing.assert_close(b[i], o.detach(), atol=1e-6, rtol=1e-6, equal_nan=True)


# --------------------------------------------------------------------------- bad input

BAD_PARAMS = [pytest.param(c, b, id=f"{c.name}-bad-{b.id}") for c in CASES for b in c.bad]


@pytest.mark.parametrize("case, bad", BAD_PARAMS)
def test_bad_input(case, bad):
    with pytest.raises(bad.exc, match=bad.match):
        case.call(*bad.args, **bad.kwargs)


def _refusals():
    """A named backend the TABLE cannot run on CPU tensors of the dtype: a ValueError listing what can."""
    out = []
    for case in CASES:
        table = table_of(case.family)
        op = table_op(case, table) if table is not None else None
        if op is None:
            continue
        for dtype in (torch.float32, D64):
            can = table.backends(op, "cpu", dtype)
            for backend in BACKENDS:
                if backend not in can:
                    out.append(pytest.param(case, op, backend, dtype, can,
                                            id=f"{case.name}-{backend}-cpu-{dtype_name(dtype)}-refused"))
    return out


@pytest.mark.parametrize("case, op, backend, dtype, can", _refusals())
def test_named_backend_refused(case, op, backend, dtype, can):
    sample = next(s for s in case.samples(torch.device("cpu"), dtype, False)
                  if sum(t.numel() for t in s.leaves) and not s.id.endswith("-empty"))
    args, kwargs = sample.build()
    listing = ", ".join(map(repr, can)) or "none"
    names = "|".join(map(re.escape, dict.fromkeys((case.name, op, getattr(case.call, "__name__", case.name)))))
    # (an op dispatching on an argument names it: "conv_to_matrix(layout='coo'): ...")
    with pytest.raises(ValueError, match=rf"^({names})(\(.*\))?: .*backends that take cpu {dtype_name(dtype)} inputs here: "
                                         rf"{re.escape(listing)}$"):
        case.call(*args, backend=backend, **kwargs)
