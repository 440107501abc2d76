"""The EAGLE authors' research checkpoint format (SafeAILab/EAGLE, HASS, SpecForge before conversion).

A flat Llama-style `config.json` (no `speculators_config`, often `"architectures": ["LlamaForCausalLMEagle3"]`) and
weights in `pytorch_model.bin` or `model.safetensors` whose first decoder layer is named `midlayer.*` instead of
`layers.0.*`. `embed_tokens.weight` is often absent (vLLM then shares the verifier's), and there are no aux layer ids:
the authors hard-code `[2, n//2, n-3]`.
"""

from __future__ import annotations

import json
from pathlib import Path

RESEARCH_KEY_MAPPING = {r"^midlayer\.": "layers.0."}
RESEARCH_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def rename_research_key(name: str) -> str:
    """`midlayer.x` -> `layers.0.x`; every other name is already ours."""
    return "layers.0." + name[len("midlayer.") :] if name.startswith("midlayer.") else name


def is_research_checkpoint(path: str | Path) -> bool:
    """True for a local folder whose config is flat (no `speculators_config`) or whose weights use `midlayer.*`."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        return False
    if "speculators_config" not in json.loads(config.read_text()):
        return True
    return any(n.startswith("midlayer.") for n in research_tensor_names(path))


def research_tensor_names(path: str | Path) -> list[str]:
    """Tensor names of a checkpoint folder (safetensors read lazily; a `.bin` is read with `weights_only=True`)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", "pt") as f:
            return list(f.keys())
    if (path / "pytorch_model.bin").is_file():
        import torch

        return list(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True))
    return []


def load_research_state_dict(path: str | Path) -> dict:
    """All tensors of a research checkpoint folder, under our names."""
    import torch

    path = Path(path)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        tensors = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        from ..utils import UserError

        raise UserError(f"{path} has no {' or '.join(RESEARCH_WEIGHT_FILES)}.")
    return {rename_research_key(k): v for k, v in tensors.items()}
