"""The EAGLE authors' research checkpoint format (SafeAILab/EAGLE, HASS, SpecForge before conversion).

A flat Llama-style `config.json` (no `speculators_config`, often `"architectures": ["LlamaForCausalLMEagle3"]`) and
weights in `pytorch_model.bin` or `model.safetensors` whose first decoder layer is named `midlayer.*` instead of
`layers.0.*`. `embed_tokens.weight` is often absent (vLLM then shares the verifier's), and there are no aux layer ids:
the authors hard-code `[2, n//2, n-3]`.
"""

from __future__ import annotations

from pathlib import Path

from ..validation import bad_file, read_json, safetensors_header, torch_load

RESEARCH_KEY_MAPPING = {
    r"^midlayer\.": "layers.0."
}  # `Eagle3DraftModel.from_pretrained(key_mapping=...)`: the one path


def is_research_checkpoint(path: str | Path) -> bool:
    """True for a local folder whose config is flat (no `speculators_config`) or whose weights use `midlayer.*`."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        return False
    if "speculators_config" not in read_json(config, fix="re-save the draft (save_pretrained) or export it again"):
        return True
    return any(n.startswith("midlayer.") for n in research_tensor_names(path))


def research_tensor_names(path: str | Path) -> list[str]:
    """Tensor names of a checkpoint folder (safetensors read lazily; a `.bin` is read with `weights_only=True`)."""
    path = Path(path)
    fix = "re-save the draft (save_pretrained) or export it again"
    if (path / "model.safetensors").is_file():
        return list(safetensors_header(path / "model.safetensors", fix=fix))
    if (path / "pytorch_model.bin").is_file():
        state = torch_load(path / "pytorch_model.bin", fix=fix)
        if not isinstance(state, dict):
            raise bad_file(str(path / "pytorch_model.bin"), f"holds a {type(state).__name__}, expected a state dict")
        return list(state)
    return []
