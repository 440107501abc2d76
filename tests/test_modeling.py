"""Eagle3Config / Eagle3DraftModel on the tiny kit: shapes, options, save/load, vLLM's format, verifier reads."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel

from speculators_hf import Eagle3Config, Eagle3DraftModel
from speculators_hf.modeling.configuration_eagle3 import default_aux_layer_ids
from speculators_hf.modeling.pretrained import expected_shapes, shape_problem
from speculators_hf.tiny_kit import tiny_llama_config, tiny_verifier
from speculators_hf.utils import UserError
from speculators_hf.vocab import build_vocab_mapping

V, H, VD = 2048, 64, 512


def mapping(vd=VD, v=V, seed=0):
    rng = np.random.default_rng(seed)
    freq = {int(t): int(rng.integers(1, 100)) for t in rng.choice(v, size=vd * 2, replace=False)}
    d2t, t2d = build_vocab_mapping(freq, vd, v)
    return torch.from_numpy(d2t), torch.from_numpy(t2d)


def inputs(config, B=2, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=g)
    aux = torch.randn(B, T, config.num_aux_layers * (config.target_hidden_size or config.hidden_size), generator=g)
    return ids, aux


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"norm_before_residual": False},
        {"norm_before_fc": True},
        {"norm_output": True},
        {"train_lm_head": False},
        {"fc_norm": True},
        {"fc_norm": True, "norm_before_fc": True},
        {"draft_layer_type": "qwen3"},
        {"hidden_size": 32, "intermediate_size": 96},  # narrower than the verifier (Ht = 64)
    ],
)
def test_forward_shapes_and_options(num_layers, options):
    config = Eagle3Config.from_verifier(
        tiny_llama_config(), draft_vocab_size=VD, num_hidden_layers=num_layers, **options
    )
    model = Eagle3DraftModel(config)
    ids, aux = inputs(config)
    out = model(ids, aux_hidden_states=aux)
    assert out.logits.shape == (2, 9, VD)
    assert out.hidden_states.shape == (2, 9, config.hidden_size)
    # carried state: post-norm exactly when norm_output
    rms = out.hidden_states.pow(2).mean(-1).sqrt()
    normed = torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    assert normed == bool(options.get("norm_output"))
    # a second step from the carried state works, and changes with it
    out2 = model(ids, hidden_states=out.hidden_states)
    assert out2.logits.shape == (2, 9, VD) and not torch.allclose(out2.logits, out.logits)
    assert model.lm_head.weight.requires_grad == options.get("train_lm_head", True)
    assert model.embed_tokens.weight.requires_grad == ("hidden_size" in options)  # a copy only at the same width
    assert config.target_hidden_size == (H if "hidden_size" in options else None)
    assert (model.input_norm is not None) == bool(options.get("norm_before_fc"))
    assert (model.fc_norm is not None) == bool(options.get("fc_norm"))
    q_norm = getattr(model.layers[-1].self_attn, "q_norm", None)
    assert (q_norm is not None) == (options.get("draft_layer_type") == "qwen3")
    assert len(model.layers) == num_layers


def test_norm_before_residual_changes_the_output():
    base = Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=VD)
    torch.manual_seed(0)
    a = Eagle3DraftModel(base)
    b = Eagle3DraftModel(
        Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=VD, norm_before_residual=False)
    )
    b.load_state_dict(a.state_dict())
    ids, aux = inputs(base)
    assert not torch.allclose(a(ids, aux_hidden_states=aux).logits, b(ids, aux_hidden_states=aux).logits)


def test_exactly_one_state_input():
    model = Eagle3DraftModel(Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=VD))
    ids, aux = inputs(model.config)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids)


def test_config_takes_shape_and_rope_from_verifier():
    verifier = tiny_llama_config(
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    )
    config = Eagle3Config.from_verifier(verifier, draft_vocab_size=VD)
    assert config.max_position_embeddings == 4096
    assert config.rope_parameters["rope_theta"] == 5e5
    assert (config.hidden_size, config.head_dim, config.num_key_value_heads) == (64, 32, 2)
    assert config.num_hidden_layers == 1
    assert config.eagle_aux_hidden_state_layer_ids == [1, 2, 3]
    with pytest.raises(UserError, match="max_position_embeddings"):
        Eagle3Config.from_verifier(verifier, max_position_embeddings=2048)


def test_narrow_draft_must_train_its_lm_head():
    with pytest.raises(UserError, match="cannot copy the verifier's 64-wide lm_head"):
        Eagle3Config.from_verifier(tiny_llama_config(), hidden_size=32, train_lm_head=False)


def test_default_aux_layer_ids():
    assert default_aux_layer_ids(32) == [2, 16, 29]  # Llama-3.1-8B, vLLM's default
    assert default_aux_layer_ids(36) == [2, 18, 33]
    assert default_aux_layer_ids(4) == [1, 2, 3]
    for n in range(4, 80):
        ids = default_aux_layer_ids(n)
        assert len(set(ids)) == 3 and all(0 < i < n for i in ids)


def test_aux_ids_out_of_range_rejected():
    with pytest.raises(UserError, match="has 4 decoder layers"):
        Eagle3Config.from_verifier(tiny_llama_config(), aux_layer_ids=[1, 2, 7])


def test_draft_vocab_larger_than_vocab_rejected():
    with pytest.raises(UserError, match="draft_vocab_size"):
        Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=V + 1)


def test_save_load_identical_logits_and_vllm_format(tmp_path, tiny_verifier_path):
    d2t, t2d = mapping()
    model = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), d2t, t2d, hub_id="org/tiny-verifier")
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    expected = {
        "d2t": ((VD,), "I64"),
        "t2d": ((V,), "BOOL"),
        "embed_tokens.weight": ((V, H), "F32"),
        "fc.weight": ((H, 3 * H), "F32"),
        "layers.0.hidden_norm.weight": ((H,), "F32"),
        "layers.0.input_layernorm.weight": ((H,), "F32"),
        "layers.0.post_attention_layernorm.weight": ((H,), "F32"),
        "layers.0.self_attn.q_proj.weight": ((4 * 32, 2 * H), "F32"),
        "layers.0.self_attn.k_proj.weight": ((2 * 32, 2 * H), "F32"),
        "layers.0.self_attn.v_proj.weight": ((2 * 32, 2 * H), "F32"),
        "layers.0.self_attn.o_proj.weight": ((H, 4 * 32), "F32"),
        "layers.0.mlp.gate_proj.weight": ((192, H), "F32"),
        "layers.0.mlp.up_proj.weight": ((192, H), "F32"),
        "layers.0.mlp.down_proj.weight": ((H, 192), "F32"),
        "norm.weight": ((H,), "F32"),
        "lm_head.weight": ((VD, H), "F32"),
    }
    assert shapes == expected  # nothing more (no verifier_* copies), nothing less

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0] == {
        "proposal_type": "greedy",
        "speculative_tokens": 3,
        "verifier_accept_k": 1,
        "accept_tolerance": 0.0,
    }
    assert spec["verifier"] == {"name_or_path": "org/tiny-verifier", "architectures": ["LlamaForCausalLM"]}
    layer = config["transformer_layer_config"]
    for key, value in {
        "model_type": "llama",
        "hidden_size": H,
        "intermediate_size": 192,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "vocab_size": V,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }.items():
        assert layer[key] == value, key
    assert layer["rope_parameters"]["rope_theta"] == 10000.0
    assert config["draft_vocab_size"] == VD
    assert config["norm_before_residual"] is True
    assert config["target_hidden_size"] is None
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert config["architectures"] == ["Eagle3DraftModel"]

    reloaded = Eagle3DraftModel.from_pretrained(tmp_path)
    ids, aux = inputs(model.config)
    torch.testing.assert_close(
        reloaded(ids, aux_hidden_states=aux).logits, model(ids, aux_hidden_states=aux).logits, rtol=0, atol=0
    )
    assert torch.equal(reloaded.d2t, d2t) and torch.equal(reloaded.t2d, t2d)
    # The Auto classes know the format too.
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Eagle3Config)
    assert isinstance(AutoModel.from_pretrained(tmp_path), Eagle3DraftModel)


def test_full_vocab_draft_has_no_mapping(tmp_path, tiny_verifier_path):
    model = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), hub_id="org/v")
    assert model.d2t is None and model.config.draft_vocab_size == V
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "d2t" not in f.keys() and "t2d" not in f.keys()  # vLLM then has no draft_id_to_target_id


def test_vocab_mapping_semantics(tiny_verifier_path):
    d2t, t2d = mapping()
    model = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), d2t, t2d)
    j = torch.arange(VD)
    targets = model.draft_to_target_ids(j)
    assert torch.equal(targets, j + d2t)
    assert int(model.t2d.sum()) == VD
    assert torch.equal(torch.nonzero(model.t2d).flatten(), targets)  # exactly the marked ids, ascending


def test_from_verifier_reads_the_right_rows(tiny_verifier_path):
    from transformers import LlamaForCausalLM

    verifier = LlamaForCausalLM.from_pretrained(tiny_verifier_path)
    d2t, t2d = mapping()
    model = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), d2t, t2d)
    targets = torch.arange(VD) + d2t
    assert torch.equal(model.embed_tokens.weight, verifier.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, verifier.lm_head.weight[targets])
    head = model.verifier_head.state_dict()
    assert set(head) == {"model.norm.weight", "lm_head.weight"}  # the verifier's own names, nothing else
    assert torch.equal(head["lm_head.weight"], verifier.lm_head.weight[targets])
    assert torch.equal(head["model.norm.weight"], verifier.model.norm.weight)
    # Targets: verifier logits restricted to the draft vocabulary, from the pre-norm last state.
    h = torch.randn(3, H)
    full = verifier.lm_head(verifier.model.norm(h))
    torch.testing.assert_close(model.verifier_logits(h), full[:, targets])


def test_from_verifier_never_touches_layer_shards(tmp_path, tiny_verifier_path):
    """Delete every shard that holds no embedding/norm/lm_head: the draft must still build."""
    copy = tmp_path / "verifier"
    shutil.copytree(tiny_verifier_path, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {index[k] for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    removed = set(index.values()) - needed
    assert removed, "the tiny verifier should have layer-only shards"
    for name in removed:
        (copy / name).unlink()
    model = Eagle3DraftModel.from_verifier(str(copy), *mapping())
    assert model.lm_head.weight.abs().sum() > 0


def test_from_verifier_tied_embeddings():
    path = tiny_verifier("random", tie_word_embeddings=True)
    from safetensors.torch import load_file

    tensors = {}
    for f in path.glob("*.safetensors"):
        tensors.update(load_file(f))
    assert "lm_head.weight" not in tensors
    d2t, t2d = mapping()
    model = Eagle3DraftModel.from_verifier(str(path), d2t, t2d)
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"][torch.arange(VD) + d2t])


def test_mapping_size_mismatch_rejected(tiny_verifier_path):
    d2t, t2d = mapping(v=V)
    with pytest.raises(UserError, match="t2d has 1024 entries"):
        Eagle3DraftModel.from_verifier(str(tiny_verifier_path), d2t, t2d[:1024])
    bad = d2t.clone()
    bad[0] += 1  # now target ids disagree with t2d
    with pytest.raises(UserError, match="disagree"):
        Eagle3DraftModel.from_verifier(str(tiny_verifier_path), bad, t2d)


def test_research_format_config_loads():
    flat = {**tiny_llama_config().to_dict(), "num_hidden_layers": 1, "draft_vocab_size": VD}
    config = Eagle3Config.from_dict(flat)
    assert config.draft_vocab_size == VD and config.num_hidden_layers == 1 and config.hidden_size == H
    # the EAGLE authors' layer: residual = h (vLLM reads a flat config without the key as False)
    assert config.norm_before_residual is False
    assert Eagle3Config.from_dict({**flat, "norm_before_residual": True}).norm_before_residual is True


def test_gradient_checkpointing_and_backward():
    model = Eagle3DraftModel(Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=VD, num_hidden_layers=2))
    model.gradient_checkpointing_enable()
    model.train()
    ids, aux = inputs(model.config)
    model(ids, aux_hidden_states=aux).logits.sum().backward()
    assert model.fc.weight.grad is not None and model.layers[1].mlp.up_proj.weight.grad is not None
    assert model.embed_tokens.weight.grad is None


@pytest.mark.parametrize("num_layers", [1, 2])  # 1 (the default): no plain LlamaDecoderLayer to find
def test_fsdp_wrap_finds_the_decoder_layers(num_layers):
    from accelerate.utils.dataclasses import get_module_class_from_name

    config = Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=VD, num_hidden_layers=num_layers)
    model = Eagle3DraftModel(config)
    classes = {get_module_class_from_name(model, name) for name in model._no_split_modules}
    assert None not in classes
    assert all(isinstance(layer, tuple(classes)) for layer in model.layers)


def test_draft_returns_verifier_ids_and_matches_stepwise(tiny_verifier_path):
    d2t, t2d = mapping()
    model = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), d2t, t2d).eval()
    ids, aux = inputs(model.config, B=1, T=6)
    tokens, cache = model.draft(ids, aux, num_tokens=3)
    assert tokens.shape == (1, 3) and bool(t2d[tokens].all())
    assert cache.get_seq_length() == 6 + 2
    # Same first token without a cache (full causal forward).
    first = model.draft_to_target_ids(model(ids, aux_hidden_states=aux).logits[:, -1].argmax(-1))
    assert int(first) == int(tokens[0, 0])


def test_sdpa_and_eager_agree():
    config = Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=VD)
    torch.manual_seed(0)
    sdpa = Eagle3DraftModel(config)
    eager_config = Eagle3Config.from_dict(config.to_dict())
    eager_config._attn_implementation = "eager"
    eager = Eagle3DraftModel(eager_config)
    eager.load_state_dict(sdpa.state_dict())
    ids, aux = inputs(config)
    T = ids.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(2, 1, T, T)
    torch.testing.assert_close(
        sdpa(ids, aux_hidden_states=aux, attention_mask=mask).logits,
        eager(ids, aux_hidden_states=aux, attention_mask=mask).logits,
        rtol=1e-4,
        atol=1e-5,
    )
    torch.testing.assert_close(
        sdpa(ids, aux_hidden_states=aux).logits,
        sdpa(ids, aux_hidden_states=aux, attention_mask=mask).logits,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("drop", ["d2t", "t2d", "fc.weight", "layers.0.hidden_norm.weight"])
def test_checkpoint_missing_tensors_is_an_error(tmp_path, drop):
    from safetensors.torch import load_file, save_file

    model = Eagle3DraftModel(Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=VD))
    model.set_vocab_mapping(*mapping())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[drop]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"missing tensors.*{drop}"):
        Eagle3DraftModel.from_pretrained(tmp_path)


def test_sliding_window_training_masks_equal_windowed_drafting():
    """A windowed draft: the TTT step-0/step-1 logits under the trainer's masks equal what the draft computes when
    drafting incrementally (prefill, then one step from the carried state) with its own windowed causal attention."""
    from transformers.cache_utils import DynamicCache

    from speculators_hf.modeling.losses import shift_for_step, ttt_attention_mask

    W, T = 4, 10
    config = Eagle3Config.from_verifier(tiny_llama_config(), draft_vocab_size=VD, sliding_window=W)
    assert config.to_dict()["transformer_layer_config"]["layer_types"] == ["sliding_attention"]
    torch.manual_seed(0)
    model = Eagle3DraftModel(config).eval()
    ids, aux = inputs(config, B=1, T=T)
    docs, pos = torch.zeros(1, T, dtype=torch.long), torch.arange(T)[None]

    def ttt(window):
        cache, step0 = DynamicCache(), ttt_attention_mask(docs, 0, sliding_window=window)
        out0 = model(ids, aux_hidden_states=aux, position_ids=pos, attention_mask=step0, past_key_values=cache)
        mask1 = ttt_attention_mask(docs, 1, step0, sliding_window=window)
        out1 = model(shift_for_step(ids, 1), hidden_states=out0.hidden_states, position_ids=pos + 1,
                     attention_mask=mask1, past_key_values=cache)  # fmt: skip
        return out0.logits[0], out1.logits[0]

    with torch.no_grad():
        step0, step1 = ttt(W)
        unwindowed = ttt(None)[1]
        next_ids = shift_for_step(ids, 1)
        for t in range(T - 1):
            cache = DynamicCache(config=config)
            pre = model(ids[:, : t + 1], aux_hidden_states=aux[:, : t + 1], past_key_values=cache, use_cache=True)
            torch.testing.assert_close(pre.logits[0, t], step0[t])
            one = model(next_ids[:, t : t + 1], hidden_states=pre.hidden_states[:, t:], past_key_values=cache)
            torch.testing.assert_close(one.logits[0, 0], step1[t])
    assert not torch.allclose(unwindowed[W:], step1[W:])  # the window does change what later rows see


@pytest.mark.parametrize("options", [{}, {"norm_output": True}, {"sliding_window": 4}, {"num_hidden_layers": 2}])
def test_ttt_training_steps_equal_incremental_drafting(tiny_verifier_path, options):
    """The TTT unroll training runs (all rows at once: step k fed ground-truth tokens shifted by k, positions + k, the
    step-k mask and the previous step's states) gives, at every row t, the logits that drafting gives when it extends
    the prefix 0..t step by step with a KV cache (as our engine and vLLM draft), fed the same tokens."""
    from transformers import DynamicCache

    from speculators_hf.modeling.losses import shift_for_step, ttt_attention_mask
    from speculators_hf.training.ttt_cache import TTTCache

    d2t, t2d = mapping()
    torch.manual_seed(0)
    model = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), d2t, t2d, **options).eval()
    T, K = 10, 3
    ids, aux = inputs(model.config, B=1, T=T)
    positions = torch.arange(T)[None]
    document_ids = torch.zeros(1, T, dtype=torch.long)
    window = model.config.sliding_window
    with torch.no_grad():
        cache, hidden, trained = TTTCache(), None, []
        step0 = ttt_attention_mask(document_ids, 0, sliding_window=window)
        for k in range(K):
            out = model(
                input_ids=shift_for_step(ids, k),
                aux_hidden_states=aux if k == 0 else None,
                hidden_states=hidden,
                position_ids=positions + k,
                attention_mask=ttt_attention_mask(document_ids, k, step0, sliding_window=window),
                past_key_values=cache.step(k),
                use_cache=True,
            )
            trained.append(out.logits[0])  # [T, Vd]
            hidden = out.hidden_states
        for t in range(T - K + 1):  # rows whose K teacher-forced tokens all exist
            kv = DynamicCache()
            out = model(ids[:, : t + 1], aux_hidden_states=aux[:, : t + 1], past_key_values=kv, use_cache=True)
            for k in range(K):
                if k:
                    out = model(ids[:, t + k : t + k + 1], hidden_states=out.hidden_states[:, -1:], past_key_values=kv,
                                use_cache=True)  # fmt: skip
                torch.testing.assert_close(out.logits[0, -1], trained[k][t], atol=1e-5, rtol=1e-5)


def test_a_pretrained_draft_may_lack_only_an_embedding_it_can_share():
    """A published draft without `embed_tokens.weight` gets the verifier's (as vLLM shares it), unless it is narrower
    than the verifier: then its embedding is its own and must be there."""
    verifier = tiny_llama_config()
    for config, problem in (
        (Eagle3Config.from_verifier(verifier, aux_layer_ids=[1, 2, 3]), None),
        (
            Eagle3Config.from_verifier(verifier, aux_layer_ids=[1, 2, 3], hidden_size=32, head_dim=16),
            "has no tensor embed_tokens.weight",
        ),
    ):
        shapes = expected_shapes(config)
        assert shape_problem(config, shapes) is None
        shapes.pop("embed_tokens.weight")
        assert shape_problem(config, shapes) == problem
        shapes["fc.weight"] = [1, 1]
        assert shape_problem(config, shapes).startswith("fc.weight has shape [1, 1], its config.json says")
