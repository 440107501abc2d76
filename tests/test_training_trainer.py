"""Eagle3Trainer on the tiny verifier kit (CPU): learning, checkpoints, packing isolation, input errors, loggers."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speculators_hf.commandline import make_parser, parse
from speculators_hf.formats.shards import shard_name, write_index, write_shard
from speculators_hf.modeling import Eagle3DraftModel
from speculators_hf.pipeline import Pipeline, PipelineArguments
from speculators_hf.runstate import STATE_DIR
from speculators_hf.training import Eagle3ModelArguments, Eagle3Trainer, Eagle3TrainingArguments
from speculators_hf.training.cli import main
from speculators_hf.training.collator import DataCollatorForEagle3
from speculators_hf.training.setup import build_datasets, build_draft
from speculators_hf.utils import UserError
from speculators_hf.vocab import build_vocab_mapping
from tests.training_data import loss_and_grads, make_training_data, save_bad_vocab, train_argv


@pytest.fixture(scope="module")
def peaked_data(peaked_verifier_path, tmp_path_factory):
    return make_training_data(peaked_verifier_path, tmp_path_factory.mktemp("data"), num_samples=32)


def parse_args(argv):
    return parse(make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)), argv)[:2]


def test_training_learns_and_writes_loadable_epoch_drafts_within_the_save_limit(
    peaked_verifier_path, peaked_data, tmp_path
):
    save = tmp_path / "ckpt"
    model_args, args = parse_args(
        train_argv(
            peaked_verifier_path,
            peaked_data,
            save,
            "--epochs",
            "4",
            "--lr",
            "2e-3",
            "--eval-split",
            "0.25",
            "--eval-on-start",
            "true",
            "--logging-steps",
            "2",
            "--save-total-limit",
            "1",
        )
    )
    train_ds, eval_ds, layer_ids = build_datasets(model_args, args)
    model = build_draft(model_args, train_ds, layer_ids, seed=args.seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = Eagle3Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds)
    trainer.train()

    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"Parameter {n} has not changed."
    train_logs = [h for h in trainer.state.log_history if "loss_0" in h]
    evals = [h for h in trainer.state.log_history if "eval_acc_0" in h]
    assert {"acc_1", "cond_acc_2", "tau_sim", "tokens_per_second", "loss_2"} <= set(train_logs[0])
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    assert evals[-1]["eval_acc_0"] > evals[0]["eval_acc_0"] + 0.05, evals  # trained beats untrained, held out
    assert evals[-1]["eval_tau_sim"] > evals[0]["eval_tau_sim"]

    # --save-total-limit 1: only the newest epoch draft and the newest resume state stay on disk
    drafts_and_states = [p.name for p in save.iterdir() if p.is_dir() and p.name != STATE_DIR]  # not the run's record
    assert sorted(drafts_and_states) == ["3", f"checkpoint-{trainer.state.global_step}"]
    draft = Eagle3DraftModel.from_pretrained(save / "3")
    assert torch.equal(draft.d2t, model.d2t) and torch.equal(draft.fc.weight, model.fc.weight)
    assert draft.config.eagle_aux_hidden_state_layer_ids == [1, 2, 3]
    assert json.loads((save / "3" / "training_config.json").read_text())["loss_mask_alignment"] == "predicted"


def test_packing_does_not_leak_across_documents(tiny_verifier_path, peaked_data, tmp_path):
    model_args, args = parse_args(train_argv(tiny_verifier_path, peaked_data, tmp_path, "--ttt-steps", "3"))
    train_ds, _, layer_ids = build_datasets(model_args, args)
    model = build_draft(model_args, train_ds, layer_ids).eval()
    trainer = Eagle3Trainer(model=model, args=args, train_dataset=train_ds)
    a, b = train_ds.dataset[0], train_ds.dataset[1]
    b_changed = {
        **b,
        "input_ids": torch.flip(b["input_ids"], [0]),
        "hidden_states": torch.randn_like(b["hidden_states"]),
    }
    a_only = {**a}

    def loss_of_a(first, second):
        collator = DataCollatorForEagle3(total_seq_len=256)
        batch = collator([[first, {**second, "loss_mask": torch.zeros_like(second["loss_mask"])}]])
        with torch.no_grad():
            return trainer.compute_loss(model, batch).item()

    reference = loss_of_a(a_only, b)
    assert loss_of_a(a_only, b_changed) == pytest.approx(reference, rel=1e-5, abs=1e-6)
    # and document a is not "alone" by accident: with b's mask on, the loss moves
    collator = DataCollatorForEagle3(total_seq_len=256)
    with torch.no_grad():
        both = trainer.compute_loss(model, collator([[a, b_changed]])).item()
    assert both != pytest.approx(reference)


def test_sdpa_and_eager_attention_give_the_same_loss_and_gradients(tiny_verifier_path, peaked_data, tmp_path):
    """The dense TTT mask means the same through sdpa (bool mask) and eager (additive mask); the GPU twin of this test
    compares FlexAttention's BlockMask path (tests/gpu/test_training_gpu.py)."""
    model_args, args = parse_args(train_argv(tiny_verifier_path, peaked_data, tmp_path, "--ttt-steps", "3"))
    train_ds, _, layer_ids = build_datasets(model_args, args)
    trainer = Eagle3Trainer(model=build_draft(model_args, train_ds, layer_ids), args=args, train_dataset=train_ds)
    samples = train_ds.dataset
    batch = DataCollatorForEagle3(total_seq_len=256)([[samples[0], samples[1]], [samples[2]]])  # 2 packed rows
    loss_sdpa, grads_sdpa = loss_and_grads(trainer, batch, "sdpa")
    loss_eager, grads_eager = loss_and_grads(trainer, batch, "eager")
    assert loss_sdpa.item() > 0
    torch.testing.assert_close(loss_eager, loss_sdpa, rtol=1e-5, atol=1e-6)
    assert grads_sdpa.keys() == grads_eager.keys() and "fc.weight" in grads_sdpa
    for name in grads_sdpa:
        torch.testing.assert_close(grads_eager[name], grads_sdpa[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bad_inputs_give_one_line_errors(peaked_verifier_path, peaked_data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_hidden = tmp_path / "bad_hidden"
    sample = {
        "input_ids": torch.arange(20),
        "loss_mask": torch.ones(20, dtype=torch.long),
        "hidden_states": torch.randn(20, 4, 32),
    }
    write_index(bad_hidden, {"shards": [write_shard(bad_hidden / shard_name(0), [sample], [0])]})
    bad_vocab = save_bad_vocab(tmp_path / "vocab")
    cases = {
        "empty": train_argv(peaked_verifier_path, empty, tmp_path / "c1"),
        "size 32": train_argv(peaked_verifier_path, bad_hidden, tmp_path / "c2"),
        "t2d has 1000": train_argv(
            peaked_verifier_path,
            peaked_data,
            tmp_path / "c3",
            "--d2t-path",
            str(bad_vocab / "d2t.npy"),
            "--t2d-path",
            str(bad_vocab / "t2d.npy"),
        ),
        "--total-seq-len 16": train_argv(peaked_verifier_path, peaked_data, tmp_path / "c4")
        + ["--total-seq-len", "16"],
    }
    for expected, argv in cases.items():
        assert main(argv) == 2, expected
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
        assert len(err) == 1 and err[0].startswith("speculators-hf train: error:"), (expected, err)
        assert "no datagen shards" in err[0].lower() or expected in err[0], (expected, err)
        assert not (tmp_path / f"c{list(cases).index(expected) + 1}").exists()  # nothing trained or written

    # the same through the console script: non-zero exit, one stderr line, no traceback
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from speculators_hf.cli import main; raise SystemExit(main())",
            "train",
            *cases["empty"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def _logger_param(name: str):
    """A logger needs its optional extra (`pip install 'speculators_hf[NAME]'`): skipped, with why, without it."""
    missing = importlib.util.find_spec(name) is None
    reason = f"{name} is not installed (pip install 'speculators_hf[{name}]')"
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=reason))


@pytest.mark.parametrize("logger", [_logger_param(name) for name in ("tensorboard", "wandb", "trackio")])
def test_each_logger_writes_locally(logger, tiny_verifier_path, peaked_data, tmp_path, monkeypatch):
    for var in ("TENSORBOARD_LOGGING_DIR", "WANDB_DIR", "TRACKIO_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    log_dir = tmp_path / "logs"
    argv = train_argv(
        tiny_verifier_path,
        peaked_data,
        tmp_path / "ckpt",
        "--max-steps",
        "2",
        "--logger",
        logger,
        "--log-dir",
        str(log_dir),
        "--run-name",
        "t",
        "--save-strategy",
        "no",
    )
    assert main(argv) == 0
    files = [p for p in log_dir.rglob("*") if p.is_file()]
    assert files, f"{logger} wrote nothing under {log_dir}"


def test_a_logger_that_is_not_installed_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # what `import trackio` sees where the extra is not installed
    with pytest.raises(
        UserError, match=r"--logger trackio: trackio is not installed; pip install 'speculators_hf\[trackio\]'"
    ):
        Eagle3TrainingArguments(output_dir=str(tmp_path), report_to="trackio")


def test_final_draft_when_training_ends_mid_epoch_and_resume_checks_inputs(
    tiny_verifier_path, peaked_data, tmp_path, capsys
):
    save = tmp_path / "checkpoints"  # where the pipeline trains
    # 8 of the 32 samples train (3 rows of 256 tokens per epoch): 5 steps end inside the second epoch; checkpoints
    # every 2 steps only, so no epoch ever ends on a save
    base = train_argv(tiny_verifier_path, peaked_data, save, "--epochs", "3", "--eval-split", "0.75")
    argv = base + ["--eval-strategy", "no", "--max-steps", "5", "--save-strategy", "steps", "--save-steps", "2"]
    argv += ["--save-total-limit", "0"]
    assert main(argv) == 0
    final = json.loads((save / "1" / "training_config.json").read_text())
    assert final["global_step"] == 5 and 1 < final["epoch"] < 2, final  # the partial second epoch's draft: 1/
    assert Pipeline(PipelineArguments(output_dir=str(tmp_path))).final_checkpoint() == save / "1"
    Eagle3DraftModel.from_pretrained(save / "1")
    assert {p.name for p in save.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4", "checkpoint-5"}

    def error_of(argv) -> str:
        assert main(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(lines) == 1, lines
        return lines[0]

    before = {p: p.stat().st_mtime_ns for p in save.rglob("*")}
    # other hyperparameters or other data: no silent resume of the old run (nor a silent no-op when it finished)
    assert "(--learning-rate changed since checkpoint-5)" in error_of(argv + ["--lr", "5e-4"])
    other_data = shutil.copytree(peaked_data, tmp_path / "other")  # the same data less its last shard
    index = json.loads((other_data / "index.json").read_text())
    (other_data / "index.json").write_text(json.dumps({**index, "shards": index["shards"][:-1]}))
    message = error_of([str(other_data) if a == str(peaked_data) else a for a in argv])
    assert (
        "(data changed since checkpoint-5)" in message
        and "--no-resume-from-checkpoint or a new --save-path" in message
    )
    assert {p: p.stat().st_mtime_ns for p in save.rglob("*")} == before  # nothing written
    # flags that do not change the weights, and the same inputs, resume (here: a finished run)
    assert main(argv + ["--logging-steps", "3", "--dataloader-num-workers", "0"]) == 0
    # starting fresh is one flag away; none of the old run's checkpoints or drafts is left to pass for its own
    assert main(argv + ["--lr", "5e-4", "--no-resume-from-checkpoint", "--max-steps", "1"]) == 0
    assert sorted(p.name for p in save.iterdir() if p.name != STATE_DIR) == ["0", "checkpoint-1"]
    assert json.loads((save / "0" / "training_config.json").read_text())["run_inputs"]["--learning-rate"] == 5e-4


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("flex_attention", marks=pytest.mark.gpu)])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(attn, tiny_verifier_path, peaked_data, tmp_path):
    """The TTT unroll under `--gradient-checkpointing` (every decoder layer replayed in backward, the KV cache kept
    across steps) computes the same loss and gradients as without; a 2-layer draft covers the plain later layers.
    FlexAttention has no backward on CPU: its case runs on CUDA only."""
    argv = train_argv(tiny_verifier_path, peaked_data, tmp_path, "--num-layers", "2", "--gradient-checkpointing", "1")
    model_args, args = parse_args(argv)
    train_ds, _, layer_ids = build_datasets(model_args, args)
    trainer = Eagle3Trainer(model=build_draft(model_args, train_ds, layer_ids), args=args, train_dataset=train_ds)
    model = trainer.model.train()
    batch = DataCollatorForEagle3(total_seq_len=256)([[train_ds.dataset[0], train_ds.dataset[1]]])
    calls = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))

    loss, grads = loss_and_grads(trainer, batch, attn)
    assert len(calls) == 2 * 3  # 2 layers x K=3 steps
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    calls.clear()
    loss_gc, grads_gc = loss_and_grads(trainer, batch, attn)
    assert len(calls) == 2 * 2 * 3  # each layer's forward replayed in backward: checkpointing is on
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=0)
    assert grads.keys() == grads_gc.keys() and {"fc.weight", "layers.1.mlp.up_proj.weight"} <= set(grads)
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)

    with pytest.raises(UserError, match="use_reentrant=true would drop the gradient"):
        parse_args(argv + ["--gradient-checkpointing-kwargs", '{"use_reentrant": true}'])


# ---------------------------------------------------------------------------------------------------- warm start

SPECULATORS_CONFIG = Path(__file__).parent / "fixtures" / "speculators_0.9.0_eagle3" / "config.json"


@pytest.fixture(scope="module")
def pretrained_drafts(peaked_verifier_path, tmp_path_factory):
    """One published draft in the three layouts: ours (`save_pretrained`, as train and export write it),
    vllm-project/speculators 0.9.0's (its own config.json, written by its `save_pretrained` for these shapes, aux ids
    null; the tensor names are ours) and the EAGLE authors' research layout (flat config, `midlayer.*`,
    `pytorch_model.bin`, no embedding, no aux ids). Its vocabulary mapping is not the data's."""
    root = tmp_path_factory.mktemp("pretrained")
    d2t, t2d = build_vocab_mapping({i: 1 for i in range(0, 2048, 3)}, 512, 2048)
    torch.manual_seed(1)
    mapping = torch.from_numpy(d2t), torch.from_numpy(t2d)
    draft = Eagle3DraftModel.from_verifier(str(peaked_verifier_path), *mapping, aux_layer_ids=[1, 2, 3])
    with torch.no_grad():
        draft.fc.weight.normal_()  # not what a new draft would start from
    draft.save_pretrained(root / "ours")
    speculators = root / "speculators"
    speculators.mkdir()
    shutil.copy(SPECULATORS_CONFIG, speculators / "config.json")
    shutil.copy(root / "ours" / "model.safetensors", speculators / "model.safetensors")
    research = root / "research"
    research.mkdir()
    layer = json.loads((root / "ours" / "config.json").read_text())["transformer_layer_config"]
    flat = {k: v for k, v in layer.items() if k not in ("model_type", "rope_parameters")}
    flat.update(
        architectures=["LlamaForCausalLMEagle3"],
        model_type="llama",
        draft_vocab_size=512,
        max_position_embeddings=256,
        rope_theta=layer["rope_parameters"]["rope_theta"],
    )
    (research / "config.json").write_text(json.dumps(flat))
    tensors = {k.replace("layers.0.", "midlayer."): v for k, v in draft.state_dict().items() if "verifier" not in k}
    tensors.pop("embed_tokens.weight")
    torch.save(tensors, research / "pytorch_model.bin")
    return {"ours": root / "ours", "speculators": speculators, "research": research}


@pytest.mark.parametrize("layout", ["ours", "speculators", "research"])
def test_warm_start_begins_from_the_pretrained_draft(
    layout, peaked_verifier_path, peaked_data, pretrained_drafts, tmp_path, caplog
):
    argv = train_argv(peaked_verifier_path, peaked_data, tmp_path, "--from-pretrained", str(pretrained_drafts[layout]))
    model_args, args = parse_args(argv)
    train_ds, _, layer_ids = build_datasets(model_args, args)
    model = build_draft(model_args, train_ds, layer_ids, seed=args.seed)
    reference = Eagle3DraftModel.from_pretrained(pretrained_drafts["ours"]).state_dict()
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("verifier_head.")}
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference), layout  # d2t/t2d too: the draft's own
    assert model.config.eagle_aux_hidden_state_layer_ids == [1, 2, 3]  # recorded, or [2, n//2, n-3] made distinct
    assert model.config.max_position_embeddings == 2048  # the research config's 256 raised to the verifier's
    # a flat config without the key: the EAGLE authors' layer (residual before hidden_norm), as vLLM reads it
    assert model.config.norm_before_residual is (layout != "research")
    vocab_lines = [r.message for r in caplog.records if "keeps its own vocabulary mapping" in r.message]
    assert len(vocab_lines) == 1 and "(512 ids, 157 in common)" in vocab_lines[0], vocab_lines
    # its targets come from the verifier's head over the draft's own vocabulary, and every trainable weight learns
    trainer = Eagle3Trainer(model=model, args=args, train_dataset=train_ds)
    loss, grads = loss_and_grads(trainer, DataCollatorForEagle3(total_seq_len=256)([[train_ds.dataset[0]]]), "sdpa")
    assert torch.isfinite(loss) and loss > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == trainable and all(grads[n].abs().sum() > 0 for n in trainable)


def test_warm_start_trains_resumes_and_fingerprints_the_pretrained_files(
    peaked_verifier_path, peaked_data, pretrained_drafts, tmp_path, capsys
):
    research = shutil.copytree(pretrained_drafts["research"], tmp_path / "research")
    save = tmp_path / "run"
    argv = train_argv(peaked_verifier_path, peaked_data, save, "--from-pretrained", str(research), "--max-steps", "1")
    argv += ["--warmup-steps", "0", "--save-strategy", "no"]
    assert main(argv) == 0
    pretrained = torch.load(research / "pytorch_model.bin", weights_only=True)
    trained = Eagle3DraftModel.from_pretrained(save / "0")
    assert not torch.equal(trained.fc.weight, pretrained["fc.weight"]) and torch.equal(trained.d2t, pretrained["d2t"])
    manifest = json.loads((save / STATE_DIR / "train.json").read_text())
    assert set(manifest["inputs"]["--from-pretrained"]) == {"config.json", "pytorch_model.bin"}
    written = {p: p.stat().st_mtime_ns for p in save.rglob("*")}
    assert main(argv) == 0  # the same inputs: finished, not run again
    assert {p: p.stat().st_mtime_ns for p in save.rglob("*")} == written
    pretrained["fc.weight"] += 1  # another pretrained draft in the same folder: the run is stale
    torch.save(pretrained, research / "pytorch_model.bin")
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "(--from-pretrained.pytorch_model.bin changed)" in lines[0], lines
    assert {p: p.stat().st_mtime_ns for p in save.rglob("*")} == written


def _edited_draft(folder, out, **layer):
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    aux = layer.pop("aux", None)
    config["transformer_layer_config"].update(layer)
    if aux:
        config["eagle_aux_hidden_state_layer_ids"] = aux
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_warm_start_mismatches_are_one_line_before_anything_is_written(
    peaked_verifier_path, peaked_data, pretrained_drafts, tmp_path, capsys
):
    ours = pretrained_drafts["ours"]
    cases = {
        "reads verifier hidden states of size 32; verifier": (_edited_draft(ours, tmp_path / "h", hidden_size=32),),
        "has a verifier vocabulary of 4096 tokens; verifier": (_edited_draft(ours, tmp_path / "v", vocab_size=4096),),
        "fuses aux layers [0, 2, 4] (recorded in its config); --data-path": (
            _edited_draft(ours, tmp_path / "a", aux=[0, 2, 4]),
        ),
        "weights do not fit its config: layers.0.mlp.gate_proj.weight has shape [192, 64], its config.json says": (
            _edited_draft(ours, tmp_path / "i", intermediate_size=256),
        ),
        "--num-layers 2: --from-pretrained": (ours, "--num-layers", "2"),
        "--d2t-path": (ours, "--d2t-path", str(peaked_data / "d2t.npy")),
        "is not a local folder and cannot be fetched from the hub": ("org/a-draft-not-in-the-cache",),
    }
    for k, (expected, (draft, *flags)) in enumerate(cases.items()):
        save = tmp_path / f"run{k}"
        assert main(train_argv(peaked_verifier_path, peaked_data, save, "--from-pretrained", str(draft), *flags)) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(lines) == 1 and expected in lines[0], (expected, lines)
        assert not save.exists()


def test_another_loss_trains_differently_and_is_recorded_and_fingerprinted(
    peaked_verifier_path, peaked_data, tmp_path, capsys
):
    """`--loss tv` trains through the CLI, with other gradients than KL's from the same draft and batch. The loss is
    recorded in the draft's training_config.json (and so in the eval card and the model card) and is one of the run's
    inputs: resuming its run with another loss or temperature is refused in one line naming the flag."""
    from speculators_hf.evaluation.card import build_eval_card, render_eval_card
    from speculators_hf.formats.checkpoint import training_objective
    from speculators_hf.hub.card import build_model_card
    from speculators_hf.training.records import run_inputs

    argv = train_argv(peaked_verifier_path, peaked_data, tmp_path / "tv", "--max-steps", "1", "--loss", "tv")
    model_args, args = parse_args(argv)
    train_ds, _, layer_ids = build_datasets(model_args, args)
    trainer = Eagle3Trainer(model=build_draft(model_args, train_ds, layer_ids), args=args, train_dataset=train_ds)
    batch = DataCollatorForEagle3(total_seq_len=256)([[train_ds.dataset[0], train_ds.dataset[1]]])
    loss_tv, grads_tv = loss_and_grads(trainer, batch, "sdpa")
    trainer.args.loss = "kl"
    loss_kl, grads_kl = loss_and_grads(trainer, batch, "sdpa")
    assert 0 < loss_tv < 3 and loss_tv != loss_kl  # TV <= 1 per step, K = 3 steps
    assert not torch.allclose(grads_tv["fc.weight"], grads_kl["fc.weight"])

    # the objective's flags are fingerprinted where they change the weights: at today's KL at T = 1 they are left out
    # (a run recorded before they existed resumes); eta only with kl_tv
    inputs = run_inputs(trainer.model, args, peaked_data, train_ds)  # args.loss is kl here
    assert not {"--loss", "--loss-temperature", "--loss-eta"} & set(inputs)
    assert main(argv) == 0
    record = json.loads((tmp_path / "tv" / "0" / "training_config.json").read_text())
    assert record["loss"] == "tv" and record["loss_temperature"] == 1.0 and record["run_inputs"]["--loss"] == "tv"
    assert "--loss-eta" not in record["run_inputs"]
    objective = training_objective(tmp_path / "tv" / "0")
    assert objective == {"loss": "tv", "loss_temperature": 1.0, "loss_eta": 3.0}
    card = build_eval_card([], draft="d", verifier="v", dataset={}, objective=objective)
    assert "Trained with `--loss tv` `--loss-temperature 1.0` `--loss-eta 3.0`." in render_eval_card(card)
    assert '"loss": "tv", "loss_temperature": 1.0' in build_model_card(tmp_path / "tv" / "0", "my-org/x")

    capsys.readouterr()
    for flag, value in (("--loss", "kl"), ("--loss-temperature", "2")):
        assert main(argv + [flag, value]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(lines) == 1 and f"({flag} changed since" in lines[0], lines


@pytest.mark.parametrize(
    "value", ["--loss foo", "--loss-temperature 0", "--loss-temperature -1", "--loss-temperature nan"]
)
def test_bad_loss_flags_are_one_line(value, peaked_verifier_path, tmp_path, capsys):
    flag, bad = value.split()
    assert main(train_argv(peaked_verifier_path, tmp_path / "data", tmp_path / "c", flag, bad)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"error: {flag} " in lines[0] and bad in lines[0], lines
    assert not (tmp_path / "c").exists()
