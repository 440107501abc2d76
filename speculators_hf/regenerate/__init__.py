"""Stage 0 (optional): regenerate the assistant turns of chat data with the verifier (on-policy training data)."""

from .arguments import RegenerateArguments
from .engines import Engine, Generation, GenerationRequest, make_engine
from .runner import prepare, regenerate

__all__ = ["Engine", "Generation", "GenerationRequest", "RegenerateArguments", "make_engine", "prepare", "regenerate"]
