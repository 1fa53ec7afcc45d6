"""Tests of adversarial kernel regularization (docs/nn.md#adversarialkernelregularizer; seed: adversarial regularization for
convolution filters): the Gabor bank, kernel harvesting, and the GAN regularizer."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from regkernels.nn import adversarial as A


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Total variation of each kernel of (n, k, k): Σ |∂x| + Σ |∂y| (forward differences)."""
    return (x[:, :, 1:] - x[:, :, :-1]).abs().sum((1, 2)) + (x[:, 1:, :] - x[:, :-1, :]).abs().sum((1, 2))


def _unit_noise(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, k, generator=g)
    return w / w.flatten(1).norm(dim=1)[:, None, None]


def _model() -> nn.Sequential:
    """Two 3×3 convs (one grouped), a 5×5 one and a 3×5 one (matches neither k)."""
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 2, 5),
                         nn.Sequential(nn.Conv2d(2, 2, (3, 5))))


# ---------------------------------------------------------------------------------- gabor_bank

@pytest.mark.parametrize("n,k", [(1, 2), (7, 3), (40, 5), (9, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gabor_bank_shape_dtype_zero_mean_unit_norm(n, k, dtype):
    bank = A.gabor_bank(n, k, seed=3, dtype=dtype)
    assert bank.shape == (n, k, k) and bank.dtype == dtype and bank.device.type == "cpu"
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(bank.mean(dim=(1, 2)), torch.zeros(n, dtype=dtype), atol=tol, rtol=0)
    torch.testing.assert_close(bank.flatten(1).norm(dim=1), torch.ones(n, dtype=dtype), atol=tol, rtol=0)


def test_gabor_bank_is_deterministic_per_seed_and_smoother_than_noise():
    a, b = A.gabor_bank(64, 5, seed=11), A.gabor_bank(64, 5, seed=11)
    assert torch.equal(a, b)
    assert not torch.allclose(a, A.gabor_bank(64, 5, seed=12))
    # drawn in float64 whatever the dtype: float32 is the float64 bank rounded
    assert torch.equal(a, A.gabor_bank(64, 5, seed=11, dtype=torch.float64).float())
    # every filter differs from every other (random orientation / wavelength / phase)
    d = torch.cdist(a.flatten(1), a.flatten(1)) + torch.eye(64) * 10
    assert d.min() > 1e-3
    # the "good kernel" property the regularizer test relies on: smoother than unit-norm noise
    noise = _unit_noise(4096, 5, torch.Generator().manual_seed(0))
    assert _tv(a).mean() < 0.85 * _tv(noise).mean()


@pytest.mark.parametrize("kw,exc,match", [
    (dict(n=0, k=3), ValueError, "gabor_bank: n must be >= 1; got n=0"),
    (dict(n=2.0, k=3), TypeError, "gabor_bank: n must be an integer"),
    (dict(n=2, k=1), ValueError, r"gabor_bank: k must be >= 2 \(a zero-mean 1x1 kernel is 0"),
    (dict(n=2, k=0), ValueError, "gabor_bank: k must be >= 2"),
    (dict(n=2, k="3"), TypeError, "gabor_bank: k must be an integer"),
    (dict(n=2, k=3, seed=None), TypeError, "gabor_bank: seed must be an integer"),
    (dict(n=2, k=3, dtype=torch.int64), TypeError, "gabor_bank: dtype must be a floating torch.dtype"),
])
def test_gabor_bank_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        A.gabor_bank(**kw)


# ----------------------------------------------------------------------------- harvest_kernels

def test_harvest_kernels_counts_values_and_copies():
    m = _model()
    k3 = A.harvest_kernels(m, 3)
    # 4·2 kernels of the first conv, 6·(4/2) of the grouped one; the (3, 5) conv is left out
    assert k3.shape == (4 * 2 + 6 * 2, 3, 3)
    assert torch.equal(k3[:8], m[0].weight.detach().reshape(8, 3, 3))
    assert torch.equal(k3[8:], m[2].weight.detach().reshape(12, 3, 3))
    k5 = A.harvest_kernels(m, 5)
    assert k5.shape == (12, 5, 5) and torch.equal(k5, m[3].weight.detach().reshape(12, 5, 5))
    assert not k3.requires_grad
    with torch.no_grad():
        m[3].weight.add_(1.0)
    assert not torch.equal(k5, A.harvest_kernels(m, 5))  # the bank is a copy, not a view


def test_harvest_kernels_bad_input():
    with pytest.raises(ValueError, match=r"harvest_kernels: model has no nn.Conv2d with kernel_size \(7, 7\)"):
        A.harvest_kernels(_model(), 7)
    with pytest.raises(TypeError, match="harvest_kernels: model must be an nn.Module; got Tensor"):
        A.harvest_kernels(torch.zeros(2, 3, 3), 3)
    with pytest.raises(ValueError, match="harvest_kernels: k must be >= 1; got k=0"):
        A.harvest_kernels(_model(), 0)


# ---------------------------------------------------------------- AdversarialKernelRegularizer

def _d_logits(reg: A.AdversarialKernelRegularizer, x: torch.Tensor) -> torch.Tensor:
    """D written out in float64 from its parameters: Linear → LeakyReLU(0.2) → Linear →
    LeakyReLU(0.2) → Linear, independent of the module's own forward."""
    lin = [m for m in reg.discriminator if isinstance(m, nn.Linear)]
    h = x.detach().double().flatten(1)
    for i, layer in enumerate(lin):
        h = h @ layer.weight.detach().double().T + layer.bias.detach().double()
        if i < len(lin) - 1:
            h = torch.where(h > 0, h, 0.2 * h)
    return h.squeeze(1)


@pytest.mark.parametrize("how", ["module", "conv", "list"])
def test_fake_is_a_batch_of_the_weights_kernels(how):
    m = _model()
    bank = A.gabor_bank(10, 3)
    convs = {"module": m, "conv": m[2], "list": [m[0].weight, m[2].weight]}[how]
    pool = A.harvest_kernels(m[2] if how == "conv" else m, 3)
    reg = A.AdversarialKernelRegularizer(convs, bank, batch=7, generator=torch.Generator().manual_seed(0))
    f = reg.fake()
    assert f.shape == (7, 3, 3) and f.requires_grad
    # each row is one of the pool's kernels, drawn without replacement
    match = (f.detach().flatten(1)[:, None] == pool.flatten(1)[None]).all(-1)
    assert (match.sum(1) == 1).all() and match.any(0).sum() == 7
    # the batch is capped at the number of kernels
    reg_all = A.AdversarialKernelRegularizer(convs, bank, batch=1000)
    assert reg_all.fake().shape == pool.shape
    # the model's parameters stay outside the regularizer; its own state is D's (and its extra
    # state: D's optimizer, the generator, the configuration)
    assert all(name.startswith("discriminator.") for name in reg.state_dict() if name != "_extra_state")
    assert "_extra_state" in reg.state_dict()
    assert {id(p) for p in reg.parameters()} == {id(p) for p in reg.discriminator.parameters()}


def test_generator_loss_value_and_gradient_reach_weights_not_d():
    g = torch.Generator().manual_seed(5)
    w = nn.Parameter(torch.randn(6, 2, 3, 3, generator=g) * 0.3)
    bank = A.gabor_bank(32, 3)
    reg = A.AdversarialKernelRegularizer([w], bank, lam=0.7, hidden=16, batch=100, generator=g)
    loss = reg.generator_loss()
    # batch ≥ 12 kernels: the mean is over all of them, in whatever order
    want = 0.7 * (-torch.log(torch.sigmoid(_d_logits(reg, w.reshape(-1, 3, 3))))).mean()
    torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-6)
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and (w.grad != 0).all()
    assert all(p.grad is None for p in reg.discriminator.parameters())
    torch.testing.assert_close(reg().double(), want, atol=1e-6, rtol=1e-6)  # forward = generator_loss


def test_generator_loss_only_touches_sampled_kernels_and_mixed_dtypes():
    w = nn.Parameter(torch.randn(10, 1, 3, 3))
    reg = A.AdversarialKernelRegularizer([w], A.gabor_bank(8, 3, dtype=torch.float64), batch=4)
    reg.generator_loss().backward()
    # float32 weights against a float64 bank: cast for D, gradient back in the weight's dtype
    assert w.grad.dtype == torch.float32
    assert int((w.grad.flatten(1).abs().sum(1) > 0).sum()) == 4


def test_discriminator_step_trains_d_only_and_reports_the_batch_before_the_step():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 4, 3)
    bank = A.gabor_bank(20, 3)
    reg = A.AdversarialKernelRegularizer(conv, bank, lam=2.0, hidden=8, batch=64, generator=g)
    d_before = [p.detach().clone() for p in reg.discriminator.parameters()]
    w_before = conv.weight.detach().clone()
    # batch ≥ both pools: the step sees the whole bank and all 12 kernels
    lr, lf = _d_logits(reg, bank), _d_logits(reg, w_before.reshape(-1, 3, 3))
    out = reg.discriminator_step()
    assert set(out) == {"d_real", "d_fake", "loss"}
    assert out["d_real"] == pytest.approx(float(torch.sigmoid(lr).mean()), abs=1e-6)
    assert out["d_fake"] == pytest.approx(float(torch.sigmoid(lf).mean()), abs=1e-6)
    want = 2.0 * (-torch.log(torch.sigmoid(lr)).mean() - torch.log(1 - torch.sigmoid(lf)).mean())
    assert out["loss"] == pytest.approx(float(want), rel=1e-5)
    assert all(not torch.equal(a, b) for a, b in zip(d_before, reg.discriminator.parameters()))
    assert torch.equal(conv.weight, w_before) and conv.weight.grad is None
    # stray gradients on D never enter its step; lam = 0 leaves D where it is
    reg0 = A.AdversarialKernelRegularizer(conv, bank, lam=0.0, hidden=8)
    reg0.generator_loss()  # nothing reaches D
    for p in reg0.discriminator.parameters():
        p.grad = torch.full_like(p, 1e3)
    before = [p.detach().clone() for p in reg0.discriminator.parameters()]
    reg0.discriminator_step()
    assert all(torch.equal(a, b) for a, b in zip(before, reg0.discriminator.parameters()))


def test_normalize_makes_d_blind_to_kernel_scale():
    w = torch.randn(16, 5, 5)
    bank = A.gabor_bank(16, 5)
    losses = []
    for scale in (1.0, 7.0):
        reg = A.AdversarialKernelRegularizer([w * scale], bank, batch=16, normalize=True,
                                             generator=torch.Generator().manual_seed(2))
        losses.append(reg.generator_loss())
    torch.testing.assert_close(losses[0], losses[1])
    raw = [A.AdversarialKernelRegularizer([w * s], bank, generator=torch.Generator().manual_seed(2)).generator_loss()
           for s in (1.0, 7.0)]
    assert not torch.allclose(raw[0], raw[1])


def _train(seed: int, steps: int, d_only: bool = False):
    """Free kernels (64 unit-norm 5×5 noise kernels) trained by the generator loss alone
    against a Gabor bank, alternating with discriminator steps (the seed's Algorithm 1)."""
    g = torch.Generator().manual_seed(seed)
    bank = A.gabor_bank(512, 5, seed=1)
    w0 = _unit_noise(64, 5, g)
    w = nn.Parameter(w0.clone())
    reg = A.AdversarialKernelRegularizer([w], bank, lam=1.0, hidden=64, batch=64, lr=1e-3, generator=g)
    opt = torch.optim.Adam([w], lr=1e-3)
    hist = []
    for _ in range(steps):
        hist.append(reg.discriminator_step())
        if not d_only:
            opt.zero_grad(set_to_none=True)
            reg.generator_loss().backward()
            opt.step()
    return bank, w0, w.detach(), hist


def test_generator_loss_pulls_noise_toward_the_gabor_bank():
    """docs/nn.md#adversarialkernelregularizer / the seed's Figure 5: D(real) and D(fake) → 0.5, and the kernels' roughness
    (total variation) moves toward the bank's. Margins were measured over 10 seeds (distance
    shrank 6–80×, final |D − 0.5| ≤ 0.11); the control shows D can separate the two sets
    easily when the kernels do not move, so ending near 0.5 is the generator's doing."""
    bank, w0, w, hist = _train(seed=0, steps=600)
    tv_bank, tv0, tv1 = _tv(bank).mean(), _tv(w0).mean(), _tv(w).mean()
    assert tv0 > tv_bank + 1.5  # noise starts clearly rougher than the bank
    assert abs(tv1 - tv_bank) < abs(tv0 - tv_bank) / 3
    last = hist[-100:]
    d_real = sum(h["d_real"] for h in last) / len(last)
    d_fake = sum(h["d_fake"] for h in last) / len(last)
    assert abs(d_real - 0.5) < 0.15 and abs(d_fake - 0.5) < 0.15
    # the kernels kept their scale: the change is in shape, not a shrink toward 0
    assert 0.8 < float(w.flatten(1).norm(dim=1).mean()) < 1.25
    # control: the same D trained against kernels that stay put tells them apart
    *_, ctrl = _train(seed=0, steps=200, d_only=True)
    assert ctrl[-1]["d_real"] - ctrl[-1]["d_fake"] > 0.6


def test_training_is_deterministic_for_fixed_seeds():
    _, _, w_a, h_a = _train(seed=3, steps=30)
    _, _, w_b, h_b = _train(seed=3, steps=30)
    assert h_a == h_b and torch.equal(w_a, w_b)
    _, _, w_c, h_c = _train(seed=4, steps=30)
    assert h_a != h_c and not torch.equal(w_a, w_c)


_CLS = "AdversarialKernelRegularizer"


@pytest.mark.parametrize("make,exc,match", [
    (lambda m, b: A.AdversarialKernelRegularizer(m, b, lam=-0.1), ValueError, f"{_CLS}: lam must be >= 0; got lam=-0.1"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b, batch=0), ValueError, f"{_CLS}: batch must be >= 1; got batch=0"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b, batch=2.0), TypeError, f"{_CLS}: batch must be an integer"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b, hidden=0), ValueError, f"{_CLS}: hidden must be >= 1"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b, lr=0.0), ValueError, f"{_CLS}: lr must be > 0; got 0.0"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b, generator=1), TypeError,
     f"{_CLS}: generator must be a torch.Generator or None; got int"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b, normalize=1), TypeError, f"{_CLS}: normalize must be a bool"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b[0]), ValueError,
     rf"{_CLS}: real must have 3 dims \(N, k, k\); got shape \(3, 3\)"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b[:, :, :2]), ValueError,
     rf"{_CLS}: real must be a bank of square kernels \(N, k, k\); got shape \(4, 3, 2\)"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b[:0]), ValueError, f"{_CLS}: real must hold at least one kernel"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b.long()), TypeError, f"{_CLS}: real must have a floating dtype"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b.numpy()), TypeError, f"{_CLS}: real must be a torch.Tensor"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, A.gabor_bank(4, 7)), ValueError,
     rf"{_CLS}: convs has no nn.Conv2d with kernel_size \(7, 7\) \(the bank's kernel size\)"),
    (lambda m, b: A.AdversarialKernelRegularizer(m[3], b), ValueError,
     rf"{_CLS}: convs is an nn.Conv2d with kernel_size \(5, 5\), but the bank real holds \(3, 3\) kernels"),
    (lambda m, b: A.AdversarialKernelRegularizer([m[0].weight, m[3].weight], b), ValueError,
     rf"{_CLS}: convs\[1\] must have shape \(..., 3, 3\) to match the bank real; got \(2, 6, 5, 5\)"),
    (lambda m, b: A.AdversarialKernelRegularizer([torch.zeros(3, 3, dtype=torch.long)], b), TypeError,
     rf"{_CLS}: convs\[0\] must have a floating dtype"),
    (lambda m, b: A.AdversarialKernelRegularizer([], b), ValueError, f"{_CLS}: convs must hold at least one weight"),
    (lambda m, b: A.AdversarialKernelRegularizer("conv", b), TypeError,
     f"{_CLS}: convs must be an nn.Module, an nn.Conv2d or a list of weight tensors"),
    (lambda m, b: A.AdversarialKernelRegularizer(m, b.to("meta")), ValueError,
     f"{_CLS}: conv weights and the bank real must be on one device; got weight 0 on cpu, real on meta"),
])
def test_regularizer_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make(_model(), A.gabor_bank(4, 3))


def _two_conv_regularizer():
    a, b = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3)
    reg = A.AdversarialKernelRegularizer(nn.Sequential(a, b), A.gabor_bank(64, 3),
                                         generator=torch.Generator().manual_seed(0))
    return reg, b


def test_discriminator_step_on_a_nan_layer_leaves_the_discriminator_finite():
    reg, b = _two_conv_regularizer()
    before = {k: v.clone() for k, v in reg.discriminator.state_dict().items()}
    with torch.no_grad():
        b.weight[0, 0, 0, 0] = float("nan")
    out = reg.discriminator_step()
    assert math.isnan(out["loss"]) and math.isnan(out["d_fake"])
    for k, v in reg.discriminator.state_dict().items():  # not stepped on: unchanged
        assert torch.equal(v, before[k]), k
    with torch.no_grad():  # the layer repaired: D trains on as before
        b.weight[0, 0, 0, 0] = 0.1
    out = reg.discriminator_step()
    assert all(math.isfinite(v) for v in out.values())
    assert all(torch.isfinite(p).all() for p in reg.discriminator.parameters())


def test_discriminator_step_trains_under_no_grad_and_refuses_inference_mode():
    reg, _ = _two_conv_regularizer()
    before = [p.clone() for p in reg.discriminator.parameters()]
    with torch.no_grad():
        out = reg.discriminator_step()
    assert math.isfinite(out["loss"])
    assert any(not torch.equal(p, q) for p, q in zip(reg.discriminator.parameters(), before))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="discriminator_step: cannot train the "
                                                                   "discriminator under torch.inference_mode"):
        reg.discriminator_step()


# ------------------------------------------------------------------------- state_dict / resume
def _resumable_run(steps, state=None):
    """docs/nn.md#resuming-svbprojector-and-adversarialkernelregularizer's post-hook example: a
    model, its optimizer, an SVBProjector and the regularizer stepped by a step post-hook; the
    data comes from the step index. ``state`` (a torch.save'd checkpoint) is loaded first."""
    from regkernels.nn import SVBProjector

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    bank = A.gabor_bank(64, 3, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    proj = SVBProjector(model, eps=0.5, every=2)
    reg = A.AdversarialKernelRegularizer(model, bank, lam=0.5, hidden=8, batch=16,
                                         generator=torch.Generator().manual_seed(0))

    def after_step(optimizer, args, kwargs):
        proj.step()
        reg.discriminator_step()

    opt.register_step_post_hook(after_step)
    start = 0
    if state is not None:
        ckpt = torch.load(state)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        proj.load_state_dict(ckpt["svb"])
        reg.load_state_dict(ckpt["adv"])
        start = proj.steps
    for i in range(start, start + steps):
        x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(i))
        loss = model(x).square().mean() + reg.generator_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt, proj, reg


def test_state_dict_resume_continues_identically():
    """5 steps, save, fresh objects, load, 4 more == 9 uninterrupted steps: model, D, D's Adam
    state and the generator (every=2: the resumed projector keeps the odd step count)."""
    import io

    whole = _resumable_run(9)
    first = _resumable_run(5)
    buf = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "svb": first[2].state_dict(),
                "adv": first[3].state_dict()}, buf)
    buf.seek(0)
    resumed = _resumable_run(4, buf)
    for a, b in zip((whole[0], whole[3]), (resumed[0], resumed[3])):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            if key.endswith("_extra_state"):
                continue
            assert torch.equal(sa[key], sb[key]), key
    ea, eb = whole[3].get_extra_state(), resumed[3].get_extra_state()
    assert torch.equal(ea["generator"], eb["generator"])
    for s, t in zip(ea["optimizer"]["state"].values(), eb["optimizer"]["state"].values()):
        assert all(torch.equal(s[k], t[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert whole[2].steps == resumed[2].steps == 9


def test_load_state_dict_refuses_another_configuration():
    bank = A.gabor_bank(20, 3, seed=0)
    conv = nn.Conv2d(2, 3, 3)
    saved = A.AdversarialKernelRegularizer(conv, bank, lam=0.5, hidden=8, generator=torch.Generator()).state_dict()
    other = A.AdversarialKernelRegularizer(conv, bank, lam=1.0, hidden=8, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"AdversarialKernelRegularizer.load_state_dict: the state was saved by a "
                                         r"regularizer configured otherwise: lam=0.5 \(here 1.0\)"):
        other.load_state_dict(saved)
    no_gen = A.AdversarialKernelRegularizer(conv, bank, lam=0.5, hidden=8)
    with pytest.raises(ValueError, match=r"generator=True \(here False\)"):
        no_gen.load_state_dict(saved)
    saved["_extra_state"] = {"optimizer": {}}
    with pytest.raises(ValueError, match=r"_extra_state must be the dict AdversarialKernelRegularizer.state_dict\(\) "
                                         r"saves"):
        other.load_state_dict(saved)
