"""speculators_hf: train EAGLE-3 draft models for Hugging Face causal LMs and serve them with vLLM.

The public API is imported lazily, so that `speculators-hf <command>` starts without loading every stage.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "Eagle3Config": "modeling",
    "Eagle3DraftModel": "modeling",
    "Eagle3Output": "modeling",
    "Eagle3Trainer": "training",
    "Eagle3TrainingArguments": "training",
    "Eagle3ModelArguments": "training",
    "DatagenArguments": "datagen",
    "build_dataset": "datagen",
    "build_vocab_mapping": "vocab",
    "PipelineArguments": "pipeline",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
