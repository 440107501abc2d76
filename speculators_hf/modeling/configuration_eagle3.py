"""Configuration of an EAGLE-3 draft model.

`Eagle3Config` is a `LlamaConfig` (the draft decoder's shape, RoPE and norms, all taken from the verifier) plus the
EAGLE-3 fields. On disk it is written in the "speculators" format that vLLM reads: the decoder fields nest under
`transformer_layer_config`, and `speculators_config` names the verifier and the number of speculative tokens. It also
reads flat configs (the EAGLE authors' research format) and configs written by vllm-project/speculators.
"""

from __future__ import annotations

import copy
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, PreTrainedConfig

from ..utils import UserError, get_logger

logger = get_logger(__name__)

# Fields of the top level of a speculators-format config.json, next to `transformer_layer_config`.
EAGLE3_FIELDS = (
    "draft_vocab_size",
    "norm_before_residual",
    "norm_before_fc",
    "fc_norm",
    "norm_output",
    "target_hidden_size",
    "eagle_aux_hidden_state_layer_ids",
)
# Our own training choices, kept at the top level too (vLLM ignores them).
TRAINING_FIELDS = (
    "draft_layer_type",
    "train_lm_head",
    "verifier_num_hidden_layers",
    "speculative_tokens",
    "verifier_name_or_path",
    "verifier_architectures",
)
# Parallel drafting (P-EAGLE): written only for a parallel draft (`speculators_model_type` "peagle"), so that a chained
# draft's config.json stays what it was.
PARALLEL_FIELDS = ("parallel_drafting", "mask_token_id")
# vLLM 0.32's peagle reader copies only some EAGLE-3 fields from the top level (not these): they go into
# `transformer_layer_config` too, which it builds the draft's config from.
PEAGLE_LAYER_FIELDS = ("fc_norm", "norm_output")
# `speculators_model_type` "peagle": the architecture vLLM 0.32 maps each draft layer type to.
PEAGLE_ARCHITECTURES = {"llama": "PeagleLlamaForCausalLM", "qwen3": "PeagleQwen3ForCausalLM"}
# PreTrainedConfig bookkeeping that belongs at the top level, never inside `transformer_layer_config`.
TOP_LEVEL_KEYS = (
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "model_type",
    "auto_map",
    "_name_or_path",
    "speculators_version",
)
LAYER_CONFIG_DROP = (
    "architectures",
    "dtype",
    "transformers_version",
    "auto_map",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "problem_type",
    "tie_word_embeddings",
    "use_cache",
    "pretraining_tp",
    "id2label",
    "label2id",
    "is_encoder_decoder",
    "tokenizer_class",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


DRAFT_LAYER_TYPES = ("llama", "qwen3")  # the draft decoder layers vLLM 0.32 has EAGLE-3 classes for


def default_aux_layer_ids(num_hidden_layers: int) -> list[int]:
    """vLLM's default aux layer ids `[2, n//2, n-3]`, made distinct for verifiers with fewer than 8 layers.

    Ids follow vLLM's convention: id `i` is the *input* to decoder layer `i` (hidden + residual), id `n` the pre-norm
    output of the last layer.
    """
    n = num_hidden_layers
    ids = [2, n // 2, n - 3]
    if len(set(ids)) == 3 and all(0 < i < n for i in ids):
        return ids
    if n < 4:
        raise UserError(f"A verifier needs at least 4 decoder layers for 3 distinct aux layers; it has {n}.")
    return [1, n // 2, n - 1] if n // 2 not in (1, n - 1) else [1, 2, n - 1]


AUX_LAYER_ORDER = (
    "vLLM captures the aux states while it walks the verifier's layers and fuses them in ascending layer order, "
    "whatever order the config lists"
)


def aux_layer_ids_problem(aux_layer_ids: list[int], num_hidden_layers: int | None = None) -> str | None:
    """The one rule for aux layer ids (vLLM convention), or None when they follow it.

    Ids are distinct, in `[0, n]`, and **ascending**: vLLM collects the aux states inside its decoder-layer loop (a
    membership test on the id set), so the draft's `fc` always reads them in ascending layer order at serve time. Data,
    training and the exported config therefore store and use them in that order; any other order is an error.
    """
    ids = list(aux_layer_ids)
    if len(set(ids)) != len(ids):
        return f"aux layer ids {ids} repeat an id"
    if num_hidden_layers is not None and any(not 0 <= i <= num_hidden_layers for i in ids):
        n = num_hidden_layers
        return (
            f"aux layer ids {ids} must be in [0, {n}] (the verifier has {n} decoder layers; vLLM convention: id i is "
            "the input to layer i)"
        )
    if ids != sorted(ids):
        return f"aux layer ids {ids} are not ascending ({AUX_LAYER_ORDER}): use {sorted(ids)}"
    return None


def draft_rope_parameters(text_config: PreTrainedConfig) -> dict | None:
    """The verifier's RoPE for the draft. Verifiers that mix attention types keep one RoPE per type (Gemma-3:
    `{"sliding_attention": {...}, "full_attention": {...}}`); the draft gets the full-attention one, because the
    draft's single layer attends over the whole context as the verifier's full-attention layers do, and vLLM's Llama
    draft passes `rope_parameters` to `get_rope` as one dict (a nested one kills the worker: unhashable dict)."""
    rope = copy.deepcopy(getattr(text_config, "rope_parameters", None))
    if isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
        nested = {k: v for k, v in rope.items() if isinstance(v, dict)}
        rope = nested.get("full_attention") or next(iter(nested.values()))
    return rope


def check_narrow_draft(hidden_size: int, target_hidden_size: int | None, train_lm_head: bool) -> None:
    if target_hidden_size not in (None, hidden_size) and not train_lm_head:
        raise UserError(
            f"A draft of width {hidden_size} cannot copy the verifier's {target_hidden_size}-wide lm_head: its own "
            "must train (leave --train-lm-head true)."
        )


def check_eagle3_fields(draft_vocab_size, vocab_size, aux_layer_ids, verifier_num_hidden_layers, speculative_tokens):
    if not 0 < draft_vocab_size <= vocab_size:
        raise UserError(
            f"draft_vocab_size={draft_vocab_size} must be in [1, vocab_size={vocab_size}] "
            "(the draft vocabulary is a subset of the verifier's)."
        )
    problem = aux_layer_ids_problem(aux_layer_ids, verifier_num_hidden_layers) if aux_layer_ids is not None else None
    if problem:
        raise UserError(problem[0].upper() + problem[1:] + ".")
    if speculative_tokens < 1:
        raise UserError(f"speculative_tokens must be >= 1, got {speculative_tokens}")


def check_parallel_fields(parallel_drafting: bool, mask_token_id, vocab_size: int) -> None:
    if parallel_drafting and not (isinstance(mask_token_id, int) and 0 <= mask_token_id < vocab_size):
        raise UserError(
            f"mask_token_id {mask_token_id!r}: a parallel draft needs the id of its mask slots' token, in "
            f"[0, vocab_size={vocab_size})."
        )


@strict
class Eagle3Config(LlamaConfig):
    r"""
    The draft decoder shape (every `LlamaConfig` field) plus:

    Args:
        draft_vocab_size (`int`): size of the draft vocabulary `Vd` (the lm_head rows); `d2t`/`t2d` map it to the
            verifier vocabulary (`vocab_size`).
        eagle_aux_hidden_state_layer_ids (`list[int]`): verifier layers whose states are fused, in vLLM's convention
            (id `i` = input to decoder layer `i`), ascending (`aux_layer_ids_problem`). These are the ids vLLM
            captures at serve time, in the order it fuses them.
        norm_before_residual (`bool`): residual of the first layer is `hidden_norm(h)` instead of `h`.
        norm_before_fc (`bool`): Eagle 3.1: RMSNorm over the `3H` aux concatenation before `fc`.
        fc_norm (`bool`): Eagle 3.1: one RMSNorm per aux state (each `Ht` wide) before `fc` (after `norm_before_fc`).
        draft_layer_type (`str`): `"llama"` (default) or `"qwen3"` (q/k RMSNorm on each head, vLLM's
            `Eagle3Qwen3ForCausalLM`); written as `transformer_layer_config.model_type`.
        sliding_window (`int`, *optional*): every draft layer attends to the last `sliding_window` positions only
            (written with `layer_types` all `"sliding_attention"`, which vLLM's draft layers read).
        norm_output (`bool`): Eagle 3.1: the carried hidden state is the final-norm output rather than the pre-norm.
        target_hidden_size (`int`, *optional*): verifier hidden size when it differs from the draft's (a narrower
            draft: its embedding and lm_head are then its own, trained, since the verifier's have another width).
        train_lm_head (`bool`): whether lm_head trains (initialised from the verifier's rows either way).
        speculative_tokens (`int`): draft tokens per step when served (`num_speculative_tokens` in vLLM).
        verifier_name_or_path (`str`): hub id (preferred) or path of the verifier; vLLM's auto mode serves it.
        verifier_architectures (`list[str]`): the verifier's architectures.
        verifier_num_hidden_layers (`int`): the verifier's decoder layer count (to validate aux ids).
        parallel_drafting (`bool`): P-EAGLE: the draft proposes its K tokens in one forward pass, from the real
            context plus K - 1 mask slots (token `mask_token_id`, aux state the learned `mask_hidden`); written as
            `speculators_model_type` "peagle", which vLLM serves with `parallel_drafting` (see `modeling_eagle3`).
        mask_token_id (`int`, *optional*): the token id of the mask slots (parallel drafting; any verifier id: the
            slots are told apart by `mask_hidden` and their positions).
    """

    model_type = "speculators"  # what vLLM maps speculators-format checkpoints to

    draft_vocab_size: int | None = None
    eagle_aux_hidden_state_layer_ids: list[int] | None = None
    norm_before_residual: bool = True
    norm_before_fc: bool = False
    fc_norm: bool = False
    draft_layer_type: str = "llama"
    sliding_window: int | None = None
    norm_output: bool = False
    target_hidden_size: int | None = None
    train_lm_head: bool = True
    speculative_tokens: int = 3
    verifier_name_or_path: str | None = None
    verifier_architectures: list[str] | None = None
    verifier_num_hidden_layers: int | None = None
    parallel_drafting: bool = False
    mask_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.draft_vocab_size is None:
            self.draft_vocab_size = self.vocab_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UserError(f"sliding_window must be >= 1, got {self.sliding_window}.")
        check_narrow_draft(self.hidden_size, self.target_hidden_size, self.train_lm_head)
        if self.draft_layer_type not in DRAFT_LAYER_TYPES:
            raise UserError(
                f"draft_layer_type {self.draft_layer_type!r}: choose one of {', '.join(DRAFT_LAYER_TYPES)}."
            )
        check_eagle3_fields(
            self.draft_vocab_size,
            self.vocab_size,
            self.eagle_aux_hidden_state_layer_ids,
            self.verifier_num_hidden_layers,
            self.speculative_tokens,
        )
        check_parallel_fields(self.parallel_drafting, self.mask_token_id, self.vocab_size)

    @property
    def num_aux_layers(self) -> int:
        return len(self.eagle_aux_hidden_state_layer_ids or (0, 0, 0))

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def from_verifier(
        cls,
        verifier_config: PreTrainedConfig,
        *,
        draft_vocab_size: int | None = None,
        num_hidden_layers: int = 1,
        aux_layer_ids: list[int] | None = None,
        verifier_name_or_path: str | None = None,
        **kwargs: Any,
    ) -> Eagle3Config:
        """Draft config whose decoder shape, RoPE and `max_position_embeddings` come from the verifier.

        Args:
            verifier_config: the verifier's config (multimodal configs are reduced to their text config).
            draft_vocab_size: draft vocabulary size (default: the verifier's vocabulary).
            num_hidden_layers: draft decoder layers (default 1).
            aux_layer_ids: aux layer ids in vLLM's convention (default `[2, n//2, n-3]`).
            verifier_name_or_path: the hub id to record for serving (default: the config's `name_or_path`).
            **kwargs: any other `Eagle3Config` field (`norm_before_fc=True`, `train_lm_head=False`, ...).
        """
        text = verifier_config.get_text_config()
        n = text.num_hidden_layers
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        hidden_act = getattr(text, "hidden_act", None) or "silu"
        if hidden_act != "silu":  # e.g. Gemma's gelu: vLLM's EAGLE-3 draft layers run only silu
            logger.info(
                "The draft uses silu (vLLM's EAGLE-3 draft layers run only silu), not the verifier's %s.", hidden_act
            )
            hidden_act = "silu"
        shape = dict(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=head_dim,
            hidden_act=hidden_act,
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            max_position_embeddings=text.max_position_embeddings,
            rope_parameters=draft_rope_parameters(text),
            attention_bias=getattr(text, "attention_bias", False),
            mlp_bias=getattr(text, "mlp_bias", False),
            pad_token_id=getattr(text, "pad_token_id", None),
        )
        if kwargs.get("max_position_embeddings", shape["max_position_embeddings"]) < shape["max_position_embeddings"]:
            raise UserError(
                f"max_position_embeddings={kwargs['max_position_embeddings']} is smaller than the verifier's "
                f"{shape['max_position_embeddings']}: vLLM would clip the draft's RoPE at serve time. Leave it unset."
            )
        if kwargs.get("hidden_size", text.hidden_size) != text.hidden_size:
            kwargs.setdefault("target_hidden_size", text.hidden_size)  # a narrower draft: fc reads num_aux * Ht
            check_narrow_draft(kwargs["hidden_size"], text.hidden_size, kwargs.get("train_lm_head", True))
        name = verifier_name_or_path or getattr(verifier_config, "name_or_path", None) or None
        aux_layer_ids = list(aux_layer_ids or default_aux_layer_ids(n))
        # Checked here too so that callers get the UserError itself, not a dataclass validation wrapper.
        check_eagle3_fields(
            draft_vocab_size or text.vocab_size, text.vocab_size, aux_layer_ids, n, kwargs.get("speculative_tokens", 3)
        )
        check_parallel_fields(kwargs.get("parallel_drafting", False), kwargs.get("mask_token_id"), text.vocab_size)
        return cls(
            **{**shape, **kwargs},
            num_hidden_layers=num_hidden_layers,
            draft_vocab_size=draft_vocab_size or text.vocab_size,
            eagle_aux_hidden_state_layer_ids=aux_layer_ids,
            verifier_num_hidden_layers=n,
            verifier_name_or_path=name,
            verifier_architectures=list(getattr(verifier_config, "architectures", None) or []),
            architectures=["Eagle3DraftModel"],
        )

    # -------------------------------------------------------------------------------------- speculators format

    def to_dict(self) -> dict[str, Any]:
        """The speculators-format dict vLLM reads (decoder fields nested under `transformer_layer_config`)."""
        flat = super().to_dict()
        top = {k: flat.pop(k) for k in TOP_LEVEL_KEYS if k in flat}
        eagle = {k: flat.pop(k) for k in EAGLE3_FIELDS}
        training = {k: flat.pop(k) for k in TRAINING_FIELDS}
        parallel = {k: flat.pop(k) for k in PARALLEL_FIELDS}
        layer = {k: v for k, v in flat.items() if k not in LAYER_CONFIG_DROP}
        layer["model_type"] = training["draft_layer_type"]  # vLLM: llama -> Eagle3Llama, qwen3 -> Eagle3Qwen3
        if layer.get("sliding_window"):
            layer["layer_types"] = ["sliding_attention"] * layer["num_hidden_layers"]
        else:
            layer.pop("sliding_window", None)
        algorithm, extra = "eagle3", {}
        if parallel["parallel_drafting"]:  # vLLM 0.32: "peagle" -> method eagle3 + parallel_drafting
            algorithm, extra = "peagle", {"mask_token_id": parallel["mask_token_id"]}
            top["architectures"] = [PEAGLE_ARCHITECTURES[training["draft_layer_type"]]]
            layer |= {k: eagle[k] for k in PEAGLE_LAYER_FIELDS}
        return {
            **top,
            "speculators_model_type": algorithm,
            "speculators_config": {
                "algorithm": algorithm,
                "default_proposal_method": "greedy",
                "proposal_methods": [
                    {
                        "proposal_type": "greedy",
                        "speculative_tokens": training["speculative_tokens"],
                        "verifier_accept_k": 1,
                        "accept_tolerance": 0.0,
                    }
                ],
                "verifier": {
                    "name_or_path": training["verifier_name_or_path"],
                    "architectures": training["verifier_architectures"] or [],
                },
            },
            "transformer_layer_config": layer,
            **eagle,
            **extra,
            "train_lm_head": training["train_lm_head"],
            "verifier_num_hidden_layers": training["verifier_num_hidden_layers"],
            "tie_word_embeddings": False,
        }

    def to_diff_dict(self) -> dict[str, Any]:
        # vLLM builds the draft config from `transformer_layer_config` alone, without Llama defaults: write it whole.
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        return super().from_dict(flatten_config_dict(config_dict), **kwargs)


def flatten_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Speculators-format (or research-format) config dict -> flat `Eagle3Config` kwargs."""
    d = copy.deepcopy(config_dict)
    layer = d.pop("transformer_layer_config", None)
    if layer is None:  # already flat: our own kwargs or the EAGLE authors' research config
        d.pop("model_type", None)
        # Without the key, a flat config is the authors' layer (residual = h), as vLLM runs a flat config; only the
        # speculators format means True when the key is missing (below).
        d.setdefault("norm_before_residual", False)
        return d
    draft_layer_type = layer.pop("model_type", None) or "llama"
    layer.pop("layer_types", None)  # all "sliding_attention" exactly when sliding_window is set
    spec = d.pop("speculators_config", None) or {}
    parallel = d.get("speculators_model_type") == "peagle"
    methods = spec.get("proposal_methods") or [{}]
    verifier = spec.get("verifier") or {}
    for key in ("speculators_model_type", "speculators_version", "model_type", "auto_map", "torch_dtype"):
        d.pop(key, None)
    out = {**layer, **d}
    out.setdefault("draft_layer_type", draft_layer_type)
    out.setdefault("speculative_tokens", methods[0].get("speculative_tokens", 3))
    out.setdefault("verifier_name_or_path", verifier.get("name_or_path"))
    out.setdefault("verifier_architectures", verifier.get("architectures"))
    # vLLM's default when the key is missing (its peagle reader defaults to False)
    out.setdefault("norm_before_residual", not parallel)
    if parallel:
        out["parallel_drafting"] = True
        if out.get("architectures") == [PEAGLE_ARCHITECTURES.get(draft_layer_type)]:
            out["architectures"] = ["Eagle3DraftModel"]
    return out
