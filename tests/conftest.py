"""Test setup: without a GPU, Triton kernels run interpreted on CPU tensors (TRITON_INTERPRET=1,
set before triton is imported; on a GPU machine they compile for it, and TRITON_INTERPRET=1
can still be forced from the environment); tests marked ``cuda`` (declared in pytest.ini)
skip visibly without a GPU."""
import os

# torch is not imported yet (triton must see the variable first): look for the driver's devices
if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    # fresh but reproducible inputs per test
    torch.manual_seed(0x5EED)
    yield


@pytest.fixture(scope="module")
def gloo_world_of_one(tmp_path_factory):
    """A world of one gloo process (rank 0 of 1) for the module's tests: DTensors whose collectives
    are local. Skips where torch.distributed or gloo is missing."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/init", rank=0,
                            world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
