"""The EAGLE-3 draft model: a Llama decoder fed with fused verifier hidden states.

One draft step (`Eagle3DraftModel.forward`):

    g   = [h_a ‖ h_b ‖ h_c]                       aux verifier states         [B, T, 3 * Ht]
    h   = fc(g)            (first step)  or the carried draft state           [B, T, H]
    e   = embed_tokens(x)  (frozen copy of the verifier's embedding)          [B, T, H]
    h   = layer_0([input_layernorm(e) ‖ hidden_norm(h)])   q/k/v read 2H      [B, T, H]
    h   = layer_i(h)  for the later (plain Llama) layers
    out = lm_head(norm(h))                                 draft vocab        [B, T, Vd]

Draft index `j` is verifier token `j + d2t[j]`. Names and shapes match what vLLM's `Eagle3LlamaForCausalLM` loads.

Chained drafting (EAGLE-3) runs K such steps per proposal, each fed the previous step's token and output state.

Parallel drafting (P-EAGLE, `config.parallel_drafting`) proposes all K tokens in ONE forward pass. What vLLM 0.32
computes (`v1/spec_decode/llm_base_proposer.py`: `set_inputs_first_pass` with `parallel_drafting`, the
`copy_and_expand_eagle_inputs_kernel` of `v1/spec_decode/utils.py`; `llama_eagle3.py` loads `mask_hidden`), in the
row notation of training (row s = verifier state g_s with token x_{s+1}, position s), when the verifier has just
accepted up to position t and sampled x_{t+1}:

    slot          token id         input state                  position   attends to              predicts
    row s <= t    x_{s+1}          fc(g_s)                      s          rows <= s               (KV only, s < t)
    row t         x_{t+1} (bonus)  fc(g_t)                      t          rows <= t               x_{t+2}  (d_1)
    mask slot i   mask_token_id    fc(mask_hidden)              t + i      rows <= t, slots <= i   x_{t+2+i} (d_{i+1})
    (i = 1..K-1)

`fc(.)` is the whole fusion (`fuse`: `input_norm`/`fc_norm` then `fc`), applied to the learned `mask_hidden`
`[1, num_aux * Ht]` exactly as to real aux states (vLLM: `combine_hidden_states(mask_hidden)`). Attention is plain
causal over the request's slots; the K outputs of rows t, t+1.., t+K-1 are sampled at once (greedy: argmax, mapped
through `d2t`); the output state is not carried anywhere. The mask slots' keys/values land at positions t+1..t+K-1
and are overwritten in the next step by the real rows of the accepted tokens (rejected ones are padding), so every
proposal reads keys of real rows only, besides its own mask slots.

Training therefore reuses the TTT layout (`losses`): step 0 is the real rows; step k (1..K-1) is mask slot k of
every row t at once (token `mask_token_id`, state `fc(mask_hidden)`, position t + k), under the TTT step-k mask (rows
<= t of step 0 plus its own position in steps 1..k: exactly "rows <= t, slots <= i"), compared with target row t + k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from ..formats.checkpoint import weight_map
from ..utils import UserError
from ..validation import bad_file, describe, pretrained_config, read_json, safetensors_header, torch_load
from ..vocab import validate_vocab_mapping
from . import losses
from .configuration_eagle3 import Eagle3Config
from .research_format import RESEARCH_KEY_MAPPING, is_research_checkpoint
from .verifier_head import VerifierHead, load_verifier_head
from .verifier_weights import load_verifier_tensors, recorded_verifier_name

VERIFIER_HEAD_MISSING = (
    "The draft's verifier head (the source of its training targets) is not loaded: call "
    "draft.load_verifier_head(<verifier id or folder>) or build the draft with Eagle3DraftModel.from_verifier."
)


@dataclass
class Eagle3Output(ModelOutput):
    """Output of one draft step, or of the training loss (`Eagle3DraftModel.forward` with `ttt_hidden_states`).

    Args:
        logits (`torch.FloatTensor` of shape `[B, T, draft_vocab_size]`): logits over the draft vocabulary (None
            with `return_logits=False`).
        hidden_states (`torch.FloatTensor` of shape `[B, T, H]`): the state carried into the next draft step
            (post-norm when `config.norm_output`, else pre-norm).
        past_key_values (`Cache`, *optional*): the updated cache.
        normed_hidden_states (`torch.FloatTensor` of shape `[B, T, H]`): the final norm's output, the draft head's
            input (what the training loss takes per TTT step).
        loss (`torch.FloatTensor` scalar, *optional*): the TTT objective (`losses.fused_ttt_kl`).
        step_kl (`torch.FloatTensor` of shape `[K, B, T]`, *optional*): per-row KL of each TTT step (0 where a row
            does not count).
        step_agree (`torch.BoolTensor` of shape `[K, B, T]`, *optional*): per-row draft argmax == verifier argmax.
    """

    logits: torch.FloatTensor | None = None
    hidden_states: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    normed_hidden_states: torch.FloatTensor | None = None
    loss: torch.FloatTensor | None = None
    step_kl: torch.FloatTensor | None = None
    step_agree: torch.BoolTensor | None = None


class Eagle3FirstLayerMixin:
    """The first draft layer: attention reads `[input_layernorm(embeds) ‖ hidden_norm(hidden)]` (2H wide)."""

    def _widen(self, config: Eagle3Config) -> None:
        # ##### EAGLE-3: q/k/v take 2H; a second input norm for the hidden state #####
        attn, width, bias = self.self_attn, 2 * config.hidden_size, config.attention_bias
        attn.q_proj = nn.Linear(width, config.num_attention_heads * attn.head_dim, bias=bias)
        attn.k_proj = nn.Linear(width, config.num_key_value_heads * attn.head_dim, bias=bias)
        attn.v_proj = nn.Linear(width, config.num_key_value_heads * attn.head_dim, bias=bias)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_before_residual = config.norm_before_residual

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        embeds = self.input_layernorm(inputs_embeds)  # [B, T, H]
        normed = self.hidden_norm(hidden_states)  # [B, T, H]
        residual = normed if self.norm_before_residual else hidden_states
        # Self Attention over the 2H concatenation
        attn_out, _ = self.self_attn(
            hidden_states=torch.cat([embeds, normed], dim=-1),  # [B, T, 2H]
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + attn_out
        # Fully Connected
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class Eagle3FirstDecoderLayer(Eagle3FirstLayerMixin, LlamaDecoderLayer):
    """Llama decoder layer whose attention reads `[input_layernorm(embeds) ‖ hidden_norm(hidden)]` (2H wide)."""

    def __init__(self, config: Eagle3Config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self._widen(config)


class Eagle3Qwen3FirstDecoderLayer(Eagle3FirstLayerMixin, Qwen3DecoderLayer):
    """The same on a Qwen3 layer (RMSNorm on each query/key head), as vLLM's `Eagle3Qwen3ForCausalLM` runs it."""

    def __init__(self, config: Eagle3Config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self._widen(config)


# draft_layer_type -> (first layer, later layers)
DRAFT_LAYERS = {
    "llama": (Eagle3FirstDecoderLayer, LlamaDecoderLayer),
    "qwen3": (Eagle3Qwen3FirstDecoderLayer, Qwen3DecoderLayer),
}


class Eagle3PreTrainedModel(PreTrainedModel):
    config: Eagle3Config
    config_class = Eagle3Config
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["Eagle3FirstDecoderLayer", "LlamaDecoderLayer"]  # per instance: its layer classes
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Eagle3DraftModel) and module.d2t is not None:
            # Identity mapping until a real one is loaded (target id j for draft index j).
            module.d2t.zero_()
            module.t2d.zero_()
            module.t2d[: module.config.draft_vocab_size] = True
        if isinstance(module, Eagle3DraftModel) and module.mask_hidden is not None:
            module.mask_hidden.normal_(0.0, 1.0)  # the scale of real aux states, which the verifier's norms keep ~1


def check_local_checkpoint(path, config_given: bool = False) -> None:
    """The files of a local draft folder, before transformers reads them: `config.json` a draft config, the weights
    readable (`model.safetensors`, its index and shards, or `pytorch_model.bin`). One line naming the bad file."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: transformers resolves (and reports) it
    fix = "re-save the draft (save_pretrained) or export it again"
    if not config_given:
        read_json(folder / "config.json", fix=fix)
        try:
            Eagle3Config.from_pretrained(folder)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a field of the wrong type or value, whatever transformers raises
            raise bad_file(str(folder / "config.json"), f"is not a draft config ({describe(err)})", fix) from err
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        safetensors_header(folder / "model.safetensors", fix=fix)
    elif index.is_file():
        for shard in sorted(set(weight_map(index).values())):
            safetensors_header(folder / shard, fix=fix)
    elif (folder / "pytorch_model.bin").is_file():
        torch_load(folder / "pytorch_model.bin", fix=fix)
    else:
        raise UserError(f"{folder} has no model.safetensors: not a draft checkpoint folder ({fix}).")


class Eagle3DraftModel(Eagle3PreTrainedModel):
    """EAGLE-3 draft model (see the module docstring). Build one with `Eagle3DraftModel.from_verifier`."""

    def __init__(self, config: Eagle3Config):
        super().__init__(config)
        H, V, Vd = config.hidden_size, config.vocab_size, config.draft_vocab_size
        Ht = config.target_hidden_size or H
        fused = config.num_aux_layers * Ht

        self.embed_tokens = nn.Embedding(V, H, config.pad_token_id)
        # A frozen copy of the verifier's embedding; a narrower draft (H < Ht) cannot copy it and trains its own.
        self.embed_tokens.weight.requires_grad_(H != Ht)
        self.input_norm = LlamaRMSNorm(fused, eps=config.rms_norm_eps) if config.norm_before_fc else None
        self.fc_norm = (
            nn.ModuleList([LlamaRMSNorm(Ht, eps=config.rms_norm_eps) for _ in range(config.num_aux_layers)])
            if config.fc_norm
            else None
        )
        self.fc = nn.Linear(fused, H, bias=False)
        first, later = DRAFT_LAYERS[config.draft_layer_type]
        self._no_split_modules = [first.__name__, later.__name__]
        self.layers = nn.ModuleList(
            [first(config, 0)] + [later(config, i) for i in range(1, config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(H, Vd, bias=False)
        self.lm_head.weight.requires_grad_(config.train_lm_head)
        # Parallel drafting: the aux state of every mask slot (learned; vLLM fuses it like a real one)
        self.mask_hidden = nn.Parameter(torch.zeros(1, fused)) if config.parallel_drafting else None
        self.rotary_emb = LlamaRotaryEmbedding(config)

        # Draft -> verifier vocabulary: target id = j + d2t[j]; t2d marks the verifier ids in the draft vocabulary.
        if Vd != V:
            self.register_buffer("d2t", torch.zeros(Vd, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(V, dtype=torch.bool))
        else:
            self.d2t = self.t2d = None

        # The verifier's own frozen head for training targets (`load_verifier_head`); never saved.
        self.verifier_head: VerifierHead | None = None

        self.gradient_checkpointing = False
        self.post_init()
        # The layer classes this draft has: accelerate's FSDP wrap policy looks each name up and fails on a missing one
        # (a 1-layer draft has no plain LlamaDecoderLayer)
        self._no_split_modules = {type(layer).__name__ for layer in self.layers}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    # ------------------------------------------------------------------------------------------- one draft step

    def fuse(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, T, num_aux * Ht]` concatenated verifier aux states -> `[B, T, H]` draft input state."""
        if self.input_norm is not None:
            aux_hidden_states = self.input_norm(aux_hidden_states)
        if self.fc_norm is not None:  # one norm per aux state, as vLLM applies them
            chunks = aux_hidden_states.chunk(len(self.fc_norm), dim=-1)  # num_aux x [B, T, Ht]
            aux_hidden_states = torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(aux_hidden_states)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        aux_hidden_states: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        return_logits: bool = True,
        ttt_hidden_states: list[torch.Tensor] | None = None,
        verifier_last_hidden_states: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        loss_step_weights: list[float] | None = None,
        mask_slots: bool = False,
        loss_function: str = "kl",
        loss_temperature: float = 1.0,
        loss_eta: float = losses.DEFAULT_LOSS_ETA,
        loss_target_index: torch.Tensor | None = None,
        loss_reverse_rows: torch.Tensor | None = None,
        **kwargs,
    ) -> Eagle3Output:
        """One draft step, or (with `ttt_hidden_states`) the training loss of K draft steps.

        Args:
            input_ids (`torch.LongTensor` of shape `[B, T]`): verifier token ids (the token *after* each state).
            aux_hidden_states (`torch.Tensor` of shape `[B, T, num_aux * Ht]`): fused verifier aux states (first
                step). Exactly one of `aux_hidden_states` and `hidden_states` is given.
            hidden_states (`torch.Tensor` of shape `[B, T, H]`): the state carried from the previous draft step.
            position_ids (`torch.LongTensor` of shape `[B, T]`): positions (default: after the cached ones).
            attention_mask (`torch.Tensor`, *optional*): a prepared 4D mask `[B, 1, T, S]` (bool, True = attend) or a
                flex `BlockMask`; default: causal over the cache.
            past_key_values (`Cache`, *optional*): the draft's KV cache.
            return_logits (`bool`): compute the draft logits (training passes False and keeps
                `normed_hidden_states` for the loss instead).
            ttt_hidden_states (K tensors `[B, T, H]`, *optional*): loss mode: each TTT step's
                `normed_hidden_states`; then only the loss is computed (`losses.fused_ttt_kl`), here in forward so
                that wrappers such as FSDP have the draft head and the frozen verifier head gathered.
            verifier_last_hidden_states (`torch.Tensor` of shape `[B, T, Ht]`): loss mode: the verifier's pre-norm
                last hidden states; step k's row t is compared with row t + k.
            loss_mask (`torch.BoolTensor` of shape `[K, B, T]`): loss mode: the rows each step counts
                (`losses.ttt_valid_rows`).
            loss_step_weights (K floats, *optional*): loss mode: step k's weight (e.g. `decay**k`; default 1).
            mask_slots (`bool`): parallel drafting: every position is a mask slot (token `mask_token_id`, state
                `fuse(mask_hidden)`); `position_ids` (required) give the shape, no ids or states are passed.
            loss_function, loss_temperature, loss_eta: loss mode: the per-row objective (`losses.LOSSES`; default
                `kl`), the temperature of both distributions (default 1) and `kl_tv`'s eta.
            loss_target_index, loss_reverse_rows: loss mode, the on-policy stage: where each row's target is in
                `verifier_last_hidden_states` and which rows take the reverse KL (`losses.fused_ttt_kl`).
        """
        if ttt_hidden_states is not None:
            objective = {}  # the default KL at T = 1: called exactly as before
            if (loss_function, loss_temperature) != ("kl", 1.0):
                objective = dict(loss=loss_function, temperature=loss_temperature, eta=loss_eta)
            if loss_target_index is not None or loss_reverse_rows is not None:
                objective.update(target_index=loss_target_index, reverse=loss_reverse_rows)
            return self._ttt_loss(
                ttt_hidden_states, verifier_last_hidden_states, loss_mask, loss_step_weights, **objective
            )
        if mask_slots:  # built here, inside forward: wrappers (FSDP) have mask_hidden and fc gathered
            if input_ids is not None or aux_hidden_states is not None or hidden_states is not None:
                raise ValueError("`mask_slots` builds its own inputs: pass `position_ids` only.")
            input_ids, hidden_states = self.mask_slot_inputs(position_ids.shape)
        if (aux_hidden_states is None) == (hidden_states is None):
            raise ValueError("Pass exactly one of `aux_hidden_states` (first step) and `hidden_states` (later steps).")
        if aux_hidden_states is not None:
            hidden_states = self.fuse(aux_hidden_states)  # [B, T, H]
        inputs_embeds = self.embed_tokens(input_ids).to(hidden_states.dtype)  # [B, T, H]

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        attention_mask = self._prepare_attention_mask(attention_mask, inputs_embeds, past_key_values, position_ids)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        layer_kwargs = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = self.layers[0](inputs_embeds, hidden_states, **layer_kwargs)
        for layer in self.layers[1:]:
            hidden_states = layer(hidden_states, **layer_kwargs)

        normed = self.norm(hidden_states)  # [B, T, H]
        return Eagle3Output(
            logits=self.lm_head(normed) if return_logits else None,  # [B, T, Vd]
            hidden_states=normed if self.config.norm_output else hidden_states,
            past_key_values=past_key_values,
            normed_hidden_states=normed,
        )

    def mask_slot_inputs(self, shape: tuple[int, ...]) -> tuple[torch.LongTensor, torch.Tensor]:
        """Parallel drafting: the token ids `shape` (`mask_token_id`) and input states `[*shape, H]`
        (`fuse(mask_hidden)`) of mask slots."""
        if self.mask_hidden is None:
            raise ValueError("This draft has no mask slots (config.parallel_drafting is False).")
        ids = torch.full(shape, self.config.mask_token_id, dtype=torch.long, device=self.mask_hidden.device)
        hidden = self.fuse(self.mask_hidden.to(self.fc.weight.dtype))  # [1, H]
        return ids, hidden.expand(*shape, hidden.shape[-1])

    def _ttt_loss(
        self, ttt_hidden_states, verifier_last_hidden_states, loss_mask, loss_step_weights, **objective
    ) -> Eagle3Output:
        if verifier_last_hidden_states is None or loss_mask is None:
            raise ValueError("The loss needs `verifier_last_hidden_states` and `loss_mask` with `ttt_hidden_states`.")
        loss, kl, agree = losses.fused_ttt_kl(
            ttt_hidden_states,
            self.lm_head.weight,
            verifier_last_hidden_states,
            self.verifier_logits,
            loss_mask,
            loss_step_weights,
            **objective,
        )
        return Eagle3Output(loss=loss, step_kl=kl, step_agree=agree)

    def _prepare_attention_mask(self, mask, inputs_embeds, past_key_values, position_ids):
        if mask is None:
            make = create_sliding_window_causal_mask if self.config.sliding_window else create_causal_mask
            return make(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=None,
                past_key_values=past_key_values,
                position_ids=position_ids,
            )
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and self.config._attn_implementation == "eager":
            zero = torch.zeros((), dtype=inputs_embeds.dtype, device=mask.device)
            return torch.where(mask, zero, torch.finfo(inputs_embeds.dtype).min)  # additive mask for eager
        return mask

    # ------------------------------------------------------------------------------------- targets and drafting

    def draft_to_target_ids(self, draft_ids: torch.LongTensor) -> torch.LongTensor:
        """Map draft-vocabulary indices to verifier token ids (`j + d2t[j]`)."""
        return draft_ids if self.d2t is None else draft_ids + self.d2t[draft_ids]

    @torch.no_grad()
    def verifier_logits(self, verifier_last_hidden_states: torch.Tensor) -> torch.Tensor:
        """The verifier's own logits over the draft vocabulary from its *pre-norm* last hidden state: `[..., Ht]` ->
        `[..., Vd]` (its final norm, lm_head rows and logit transform; see `VerifierHead`)."""
        if self.verifier_head is None:
            raise UserError(VERIFIER_HEAD_MISSING)
        return self.verifier_head(verifier_last_hidden_states)

    @torch.no_grad()
    def draft(
        self,
        input_ids: torch.LongTensor,
        aux_hidden_states: torch.Tensor,
        num_tokens: int,
        past_key_values: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.LongTensor, Cache]:
        """Greedily draft `num_tokens` tokens after the prompt, returned as verifier token ids `[B, num_tokens]`.

        `input_ids[:, t]` is the token after verifier state `aux_hidden_states[:, t]` (the inputs are shifted by one,
        as in training). Pass the returned cache back in to extend a draft incrementally; the caller crops it (a
        parallel draft leaves its mask slots' keys after the rows: crop to the rows fed with verifier states).
        A parallel draft (`config.parallel_drafting`) drafts all tokens in one forward pass, as vLLM does (module
        docstring); a chained one runs one step per token.
        """
        past_key_values = past_key_values if past_key_values is not None else DynamicCache(config=self.config)
        if self.config.parallel_drafting:
            logits, past_key_values = self.parallel_logits(
                input_ids, aux_hidden_states, num_tokens, past_key_values, position_ids
            )
            return self.draft_to_target_ids(logits.argmax(-1)), past_key_values  # [B, K]
        out = self(
            input_ids,
            aux_hidden_states=aux_hidden_states,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
        )
        tokens = []
        for step in range(num_tokens):
            next_ids = self.draft_to_target_ids(out.logits[:, -1:].argmax(-1))  # [B, 1]
            tokens.append(next_ids)
            if step + 1 < num_tokens:
                out = self(
                    next_ids, hidden_states=out.hidden_states[:, -1:], past_key_values=past_key_values, use_cache=True
                )
        return torch.cat(tokens, dim=1), past_key_values

    @torch.no_grad()
    def parallel_logits(
        self,
        input_ids: torch.LongTensor,
        aux_hidden_states: torch.Tensor,
        num_tokens: int,
        past_key_values: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, Cache]:
        """Parallel drafting as vLLM computes it (module docstring): one causal forward over the rows (`input_ids`,
        `aux_hidden_states` as in `draft`) and `num_tokens - 1` mask slots after them, positions continuing the
        rows'. Returns the draft logits of the last row and the slots `[B, num_tokens, Vd]` (draft token i from
        output i) and the cache, which holds the slots' keys after the rows'."""
        B, T = input_ids.shape
        past_key_values = past_key_values if past_key_values is not None else DynamicCache(config=self.config)
        mask_ids, mask_states = self.mask_slot_inputs((B, num_tokens - 1))
        states = torch.cat([self.fuse(aux_hidden_states), mask_states.to(aux_hidden_states.dtype)], dim=1)
        if position_ids is not None:
            later = position_ids[:, -1:] + torch.arange(1, num_tokens, device=position_ids.device)
            position_ids = torch.cat([position_ids, later], dim=1)
        out = self(
            torch.cat([input_ids, mask_ids], dim=1),
            hidden_states=states,  # [B, T + K - 1, H]
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
        )
        return out.logits[:, T - 1 :], past_key_values

    # -------------------------------------------------------------------------------------------- vocab mapping

    def set_vocab_mapping(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install `d2t` (int64 offsets `[Vd]`) and `t2d` (bool `[V]`), checking that they agree with the config."""
        validate_vocab_mapping(d2t, t2d, self.config.draft_vocab_size, self.config.vocab_size)
        if self.d2t is None:
            return  # full vocabulary: identity mapping, nothing stored (as vLLM expects)
        self.d2t.copy_(torch.as_tensor(d2t, dtype=torch.long))
        self.t2d.copy_(torch.as_tensor(t2d, dtype=torch.bool))

    # --------------------------------------------------------------------------------------------- constructors

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint missing draft tensors is an error, not a warning.

        A draft without its `d2t` would silently map draft index `j` to verifier token `j` (vLLM does exactly that).
        """
        want_info = kwargs.pop("output_loading_info", False)
        missing_ok = set(kwargs.pop("missing_ok", ()))  # tensors the caller fills itself (export: the embedding)
        check_local_checkpoint(pretrained_model_name_or_path, config_given="config" in kwargs)
        research = "key_mapping" not in kwargs and is_research_checkpoint(pretrained_model_name_or_path)
        if research:  # the EAGLE authors' format names layer 0 `midlayer.*`
            kwargs["key_mapping"] = RESEARCH_KEY_MAPPING
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        if research:
            model._weight_conversions = []  # save_pretrained writes our names, never `midlayer.*` again
        missing = sorted(set(info["missing_keys"]) - missing_ok)
        if missing:
            raise UserError(
                f"Draft checkpoint {pretrained_model_name_or_path} is missing tensors {missing}; re-export it "
                "(Eagle3DraftModel.save_pretrained) or convert it with `speculators-hf export`."
            )
        return (model, info) if want_info else model

    @torch.no_grad()
    def load_verifier_head(
        self, verifier_name_or_path: str | None = None, init_lm_head: bool = False, trust_remote_code: bool = False
    ) -> None:
        """Attach the verifier's frozen head used for targets (its final norm and draft-vocabulary lm_head rows, run
        by its own CausalLM code; never saved).

        Reads only those tensors from the verifier's safetensors (default: the verifier recorded in the config).
        With `init_lm_head`, also initialise the embedding and the draft lm_head from the verifier (a new draft).
        `trust_remote_code`: run the code a verifier folder ships (its `auto_map`), only when the user said so.
        """
        path = verifier_name_or_path or self.config.verifier_name_or_path
        if not path:
            raise UserError("The draft config names no verifier: pass the verifier's id or folder.")
        verifier_config = pretrained_config(path, "verifier", trust_remote_code=trust_remote_code)
        Ht = self.config.target_hidden_size or self.config.hidden_size
        if verifier_config.get_text_config().hidden_size != Ht:
            raise UserError(
                f"Verifier {path} has hidden size {verifier_config.get_text_config().hidden_size}, the draft expects "
                f"{Ht}: it was built for another verifier."
            )
        target_ids = self.draft_to_target_ids(
            torch.arange(self.config.draft_vocab_size, device=self.lm_head.weight.device)
        )
        head = load_verifier_head(path, target_ids.cpu(), verifier_config, trust_remote_code=trust_remote_code)
        self.verifier_head = head.to(device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)
        self._keys_to_ignore_on_save = set(self._keys_to_ignore_on_save or ()) | {
            f"verifier_head.{key}" for key in head.state_dict()
        }
        if init_lm_head and Ht == self.config.hidden_size:  # a narrower draft keeps its own (trained) ones
            embed = load_verifier_tensors(path, verifier_config, roles=("embed_tokens",))["embed_tokens"]
            self.embed_tokens.weight.copy_(embed)
            self.lm_head.weight.copy_(head.rows.weight)

    @classmethod
    def from_verifier(
        cls,
        verifier_name_or_path: str,
        d2t: torch.Tensor | None = None,
        t2d: torch.Tensor | None = None,
        *,
        hub_id: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        **config_kwargs,
    ) -> Eagle3DraftModel:
        """A new draft for a verifier, reading only the tensors it needs from the verifier's safetensors.

        Args:
            verifier_name_or_path: hub id or local folder of the verifier.
            d2t, t2d: the vocabulary mapping (`speculators_hf.vocab`); without them the draft uses the full vocabulary.
            hub_id: the verifier id to record for `vllm serve` (default: `verifier_name_or_path` when it is not a
                local path; a local absolute path breaks when folders move).
            trust_remote_code: run the code a verifier folder ships (its `auto_map`), only when the user said so.
            **config_kwargs: `Eagle3Config.from_verifier` options (`num_hidden_layers`, `aux_layer_ids`, ...).
        """
        verifier_config = pretrained_config(verifier_name_or_path, "verifier", trust_remote_code=trust_remote_code)
        draft_vocab_size = len(d2t) if d2t is not None else None
        config = Eagle3Config.from_verifier(
            verifier_config,
            draft_vocab_size=draft_vocab_size,
            verifier_name_or_path=hub_id or recorded_verifier_name(verifier_name_or_path),
            **config_kwargs,
        )
        model = cls(config)
        if d2t is not None:
            model.set_vocab_mapping(torch.as_tensor(d2t), torch.as_tensor(t2d))
        model.load_verifier_head(verifier_name_or_path, init_lm_head=True, trust_remote_code=trust_remote_code)
        return model.to(torch_dtype)
