import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: grids, torchrun, lock races, real models and figures; "
                                       "`pytest -m 'not slow'` runs the rest in about a minute")
    config.addinivalue_line("markers", "cuda: CUDA code paths (bf16 models, device maps, fused losses); skipped "
                                       "without a GPU, run by bench/gpu_check.sh")


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if marked:
        import torch

        if not torch.cuda.is_available():
            for item in marked:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: on a busy machine a thread pool's wake-ups cost several times the arithmetic."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
