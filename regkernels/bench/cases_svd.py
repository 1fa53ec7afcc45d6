"""Benchmark cases of the batched-SVD family (docs/svd.md) and the Jacobian penalty (docs/jacobian.md#jacobian_penalty).

Providers: ``eager`` = the pure-torch reference, ``compile`` = ``compiled(reference)``,
``regkernels`` = the public op with its default backend. ``svb_`` and ``jacobian_penalty``
are not natural torch.compile targets (in-place updates of a weight list; autograd.grad
inside the function); their ``compile`` provider is still offered and whatever
torch.compile does with them (graph breaks, or an exception the runner records as that
provider's error) is the measurement.
"""
from __future__ import annotations

import torch
from torch import nn

from regkernels.bench._case import SPLIT, Case, Prepared, compiled, max_rel_err, penalty_case, split_prepared
from regkernels.ops import jacobian as ops_jacobian
from regkernels.ops import svd as ops_svd
from regkernels.reference import jacobian as ref_jacobian
from regkernels.reference import svd as ref_svd

# this family's cases, in the order the runner lists them (appended below as they are built)
CASES: list[Case] = []


def register(case: Case) -> Case:
    CASES.append(case)
    return case


SVB_EPS = 0.05  # RegDNNs' default band [1/1.05, 1.05]
CLAMP_LO, CLAMP_HI = 0.5, 1.5


def _gaussian(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded N(0, 1/n) entries (σ of an m×n block spread around 1, Marchenko–Pastur)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) / shape[-1] ** 0.5).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------ batched_svd

def _svd_error(X64: torch.Tensor, S64: torch.Tensor):
    """max of the reconstruction error ‖X − U S Vh‖_F / ‖X‖_F and |S − S_float64| / S_max."""
    def error(out) -> float:
        U, S, Vh = (t.detach().to(torch.float64).cpu() for t in out)
        recon = torch.linalg.matrix_norm(X64 - U @ torch.diag_embed(S) @ Vh) / torch.linalg.matrix_norm(X64)
        sval = (S - S64).abs().amax(-1) / S64[..., 0]
        return float(torch.maximum(recon, sval).max())
    return error


def _svd_case(batch: int, m: int, n: int, quick: bool = False) -> Case:
    def setup(device: torch.device) -> Prepared:
        X = _gaussian((batch, m, n), device, torch.float32, seed=m * 1000 + batch)
        X64 = X.to(torch.float64).cpu()
        comp = compiled(ref_svd.batched_svd)
        k = min(m, n)
        return Prepared(
            providers={"eager": lambda: ref_svd.batched_svd(X), "compile": lambda: comp(X),
                       "regkernels": lambda: ops_svd.batched_svd(X)},
            error=_svd_error(X64, torch.linalg.svdvals(X64)),
            bytes_moved=4 * batch * (m * n + m * k + k + k * n),
            note="forward only",
        )

    return register(Case(op="batched_svd", name=f"{batch}x{m}x{n}", setup=setup, quick=quick,
                         params={"batch": batch, "m": m, "n": n}, passes=("fwd",)))


_svd_case(4096, 8, 8, quick=True)
_svd_case(4096, 16, 16)
_svd_case(2048, 32, 32)
_svd_case(1024, 64, 64)


# ------------------------------------------------------------------------------ clamp_singular_values

for _shape, _quick in (((1024, 8, 8), True), ((2048, 32, 32), False)):
    register(penalty_case(
        "clamp_singular_values", "x".join(map(str, _shape)), ref_svd.clamp_singular_values,
        ops_svd.clamp_singular_values,
        lambda device, dtype, shape=_shape: (_gaussian(shape, device, dtype, seed=7),),
        grad=True, kwargs={"lo": CLAMP_LO, "hi": CLAMP_HI}, quick=_quick,
        params=dict(zip(("batch", "m", "n"), _shape)),
    ))


# ------------------------------------------------------------------------------ svb_

def _svb_case(count: int, out_ch: int, in_ch: int, k: int, quick: bool = False) -> Case:
    """``count`` conv weights (out, in, k, k) → matrices out × in·k² through one batched SVD.

    svb_ works in place: every provider call first restores its own copy of the original
    weights (one copy of ``count·out·in·k²`` floats, small next to the SVDs) so each call
    projects the same matrices; the output is the projected weight list.
    """
    shape = (out_ch, in_ch, k, k)

    def setup(device: torch.device) -> Prepared:
        originals = [_gaussian((out_ch, in_ch * k * k), device, torch.float32, seed=100 + i).reshape(shape)
                     for i in range(count)]

        def runner(fn):
            weights = [w.clone() for w in originals]

            def call():
                for w, w0 in zip(weights, originals):
                    w.copy_(w0)
                fn(weights, SVB_EPS)
                return weights
            return call

        truth = [w.to(torch.float64).cpu() for w in originals]
        ref_svd.svb_(truth, SVB_EPS)
        return Prepared(
            providers={"eager": runner(ref_svd.svb_), "compile": runner(compiled(ref_svd.svb_)),
                       "regkernels": runner(ops_svd.svb_)},
            error=lambda out: max_rel_err(list(out), truth),
            bytes_moved=3 * 4 * count * out_ch * in_ch * k * k,
            note="in place; each call restores the weights first",
        )

    name = f"{count}x{out_ch}x{in_ch * k * k}"
    # in place, no backward
    return register(Case(op="svb_", name=name, setup=setup, quick=quick, passes=("fwd",),
                         params={"count": count, "m": out_ch, "n": in_ch * k * k}))


_svb_case(4, 16, 16, 3, quick=True)
_svb_case(8, 64, 64, 3)
_svb_case(512, 64, 64, 3)  # 512 matrices 64 × 576: QR-reduced to 64 × 64 for the kernel


# ------------------------------------------------------------------------------ jacobian_penalty

def _mlp(sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(device=device, dtype=dtype)


def _jacobian_case(sizes: tuple[int, ...], batch: int, quick: bool) -> Case:
    """Forward + backward of ``jacobian_penalty(model(x), x)`` (one projection, the training
    default) w.r.t. the model's parameters; returns ``(penalty, grad of the first weight)``.
    Split (``split_prepared``): the forward is the model's forward and the penalty (its
    vector-Jacobian product, recorded for double backward), the backward the penalty's gradient
    w.r.t. the parameters (a double backward through the model); the model's gradients are
    cleared in each forward.

    The error check replays the float32 projection vectors of the seeded generator in float64
    (float32 and float64 Gaussian draws of one seed differ), so it measures rounding only.
    """
    seed = 1234

    def setup(device: torch.device) -> Prepared:
        model = _mlp(sizes, device, torch.float32)
        x0 = _gaussian((batch, sizes[0]), device, torch.float32, seed=3) * sizes[0] ** 0.5

        def forward(fn):
            def run():
                model.zero_grad(set_to_none=True)  # the parameters are shared by every call
                x = x0.clone().requires_grad_(True)
                gen = torch.Generator(device).manual_seed(seed)
                return fn(model(x), x, generator=gen)
            return run

        def backward(penalty):
            penalty.backward()
            return penalty.detach(), model[0].weight.grad

        model64 = _mlp(sizes, torch.device("cpu"), torch.float64)
        model64.load_state_dict({k: v.double().cpu() for k, v in model.state_dict().items()})
        x64 = x0.double().cpu().requires_grad_(True)
        v = ref_jacobian.projection_vectors(batch, sizes[-1], dtype=torch.float32, device=device,
                                            generator=torch.Generator(device).manual_seed(seed))
        (g,) = torch.autograd.grad(model64(x64), x64, grad_outputs=v.double().cpu(), create_graph=True)
        penalty64 = g.pow(2).sum() * (sizes[-1] / batch)
        penalty64.backward()
        truth = (penalty64.detach(), model64[0].weight.grad)
        return split_prepared(
            {"eager": forward(ref_jacobian.jacobian_penalty),
             "compile": forward(compiled(ref_jacobian.jacobian_penalty)),
             "regkernels": forward(ops_jacobian.jacobian_penalty)},
            backward,
            error_fwd=lambda penalty: max_rel_err(penalty, truth[0]),
            error_bwd=lambda out: max_rel_err(out, truth),
            note="n_proj=1, forward + backward to the parameters",
        )

    name = "mlp-" + "x".join(map(str, sizes)) + f"-b{batch}"
    return register(Case(op="jacobian_penalty", name=name, setup=setup, quick=quick, passes=SPLIT,
                         params={"sizes": list(sizes), "batch": batch, "n_proj": 1}))


_jacobian_case((784, 256, 10), 128, quick=True)
