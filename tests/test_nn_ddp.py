"""The Regularizer and BetaLasso under DistributedDataParallel (docs/nn.md#regularizer: replicated weights).

Two CPU processes with the gloo backend each take half of a batch; DDP averages the task
gradients and every rank adds the same penalty gradient (its weights are replicated), so the
trained weights must equal one process training on the whole batch, up to the rounding of
the gradient all-reduce.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from regkernels.nn import Regularizer
from regkernels.optim import BetaLasso

STEPS = 4
WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)


def _train(model: nn.Module, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """``net`` is what runs the forward (the DDP wrapper or the model); the regularizers (one
    batched over the layers, one per conv operator with its recorded input size) and the
    optimizer see the model's own parameters."""
    frame = Regularizer(model, "frame", 0.1, A=0.5, B=2.0)
    conv_frame = Regularizer(model, "conv_frame", 0.1, A=0.5, B=2.0)
    opt = BetaLasso(model.parameters(), lr=0.05, lam=1e-3, beta=2.0, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y) + frame() + conv_frame()
        loss.backward()
        opt.step()


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = _data()
        half = x.shape[0] // WORLD
        _train(model, ddp, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        if rank == 0:
            torch.save([p.detach().clone() for p in model.parameters()], out_file)
    finally:
        dist.destroy_process_group()


def test_regularizer_and_beta_lasso_under_ddp_match_one_process(tmp_path):
    out_file = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out_file), nprocs=WORLD, join=True)
    ddp_params = torch.load(out_file)

    model = _model()
    x, y = _data()
    _train(model, model, x, y)
    assert len(ddp_params) == len(list(model.parameters()))
    for got, want in zip(ddp_params, model.parameters()):
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
    # and training moved the weights (the comparison is not between two untouched models)
    assert not torch.allclose(ddp_params[0], _model()[0].weight.detach())

