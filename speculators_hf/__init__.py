"""speculators_hf: train EAGLE-3 draft models for Hugging Face causal LMs and serve them with vLLM."""

__version__ = "0.1.0"

from .modeling import Eagle3Config, Eagle3DraftModel, Eagle3Output  # noqa: E402

__all__ = ["Eagle3Config", "Eagle3DraftModel", "Eagle3Output", "__version__"]
