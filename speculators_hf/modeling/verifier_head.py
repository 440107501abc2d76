"""The verifier's own output tail, the source of the training targets: `final norm -> lm_head -> logit transform`.

EAGLE-3 targets are the verifier's logits over the draft vocabulary from its pre-norm last hidden state `y`. Families
differ exactly there: Gemma's RMSNorm scales by `1 + w`, Gemma-2/3 soft-cap the logits, Cohere scales them, Granite
divides them, some norms are LayerNorms with a bias. Rather than re-implementing each, `VerifierHead` runs the
verifier's *own* code: its CausalLM class, instantiated from its config on the meta device with zero decoder layers,
whose base model is replaced by `DecoderTail` (the base model's own final norm module, applied to `inputs_embeds`).
`CausalLM.forward(inputs_embeds=y)` then runs `norm -> lm_head -> whatever that class does to logits`, and nothing the
base model does to its inputs (Granite's embedding multiplier, Phi-3's embedding dropout) or positions runs at all.
The lm_head keeps only the draft vocabulary's rows (every transform after it is elementwise), and only the norm and
those rows are read from the verifier's safetensors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..utils import UserError
from ..validation import pretrained_config
from .verifier_weights import find_role_tensors, read_tensors


@dataclass
class TailOutput(BaseModelOutputWithPast):
    """`last_hidden_state` = the normed state; every other field a CausalLM may read (`router_logits`, ...) is None."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return None


class DecoderTail(nn.Module):
    """Stands in for a verifier's base model: only its final norm, applied to `inputs_embeds` (the pre-norm state)."""

    def __init__(self, norm_name: str, norm: nn.Module):
        super().__init__()
        self.norm_name = norm_name
        self.add_module(norm_name, norm)  # same attribute name as in the base model, so tensor names match

    def forward(self, inputs_embeds: torch.Tensor, **kwargs) -> TailOutput:
        return TailOutput(last_hidden_state=getattr(self, self.norm_name)(inputs_embeds))


def causal_lm_class(
    config: PreTrainedConfig, path_or_id: str | None = None, trust_remote_code: bool = False
) -> tuple[type[PreTrainedModel], PreTrainedConfig]:
    """The transformers class that generates text for a verifier config and the config it takes: its text config's
    CausalLM, else the full config's, else (multimodal verifiers such as Qwen2.5-VL) its image-text-to-text class;
    with `trust_remote_code`, the CausalLM class a verifier folder ships (`auto_map`)."""
    remote = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if trust_remote_code and remote and path_or_id is not None:
        return get_class_from_dynamic_module(remote, path_or_id), config
    for auto, candidates in (
        (AutoModelForCausalLM, (config.get_text_config(), config)),
        (AutoModelForImageTextToText, (config,)),
    ):
        for candidate in candidates:
            if type(candidate) in auto._model_mapping:
                return auto._model_mapping[type(candidate)], candidate
    raise UserError(
        f"transformers has no causal-LM or image-text-to-text class for verifier type {config.model_type!r} "
        f"({', '.join(getattr(config, 'architectures', None) or [])}): its training targets cannot be built."
    )


def _final_norm(base_model: nn.Module) -> tuple[str, nn.Module]:
    """`(attribute name, module)` of a base model's final norm (in its language model for multimodal models)."""
    decoder = base_model.get_decoder() if hasattr(base_model, "get_decoder") else base_model
    for name in ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f"):
        if isinstance(getattr(decoder, name, None), nn.Module):
            return name, getattr(decoder, name)
    raise UserError(f"Cannot find the final norm of {type(decoder).__name__} (looked for norm, ln_f, ...).")


class VerifierHead(nn.Module):
    """Frozen verifier logits over the draft vocabulary: `[..., Ht]` pre-norm last states -> `[..., Vd]`.

    Its submodules and tensor names are the verifier's own (`model.norm.weight`, `lm_head.weight`, ...); the CausalLM
    shell that runs them is kept outside the module tree (no attention, no decoder layers, nothing to save).
    """

    def __init__(self, shell: PreTrainedModel, output_embedding_name: str = "lm_head"):
        super().__init__()
        self.output_embedding_name = output_embedding_name  # state-dict prefix of the lm_head (draft rows)
        for name, child in shell.named_children():
            self.add_module(name, child)  # shared with the shell: moving or casting this module moves its tensors
        for name, param in shell.named_parameters(recurse=False):
            self.register_parameter(name, param)
        object.__setattr__(self, "shell", shell)  # not a submodule
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VerifierHead:
        return super().train(False)  # always eval: the verifier's own code may hold dropout

    @classmethod
    def from_config(
        cls,
        verifier_config: PreTrainedConfig,
        draft_vocab_size: int,
        path_or_id: str | None = None,
        trust_remote_code: bool = False,
    ) -> VerifierHead:
        """The verifier's head with uninitialised (empty) tensors; fill them with `load_tensors`."""
        lm_class, config = causal_lm_class(verifier_config, path_or_id, trust_remote_code)
        config = copy.deepcopy(config)
        text = config.get_text_config()
        text.num_hidden_layers = 0
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = []
        for c in {id(config): config, id(text): text}.values():
            c.tie_word_embeddings = False  # the head holds its own rows, never the input embedding
        with torch.device("meta"):
            shell = lm_class._from_config(config, dtype=torch.float32)
        norm_name, norm = _final_norm(getattr(shell, shell.base_model_prefix))
        head = shell.get_output_embeddings()
        head_name = next(name for name, module in shell.named_modules() if module is head)
        rows = nn.Linear(head.in_features, draft_vocab_size, bias=head.bias is not None, device="meta")
        setattr(shell, shell.base_model_prefix, DecoderTail(norm_name, norm))
        shell.set_submodule(head_name, rows)
        shell.to_empty(device="cpu")
        return cls(shell, head_name)

    @property
    def rows(self) -> nn.Linear:
        """The verifier's lm_head restricted to the draft vocabulary (`[Vd, Ht]`)."""
        return self.get_submodule(self.output_embedding_name)

    @torch.no_grad()
    def forward(self, verifier_last_hidden_states: torch.Tensor) -> torch.Tensor:
        """`[..., Ht]` pre-norm last hidden states -> `[..., Vd]` the verifier's logits over the draft vocabulary."""
        y = verifier_last_hidden_states
        flat = y.reshape(1, -1, y.shape[-1])  # [1, N, Ht]: the CausalLM slices positions on dim 1
        logits = self.shell(inputs_embeds=flat, use_cache=False).logits  # [1, N, Vd]
        return logits.reshape(*y.shape[:-1], logits.shape[-1])


def load_verifier_head(
    path_or_id: str,
    target_ids: torch.LongTensor,
    verifier_config: PreTrainedConfig | None = None,
    trust_remote_code: bool = False,
) -> VerifierHead:
    """The verifier's head for the draft vocabulary (`target_ids[j]` = verifier token of draft index `j`), reading only
    its final norm and the lm_head rows from the verifier's safetensors (fp32). `trust_remote_code`: run the code a
    verifier folder ships (its `auto_map`), only when the user said so."""
    if verifier_config is None:
        verifier_config = pretrained_config(path_or_id, "verifier", trust_remote_code=trust_remote_code)
    config = verifier_config
    head = VerifierHead.from_config(config, len(target_ids), path_or_id, trust_remote_code)
    lm_prefix = head.output_embedding_name + "."
    keys = list(head.state_dict())
    found, weight_map = find_role_tensors(path_or_id, config, roles=("norm", "lm_head"))
    sources = {}
    for key in keys:
        role = "lm_head" if key.startswith(lm_prefix) else "norm"
        if role == "norm" and key in weight_map:
            sources[key] = key  # the same name in the checkpoint (text-only verifiers)
            continue
        suffix = key.rsplit(".", 1)[1]
        name = found[role].rsplit(".", 1)[0] + "." + suffix  # e.g. the LayerNorm's bias next to its weight
        if name not in weight_map:
            raise UserError(f"Verifier {path_or_id!r} has no tensor {name} (for its head's {key}) in its safetensors.")
        sources[key] = name
    tensors = read_tensors(path_or_id, sorted(set(sources.values())), weight_map)
    state = {}
    for key, name in sources.items():
        tensor = tensors[name]
        if key.startswith(lm_prefix):
            if int(target_ids.max()) >= tensor.shape[0]:
                raise UserError(
                    f"Draft vocabulary maps to token {int(target_ids.max())}, beyond verifier {path_or_id!r}'s "
                    f"{tensor.shape[0]}-token {name}."
                )
            tensor = tensor[target_ids]  # [Vd, Ht] (or [Vd] for a bias)
        state[key] = tensor
    head.load_state_dict(state, strict=True)
    return head
