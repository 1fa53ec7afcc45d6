"""Test setup: Triton kernels run interpreted on CPU tensors (set before triton is imported);
tests marked ``cuda`` (declared in pytest.ini) skip visibly without a GPU."""
import os

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
