"""Export checks: the served checkpoint is exactly what vLLM's eagle3 loader reads; bad ones get one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from speculators_hf.export import check_checkpoint, expected_tensors, export_checkpoint, find_problems
from speculators_hf.modeling import Eagle3Config, Eagle3DraftModel
from speculators_hf.utils import UserError
from speculators_hf.vocab import build_vocab_mapping


@pytest.fixture(scope="module")
def draft_dir(tiny_verifier_path, tmp_path_factory):
    freq = {i: (i * 7919) % 1013 + 1 for i in range(0, 2048, 3)}  # some token counts, ~680 distinct ids
    d2t, t2d = build_vocab_mapping(freq, 1024, 2048)
    torch.manual_seed(0)
    draft = Eagle3DraftModel.from_verifier(
        str(tiny_verifier_path),
        torch.from_numpy(d2t),
        torch.from_numpy(t2d),
        hub_id="org/tiny-verifier",
        aux_layer_ids=[1, 2, 3],
    )
    out = tmp_path_factory.mktemp("export") / "draft"
    draft.save_pretrained(out)
    return out


def _copy_with(draft_dir, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(draft_dir, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


def _logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2048, (1, 7), generator=g)
    aux = torch.randn(1, 7, 3 * 64, generator=g)
    with torch.no_grad():
        return model(ids, aux_hidden_states=aux).logits


def test_saved_checkpoint_is_exactly_what_vllm_reads(draft_dir):
    assert check_checkpoint(draft_dir) == []
    config = json.loads((draft_dir / "config.json").read_text())
    tensors = load_file(draft_dir / "model.safetensors")
    expected = expected_tensors(config)
    assert set(tensors) == set(expected)
    assert {"d2t", "t2d", "layers.0.hidden_norm.weight", "fc.weight", "lm_head.weight"} <= set(tensors)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert tuple(tensors["fc.weight"].shape) == (64, 192) and tuple(tensors["lm_head.weight"].shape) == (1024, 64)
    assert int(tensors["t2d"].sum()) == 1024
    target = torch.arange(1024) + tensors["d2t"]
    assert torch.equal(target, torch.nonzero(tensors["t2d"]).flatten())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "org/tiny-verifier"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: (t.pop("d2t"), t.pop("t2d")), "d2t is missing although draft_vocab_size 1024 != vocab_size 2048"),
        (lambda t: t.pop("fc.weight"), "missing tensors ['fc.weight']"),
        (lambda t: t.update(d2t=t["d2t"].int()), "d2t has dtype torch.int32, expected int64"),
        (lambda t: t.update(t2d=torch.roll(t["t2d"], 1)), "d2t and t2d disagree"),
        (
            lambda t: t.update({"midlayer.hidden_norm.weight": t.pop("layers.0.hidden_norm.weight")}),
            "unexpected tensors ['midlayer.hidden_norm.weight']",
        ),
        (lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:512]}), "lm_head.weight has shape [512, 64]"),
    ],
    ids=["no-d2t", "missing-fc", "d2t-int32", "t2d-shifted", "research-name", "lm-head-rows"],
)
def test_bad_checkpoints_get_one_line_errors(draft_dir, tmp_path, edit, message):
    bad = _copy_with(draft_dir, tmp_path, edit)
    with pytest.raises(UserError) as err:
        check_checkpoint(bad)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_config_problems_are_found(draft_dir, tmp_path):
    out = tmp_path / "cfg"
    shutil.copytree(draft_dir, out)
    config = json.loads((out / "config.json").read_text())
    del config["eagle_aux_hidden_state_layer_ids"]
    config["speculators_config"]["verifier"]["name_or_path"] = "/abs/path/verifier"
    (out / "config.json").write_text(json.dumps(config))
    errors, warnings = find_problems(out)
    assert any("eagle_aux_hidden_state_layer_ids is missing" in e for e in errors)
    assert any("local path /abs/path/verifier" in w for w in warnings)


def test_full_vocab_draft_has_no_mapping(tiny_verifier_path, tmp_path):
    draft = Eagle3DraftModel.from_verifier(str(tiny_verifier_path), hub_id="org/v", aux_layer_ids=[1, 2, 3])
    draft.save_pretrained(tmp_path / "full")
    assert check_checkpoint(tmp_path / "full") == []
    assert "d2t" not in load_file(tmp_path / "full" / "model.safetensors")
    bad = _copy_with(tmp_path / "full", tmp_path, lambda t: t.update(d2t=torch.zeros(2048, dtype=torch.long)))
    with pytest.raises(UserError, match="full draft vocabulary: vLLM expects no d2t/t2d"):
        check_checkpoint(bad)


def _research_folder(draft_dir, tmp_path, **config_changes):
    """Our checkpoint rewritten in the EAGLE authors' research format: flat config, `midlayer.*`, no embedding; our
    draft's `norm_before_residual` (True) is written out, since a flat config without it means False."""
    config = json.loads((draft_dir / "config.json").read_text())
    layer = config["transformer_layer_config"]
    flat = {k: v for k, v in layer.items() if k not in ("model_type", "rope_parameters")}
    flat.update(
        architectures=["LlamaForCausalLMEagle3"],
        model_type="llama",
        draft_vocab_size=1024,
        max_position_embeddings=256,
        rope_theta=layer["rope_parameters"]["rope_theta"],
        torch_dtype="float32",
        norm_before_residual=True,
    )
    flat = {k: v for k, v in {**flat, **config_changes}.items() if v is not None}
    out = tmp_path / "research"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(flat))
    tensors = load_file(draft_dir / "model.safetensors")
    tensors.pop("embed_tokens.weight")
    renamed = {k.replace("layers.0.", "midlayer."): v for k, v in tensors.items()}
    torch.save(renamed, out / "pytorch_model.bin")
    return out


def test_research_checkpoint_converts_to_served_format(draft_dir, tiny_verifier_path, tmp_path):
    research = _research_folder(draft_dir, tmp_path)
    out, _ = export_checkpoint(
        research, tmp_path / "converted", verifier_hub_id="org/tiny-verifier", verifier=str(tiny_verifier_path)
    )
    config = json.loads((out / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # [2, n//2, n-3] made distinct for n=4
    assert config["transformer_layer_config"]["max_position_embeddings"] == 2048  # raised to the verifier's
    assert config["speculators_config"]["verifier"]["name_or_path"] == "org/tiny-verifier"
    ours, converted = load_file(draft_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(ours) == set(converted)
    assert all(torch.equal(ours[k], converted[k]) for k in ours)  # embedding restored from the verifier


def test_research_checkpoint_without_norm_before_residual_is_the_authors_layer(
    draft_dir, tiny_verifier_path, tmp_path
):
    """A flat config without `norm_before_residual` is the EAGLE authors' layer (residual = h), which is how vLLM
    runs a flat config; the export must say so, since vLLM reads a speculators config without the key as True."""
    research = _research_folder(draft_dir, tmp_path, norm_before_residual=None)
    assert "norm_before_residual" not in json.loads((research / "config.json").read_text())
    out, _ = export_checkpoint(
        research, tmp_path / "converted", verifier_hub_id="org/tiny-verifier", verifier=str(tiny_verifier_path)
    )
    assert json.loads((out / "config.json").read_text())["norm_before_residual"] is False
    assert Eagle3Config.from_pretrained(research).norm_before_residual is False


def test_research_checkpoint_loads_with_from_pretrained(draft_dir, tmp_path):
    research = _research_folder(draft_dir, tmp_path)
    shutil.copy(draft_dir / "model.safetensors", tmp_path / "ours.safetensors")
    tensors = torch.load(research / "pytorch_model.bin", weights_only=True)
    tensors["embed_tokens.weight"] = load_file(draft_dir / "model.safetensors")["embed_tokens.weight"]
    torch.save(tensors, research / "pytorch_model.bin")
    config = json.loads((research / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = [1, 2, 3]
    (research / "config.json").write_text(json.dumps(config))
    model = Eagle3DraftModel.from_pretrained(research)
    reference = Eagle3DraftModel.from_pretrained(draft_dir)
    assert torch.equal(_logits(model), _logits(reference))
    model.save_pretrained(tmp_path / "resaved")
    names = set(load_file(tmp_path / "resaved" / "model.safetensors"))
    assert "layers.0.hidden_norm.weight" in names and not any(n.startswith("midlayer.") for n in names)


def test_cli_sets_verifier_id_and_reports_errors_in_one_line(draft_dir, tmp_path):
    cmd = [str(Path(sys.executable).with_name("speculators-hf")), "export"]
    done = subprocess.run(
        cmd
        + [
            "--checkpoint",
            str(draft_dir),
            "--output-dir",
            str(tmp_path / "out"),
            "--verifier-hub-id",
            "my-org/verifier",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert any(line.startswith("OK ") for line in done.stdout.splitlines()), done.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "my-org/verifier"
    assert json.loads((draft_dir / "config.json").read_text())["speculators_config"]["verifier"]["name_or_path"] == (
        "org/tiny-verifier"
    )  # the source is untouched

    bad = _copy_with(draft_dir, tmp_path, lambda t: (t.pop("d2t"), t.pop("t2d")))
    done = subprocess.run(cmd + ["--checkpoint", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("speculators-hf")]
    assert len(lines) == 1 and "d2t is missing" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "options, config_says",
    [
        ({"fc_norm": True, "norm_before_fc": True}, {"fc_norm": True, "norm_before_fc": True}),
        ({"draft_layer_type": "qwen3"}, {"transformer_layer_config.model_type": "qwen3"}),
        ({"hidden_size": 32, "intermediate_size": 96}, {"target_hidden_size": 64}),
    ],
)
def test_draft_options_are_written_for_vllm_and_reload(tiny_verifier_path, tmp_path, options, config_says):
    """Eagle-3.1 norms, the Qwen3-style layer and a narrower draft: the config says so (as vLLM reads it), every
    tensor vLLM loads is there, and from_pretrained gives back the same model."""
    torch.manual_seed(0)
    draft = Eagle3DraftModel.from_verifier(
        str(tiny_verifier_path), hub_id="org/tiny", aux_layer_ids=[1, 2, 3], **options
    )
    draft.save_pretrained(tmp_path / "draft")
    assert check_checkpoint(tmp_path / "draft") == []
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    for key, value in config_says.items():
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    tensors = load_file(tmp_path / "draft" / "model.safetensors")
    assert set(tensors) == set(expected_tensors(config))
    if options.get("fc_norm"):
        assert {"fc_norm.0.weight", "fc_norm.2.weight", "input_norm.weight"} <= set(tensors)
    if options.get("draft_layer_type") == "qwen3":
        assert tuple(tensors["layers.0.self_attn.q_norm.weight"].shape) == (32,)
    loaded = Eagle3DraftModel.from_pretrained(tmp_path / "draft")
    torch.testing.assert_close(_logits(loaded), _logits(draft.eval()))
