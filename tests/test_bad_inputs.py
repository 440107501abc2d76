"""Every file a user hands a CLI is checked where it is read: one line naming the file, exit status 2 (issue 11).

`READERS` is the table of every reader: the CLI that reads the file, the file, and the bad versions of it fed to
the CLI (truncated, random bytes, empty, the wrong type, the wrong shape; a pickle that would run code where the reader
unpickles). Each case runs the CLI's `main(argv)` in-process and checks what a user sees: exit status 2, exactly one
line on stderr naming the file, no traceback, no output left behind, the inputs untouched, no code run.

`test_every_raw_reader_is_accounted_for` greps the package for raw readers (json/yaml/torch/numpy/safetensors/datasets
loads, `read_text`, `open(`, `from_pretrained`): each is in `speculators_hf/validation.py` (the checked helpers), or
listed in `RAW_READERS` with the table row that covers it or the reason it needs none. A new reader fails that test
until it is routed through the helpers or added here, with its bad inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from speculators_hf import runstate
from speculators_hf.cli import COMMANDS
from speculators_hf.cli import main as cli_main

from .training_data import make_training_data

PACKAGE = Path(__file__).resolve().parent.parent / "speculators_hf"


# ------------------------------------------------------------------------------------------------ bad versions


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(b"\xff\xfe" + np.random.default_rng(0).bytes(510))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def write_json(value) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(value))


def edit_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        value = json.loads(path.read_text())
        edit(value)
        path.write_text(json.dumps(value))

    return write


def write_lines(*rows) -> Callable[[Path], None]:
    return lambda path: path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def torch_saved(value) -> Callable[[Path], None]:
    return lambda path: torch.save(value, path)


def npy(array) -> Callable[[Path], None]:
    return lambda path: np.save(path, array, allow_pickle=True)


class RunsCode:
    """Unpickling this makes the folder `MARKER` (a reader that unpickles arbitrary objects would run it)."""

    def __reduce__(self):
        return os.mkdir, (os.environ["BAD_INPUTS_MARKER"],)


def code_pickle(path: Path) -> None:
    torch.save({1: RunsCode()}, path)


def code_npy(path: Path) -> None:
    np.save(path, np.array([RunsCode()], dtype=object), allow_pickle=True)


def edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)

    return write


GENERIC = {"truncated": truncated, "random": random_bytes, "empty": empty}


# ------------------------------------------------------------------------------------------------------- table


@dataclass
class Reader:
    """A file one CLI reads. `argv(inputs, out)` gives the CLI's flags: inputs are copies of `uses` (folders of the
    `inputs` fixture) in `inputs`, and everything the CLI would write goes under `out`, which must not appear."""

    name: str
    cli: str
    target: str  # the file fed bad versions, relative to the inputs folder
    argv: Callable[[Path, Path], list[str]]
    bad: dict[str, Callable[[Path], None]]
    uses: tuple[str, ...] = ()
    generic: tuple[str, ...] = tuple(GENERIC)
    prepare: Callable[[Path, Path], None] | None = None  # run on the copied inputs before the file is spoiled


def _datagen(i: Path, o: Path, *extra: str) -> list[str]:
    verifier = i / "verifier" if (i / "verifier").exists() else VERIFIER["path"]
    return ["--target-model-path", str(verifier), "--train-data-path", str(i / "chats.jsonl"), "--output-dir",
            str(o), "--cache-dir", str(i.parent / "cache"), "--backend", "transformers", *extra]  # fmt: skip


def _train(i: Path, o: Path, data: str = "data", *extra: str) -> list[str]:
    verifier = i / "verifier" if (i / "verifier").exists() else VERIFIER["path"]
    return ["--verifier-name-or-path", str(verifier), "--data-path", str(i / data), "--save-path", str(o),
            "--total-seq-len", "256", "--max-steps", "1", "--report-to", "none", "--eval-split", "0",
            *extra]  # fmt: skip


def _resume(i: Path, o: Path) -> list[str]:
    """Training that continues a checkpoint (its files are read before anything is written; an auto-resumed one in
    a --save-path the run owns goes through the same reader: tests/test_faults_training.py)."""
    return _train(i, o, "data", "--resume-from-checkpoint", str(i / "save" / "checkpoint-1"))


def _train_online(i: Path, o: Path, source: str = "online", *extra: str) -> list[str]:
    """Online training from the tokens-only data; the one server is down (local files are checked before waiting)."""
    return _train(i, o, "tokens", "--hidden-states-source", source, "--hidden-states-servers", VERIFIER["dead"],
                  "--hidden-states-timeout", "1", *extra)  # fmt: skip


def _train_hybrid(i: Path, o: Path) -> list[str]:
    return _train_online(i, o, "hybrid", "--hidden-states-cache-dir", str(i / "cache"))


def _serve(i: Path, o: Path) -> list[str]:
    """serve-hidden-states on a spool folder an earlier server left; a bogus vLLM flag stops vLLM at once if the
    server.json check were ever skipped (no engine starts)."""
    return ["--target-model-path", str(i / "verifier"), "--spool-dir", str(i / "spool"), "--port", "1",
            "--vllm-args=--no-such-flag"]  # fmt: skip


def _evaluate(i: Path, o: Path) -> list[str]:
    return ["--draft", str(i / "draft"), "--prompts", str(i / "prompts.jsonl"), "--verifier", VERIFIER["path"],
            "--num-prompts", "100", "--max-new-tokens", "2", "--output-dir", str(o)]  # fmt: skip


def _regenerate(i: Path, o: Path, output: Path | None = None) -> list[str]:
    return ["--target-model-path", str(i / "verifier"), "--train-data-path", str(i / "chats.jsonl"),
            "--output-path", str(output or o / "regen.jsonl"), "--cache-dir", str(i.parent / "cache"),
            "--backend", "transformers", "--max-new-tokens", "2"]  # fmt: skip


def _resume_regenerate(i: Path, o: Path) -> list[str]:
    """Regenerate into `regen/out.jsonl`, where an unfinished (or finished) earlier run left its records."""
    return _regenerate(i, o, i / "regen" / "out.jsonl")


def _regen_claim(i: Path, o: Path, *names: str):
    """The run state of a regenerate run of these very flags into `regen/out.jsonl`, which wrote `names`."""
    from speculators_hf.commandline import make_parser, parse
    from speculators_hf.regenerate import RegenerateArguments, prepare
    from speculators_hf.runstate import claim

    (args,) = parse(make_parser(RegenerateArguments), _resume_regenerate(i, o))
    plan = prepare(args)
    state = claim(plan.layout.folder, plan.layout.key, plan.inputs, owned=False, label="--output-path")
    state.track(*names)
    return state


def _unfinished_regen(i: Path, o: Path) -> None:
    """An unfinished run of the same flags: its records are read (and its run state)."""
    _regen_claim(i, o, "out.jsonl", "out.failures.jsonl", "out.regenerate_config.json", ".out.jsonl.partial")


def _finished_regen(i: Path, o: Path) -> None:
    """A finished run of the same flags: its provenance is read to check that the output is still the one written."""
    _regen_claim(i, o, "out.jsonl", "out.regenerate_config.json").finish({})


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
READERS = [
    # chats (datagen and regenerate: datagen/sources.py load_source + check_chat_rows)
    Reader("chats", "datagen", "chats.jsonl", _datagen, {
        "wrong-type": write_lines({"messages": CHAT}, [1, 2]),
        "wrong-shape": write_lines({"messages": "hello"}),
        "content-type": write_lines({"messages": [{"role": "user", "content": ["a", "b"]}]}),
    }, uses=("chats.jsonl",)),
    Reader("regenerate-chats", "regenerate", "chats.jsonl", _regenerate, {
        "wrong-shape": write_lines({"messages": CHAT}, {"messages": [["user", "hi"]]}),
    }, uses=("chats.jsonl", "verifier"), generic=()),
    Reader("chat-template", "datagen", "template.jinja", lambda i, o: _datagen(
        i, o, "--chat-template", str(i / "template.jinja")), {
        "wrong-shape": lambda p: p.write_text("{% for m in messages %}{{ m.content }"),
    }, uses=("chats.jsonl", "template.jinja"), generic=("random", "empty")),
    # the verifier (datagen/metadata.py, validation.pretrained_config; verifier_weights.check_verifier_weights)
    Reader("verifier-config", "datagen", "verifier/config.json", _datagen, {
        "wrong-type": write_json([1, 2]),
        "wrong-shape": edit_json(lambda c: c.update(hidden_size="wide")),
    }, uses=("chats.jsonl", "verifier")),
    Reader("verifier-weights", "datagen", "verifier/model-00001-of-00006.safetensors", _datagen, {},
           uses=("chats.jsonl", "verifier")),
    Reader("verifier-weights-train", "train", "verifier/model-00006-of-00006.safetensors", _train, {},
           uses=("data", "verifier"), generic=("truncated",)),
    Reader("generation-config", "regenerate", "verifier/generation_config.json", _regenerate, {
        "wrong-type": write_json("greedy"),
    }, uses=("chats.jsonl", "verifier")),
    # regenerate's own records, read when it resumes or finds its output done (regenerate/runner.py, writer.py; its
    # run state through runstate.read_manifest)
    Reader("regen-provenance", "regenerate", "regen/out.regenerate_config.json", _resume_regenerate, {
        "wrong-type": write_json([]),
    }, uses=("chats.jsonl", "verifier", "regen"), prepare=_finished_regen),
    Reader("regen-state", "regenerate", "regen/.speculators_hf/regenerate-out.jsonl.json", _resume_regenerate, {
        "wrong-type": write_json("fingerprint"),
    }, uses=("chats.jsonl", "verifier", "regen"), prepare=_unfinished_regen),
    Reader("regen-records", "regenerate", "regen/.out.jsonl.partial/records-000.jsonl", _resume_regenerate, {
        "random": lambda p: p.write_bytes(b"\xff\xfe" + np.random.default_rng(0).bytes(200) + b"\n"),
        "torn-middle": lambda p: p.write_text('{"id": "a", "index": 0}\n{"id": \n{"id": "b", "index": 1}\n'),
        "wrong-shape": write_lines({"id": "a", "index": 0}, {"chat": "b"}),
    }, uses=("chats.jsonl", "verifier", "regen"), generic=(), prepare=_unfinished_regen),
    # datagen's own record, read when it resumes (runstate.read_manifest: the manifest datagen keeps in its folder)
    Reader("datagen-resume", "datagen", "out-before/.speculators_hf/datagen.json",
           lambda i, o: _datagen(i, i / "out-before"), {
        "wrong-type": write_json([]),
    }, uses=("chats.jsonl", "out-before")),
    # vocab (vocab/mapping.py load_token_freq)
    Reader("token-freq", "vocab", "data/token_freq.pt", lambda i, o: [
        "--token-freq-path", str(i / "data/token_freq.pt"), "--target-vocab-size", "2048", "--draft-vocab-size",
        "64", "--output-path", str(o)], {
        "wrong-type": torch_saved([1, 2, 3]),
        "wrong-shape": torch_saved(torch.ones(4, 4)),
        "wrong-values": torch_saved({"a": 1}),
        "runs-code": code_pickle,
    }, uses=("data",)),
    # training data (formats/shards.py ShardDataset, read_index; training/data.py .pt files, data_layer_ids)
    Reader("shard", "train", "data/data-00000.safetensors", _train, {
        "wrong-type": edit_tensors(lambda t: t.pop("sample_offsets")),
        "wrong-shape": edit_tensors(lambda t: t.update(hidden_states=t["hidden_states"][:, 0].contiguous())),
        "wrong-offsets": edit_tensors(lambda t: t.update(sample_offsets=t["sample_offsets"].flip(0))),
        "int-states": edit_tensors(lambda t: t.update(hidden_states=t["hidden_states"].int())),
    }, uses=("data",)),
    Reader("fp8-shard", "train", "fp8/data-00000.safetensors", lambda i, o: _train(i, o, "fp8"), {
        "wrong-type": edit_tensors(lambda t: t.pop("hidden_states_scale")),
        "wrong-shape": edit_tensors(lambda t: t.update(hidden_states_scale=t["hidden_states_scale"][:, :2].clone())),
        "wrong-dtype": edit_tensors(lambda t: t.update(hidden_states_scale=t["hidden_states_scale"].int())),
    }, uses=("fp8",), generic=("truncated",)),
    # online/hybrid training (online/dataset.py open_online_dataset, cache.py; the tokens-only shards above)
    Reader("tokens-shard", "train", "tokens/data-00000.safetensors", _train_online, {
        "wrong-type": edit_tensors(lambda t: t.pop("sample_ids")),
        "wrong-shape": edit_tensors(lambda t: t.update(loss_mask=t["loss_mask"][:-1].clone())),
        "scale-only": edit_tensors(lambda t: t.update(hidden_states_scale=torch.ones(len(t["input_ids"]), 4))),
    }, uses=("tokens",)),
    Reader("hybrid-cache-config", "train", "cache/cache_config.json", _train_hybrid, {
        "wrong-type": write_json([]),
        "wrong-values": edit_json(lambda c: c.update(layer_ids=[1, 2, 3, 5])),
    }, uses=("tokens", "cache")),
    Reader("hybrid-cache-shard", "train", "cache/data-c000000000-test.safetensors", _train_hybrid, {
        "wrong-type": edit_tensors(lambda t: t.pop("hidden_states")),
        "wrong-shape": edit_tensors(lambda t: t.update(hidden_states=t["hidden_states"][:, :2].contiguous())),
    }, uses=("tokens", "cache")),
    Reader("spool-server-info", "serve-hidden-states", "spool/server.json", _serve, {
        "wrong-type": write_json([4242]),
    }, uses=("verifier", "spool")),
    Reader("index", "train", "data/index.json", _train, {
        "wrong-type": write_json([]),
        "wrong-shape": write_json({"shards": "data-00000.safetensors"}),
        "missing-shard": edit_json(lambda c: c["shards"].append({"file": "data-00009.safetensors"})),
        "outside": edit_json(lambda c: c["shards"][0].update(file=os.__file__)),  # a regular file elsewhere
    }, uses=("data",)),
    Reader("data-config", "train", "data/data_config.json", _train, {
        "wrong-type": write_json([2, 3]),
        "wrong-shape": write_json({"layer_ids": "1,2,3,4"}),
        "other-dtype": edit_json(lambda c: c.update(hidden_states_storage={"dtype": "bfloat16"})),
    }, uses=("data",)),
    Reader("seed-pt", "train", "ptdata/data_0.pt", lambda i, o: _train(i, o, "ptdata"), {
        "wrong-type": torch_saved([1, 2]),
        "wrong-shape": torch_saved({"input_ids": torch.ones(3, 3).long(), "loss_mask": torch.ones(3),
                                     "hidden_states": [torch.ones(3, 64)] * 4}),  # fmt: skip
        "runs-code": code_pickle,
    }, uses=("ptdata",)),
    Reader("d2t", "train", "data/d2t.npy", _train, {
        "wrong-type": npy(np.zeros(64, dtype=np.float32)),
        "wrong-shape": npy(np.zeros((8, 8), dtype=np.int64)),
        "runs-code": code_npy,
        "no-entries": npy(np.zeros(0, dtype=np.int64)),
    }, uses=("data",)),
    Reader("t2d", "train", "data/t2d.npy", _train, {"wrong-type": npy(np.full(2048, 7))}, uses=("data",)),
    Reader("trainer-state", "train", "save/checkpoint-1/trainer_state.json", lambda i, o: _resume(i, o), {
        "wrong-type": write_json(["global_step"]),
    }, uses=("data", "save"), generic=("truncated", "random")),
    Reader("resume-record", "train", "save/checkpoint-1/training_config.json", lambda i, o: _resume(i, o), {
        "wrong-type": write_json(["fingerprint"]),
    }, uses=("data", "save"), generic=("truncated", "random")),
    # draft checkpoints (formats/checkpoint.py read_config, tensor_header, non_finite_count; modeling_eagle3
    # check_local_checkpoint)
    Reader("export-config", "export", "draft/config.json", lambda i, o: [
        "--checkpoint", str(i / "draft"), "--output-dir", str(o)], {
        "wrong-type": write_json("eagle3"),
        "wrong-shape": edit_json(lambda c: c["transformer_layer_config"].update(hidden_size="64")),
    }, uses=("draft",)),
    Reader("export-weights", "export", "draft/model.safetensors", lambda i, o: [
        "--checkpoint", str(i / "draft"), "--output-dir", str(o)], {
        "wrong-shape": edit_tensors(lambda t: t.update({"fc.weight": t["fc.weight"][:, :8].contiguous()})),
        "non-finite": edit_tensors(lambda t: t["fc.weight"].__setitem__((0, 0), float("nan"))),
    }, uses=("draft",)),
    Reader("draft-config", "evaluate", "draft/config.json", _evaluate, {
        "wrong-type": write_json([]),
        "wrong-shape": edit_json(lambda c: c.update(draft_vocab_size="many")),
    }, uses=("draft", "prompts.jsonl")),
    Reader("draft-weights", "evaluate", "draft/model.safetensors", _evaluate, {}, uses=("draft", "prompts.jsonl")),
    # evaluation prompts (evaluation/prompts.py load_prompts)
    Reader("prompts", "evaluate", "prompts.jsonl", _evaluate, {
        "wrong-type": write_lines(["hi"]),
        "wrong-shape": write_lines({"messages": "hi"}),
        "token-ids": write_lines({"prompt_token_ids": "1 2 3"}),
    }, uses=("draft", "prompts.jsonl")),
    # an earlier evaluation's card (evaluation/prompts.py previous_card: held-out prompts, carried-over grid) and a
    # grid engine record no run recorded (evaluation/grid.py check_records_folder: refused, never read or replaced;
    # the records a finished engine left are read in tests/test_faults_evaluation.py)
    Reader("eval-card-previous", "evaluate", "draft/eval_card.json", lambda i, o: [
        "--draft", str(i / "draft"), "--verifier", VERIFIER["path"], "--max-new-tokens", "2"], {
        "wrong-type": write_json([]),
        "wrong-shape": write_json({"dataset": "held_out.jsonl"}),
        "wrong-runs": write_json({"runs": ["transformers"]}),
    }, uses=("draft",)),
    Reader("grid-record", "evaluate", "gridout/eval_grid/k0.json", lambda i, o: [
        *_evaluate(i, i / "gridout"), "--grid", "--k", "1", "--temperature", "0", "--batch-size", "1"], {
        "wrong-type": write_json(["fingerprint"]),
    }, uses=("draft", "prompts.jsonl", "gridout")),
    # push: the draft's weights (checked as export checks them), the training record and eval card (hub/)
    Reader("push-weights", "push", "draft/model.safetensors", lambda i, o: [
        "--checkpoint", str(i / "draft"), "--repo-id", "org/x", "--local-dir", str(o)], {
        "non-finite": edit_tensors(lambda t: t["lm_head.weight"].__setitem__((0, 0), float("inf"))),
    }, uses=("draft",), generic=("truncated",)),
    Reader("push-data-config", "push", "data/data_config.json", lambda i, o: [
        "--checkpoint", str(i / "draft"), "--repo-id", "org/x", "--local-dir", str(o), "--data-path",
        str(i / "data")], {
        "wrong-type": write_json([]),
        "wrong-shape": write_json({"data": "chats.jsonl"}),
    }, uses=("draft", "data")),
    Reader("push-eval-card", "push", "draft/eval_card.json", lambda i, o: [
        "--checkpoint", str(i / "draft"), "--repo-id", "org/x", "--local-dir", str(o)], {
        "wrong-shape": write_json({"results": []}),
        "wrong-recommendation": write_json({"recommendation": {"num_speculative_tokens": "3"}}),
    }, uses=("draft",), generic=("truncated", "random")),
    # the pipeline's chat file (pipeline.py hold_out_prompts) and accelerate config
    Reader("pipeline-chats", "pipeline", "chats.jsonl", lambda i, o: [
        "--verifier", VERIFIER["path"], "--train-data-path", str(i / "chats.jsonl"), "--output-dir", str(o)], {
        "wrong-type": write_lines(*[{"messages": CHAT}] * 30, "chat"),
        "wrong-shape": write_lines(*[{"messages": CHAT}] * 30, {"messages": [{"role": 1, "content": "x"}]}),
    }, uses=("chats.jsonl",)),
    Reader("accelerate-config", "pipeline", "accelerate.yaml", lambda i, o: [
        "--verifier", VERIFIER["path"], "--train-data-path", str(i / "chats.jsonl"), "--eval-prompts",
        str(i / "chats.jsonl"), "--output-dir", str(o), "--accelerate-config", str(i / "accelerate.yaml")], {
        "wrong-type": lambda p: p.write_text("- ddp\n- fsdp\n"),
    }, uses=("chats.jsonl", "accelerate.yaml"), generic=("random", "empty")),
    # --config YAML (commandline.py), through one command here; every command below
    Reader("config-yaml", "vocab", "run.yaml", lambda i, o: [
        "--config", str(i / "run.yaml"), "--output-path", str(o)], {
        "wrong-type": lambda p: p.write_text("- token_freq_path\n"),
        "wrong-shape": lambda p: p.write_text("token_freq_path: x.pt\ndraft_vocab_size: [1, 2]\n"),
        "wrong-value": lambda p: p.write_text("token_freq_path: x.pt\ndraft_vocab_size: lots\n"),
        "syntax": lambda p: p.write_text("token_freq_path: [x.pt\n"),
    }, uses=("run.yaml",), generic=("random", "empty")),
]  # fmt: skip
CASES = [(r.name, kind) for r in READERS for kind in (*r.generic, *r.bad)]
VERIFIER: dict[str, str] = {}  # the tiny verifier's path, set by the `inputs` fixture


@pytest.fixture(scope="module")
def inputs(tiny_verifier_path, tmp_path_factory):
    """One valid copy of every input the table corrupts."""
    from speculators_hf.formats.shards import ShardDataset, write_v1_sample
    from speculators_hf.modeling import Eagle3DraftModel
    from speculators_hf.tiny_kit import write_chat_jsonl
    from speculators_hf.vocab import load_vocab_mapping

    VERIFIER["path"] = str(tiny_verifier_path)
    root = tmp_path_factory.mktemp("bad_inputs_valid")
    shutil.copytree(tiny_verifier_path, root / "verifier")
    write_chat_jsonl(root / "chats.jsonl", 8)
    (root / "prompts.jsonl").write_text(json.dumps({"messages": CHAT[:1]}) + "\n")
    (root / "template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (root / "accelerate.yaml").write_text("distributed_type: NO\nnum_processes: 1\n")
    (root / "run.yaml").write_text("token_freq_path: x.pt\n")
    data = make_training_data(tiny_verifier_path, root / "data", num_samples=6, max_len=32, samples_per_shard=3,
                              draft_vocab_size=64)  # fmt: skip
    (data / "data_config.json").write_text(json.dumps({"layer_ids": [1, 2, 3, 4], "layer_id_convention": "vllm"}))
    torch.save({i: 1 for i in range(100)}, data / "token_freq.pt")
    (root / "ptdata").mkdir()
    for k, sample in enumerate(ShardDataset(data)):
        if k < 2:
            write_v1_sample(root / "ptdata" / f"data_{k}.pt", sample)
    shutil.copy2(data / "data_config.json", root / "ptdata")
    runstate.claim(root / "out-before", "datagen", {"flags": "of an earlier run"})  # its manifest, spoiled below
    (root / "save" / "checkpoint-1").mkdir(parents=True)
    (root / "save" / "checkpoint-1" / "training_config.json").write_text("{}")
    (root / "save" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (root / "regen" / ".out.jsonl.partial").mkdir(parents=True)
    (root / "regen" / "out.jsonl").write_text(json.dumps({"id": "a", "messages": CHAT}) + "\n")
    (root / "regen" / "out.regenerate_config.json").write_text("{}")
    (root / "regen" / ".out.jsonl.partial" / "records-000.jsonl").write_text("")
    _variants(root, data, tiny_verifier_path)
    d2t, t2d = load_vocab_mapping(data / "d2t.npy", data / "t2d.npy")
    torch.manual_seed(0)
    draft = Eagle3DraftModel.from_verifier(
        str(tiny_verifier_path), d2t, t2d, hub_id="org/tiny", aux_layer_ids=[1, 2, 3]
    )
    draft.save_pretrained(root / "draft")
    (root / "draft" / "eval_card.json").write_text("{}")
    return root


def _variants(root: Path, data: Path, verifier: Path) -> None:
    """fp8 and tokens-only copies of `data`, a hybrid cache of its states, and a spool folder a server left."""
    from transformers import AutoConfig

    from speculators_hf.formats.shards import store_hidden_states, write_shard
    from speculators_hf.online.server import free_port

    VERIFIER["dead"] = f"http://127.0.0.1:{free_port()}"
    for name in ("fp8", "tokens"):
        shutil.copytree(data, root / name)
        for shard in sorted((root / name).glob("data-*.safetensors")):
            tensors = load_file(shard)
            states = tensors.pop("hidden_states")
            if name == "fp8":
                tensors.update(store_hidden_states(states, "fp8_e4m3"))
            save_file(tensors, shard)
    config = json.loads((root / "tokens" / "data_config.json").read_text())
    (root / "tokens" / "data_config.json").write_text(json.dumps({**config, "tokens_only": True}))
    first = load_file(data / "data-00000.safetensors")
    ends = first["sample_offsets"].tolist()
    samples = [{k: first[k][a:b] for k in ("input_ids", "loss_mask", "hidden_states")} for a, b in zip(ends, ends[1:])]
    write_shard(root / "cache" / "data-c000000000-test.safetensors", samples, first["sample_ids"].tolist())
    hidden_size = AutoConfig.from_pretrained(verifier).hidden_size
    meta = {
        "data_fingerprint": config.get("fingerprint"),
        "layer_ids": config["layer_ids"],
        "hidden_size": hidden_size,
    }
    (root / "cache" / "cache_config.json").write_text(json.dumps(meta))  # what open_online_dataset expects
    (root / "gridout" / "eval_grid").mkdir(parents=True)
    (root / "gridout" / "eval_grid" / "k0.json").write_text(json.dumps({"fingerprint": "an earlier grid"}))
    (root / "spool").mkdir()
    (root / "spool" / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:1", "host": "elsewhere"}))


@pytest.fixture(autouse=True, scope="module")
def no_progress_bars():
    """Progress bars are not what this test reads; the lines a user must act on are."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    yield
    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()


def _digest(folder: Path) -> dict[str, str]:
    files = (p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _one_error_line(code: int, err: str, cli: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and re.match(rf"(speculators-hf {cli}|python -m speculators_hf\.{cli}): error: ", lines[0])
    return lines[0]


def _no_engine(*args, **kwargs):
    raise AssertionError("a vLLM engine would start: the bad file was not refused")


@pytest.mark.parametrize("reader, kind", CASES)
def test_bad_file_is_one_line(reader, kind, inputs, tmp_path, capfd, monkeypatch):
    spec = next(r for r in READERS if r.name == reader)
    work, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / "code-ran"
    monkeypatch.setenv("BAD_INPUTS_MARKER", str(marker))
    monkeypatch.setattr("speculators_hf.evaluation.vllm_engine.spawn", _no_engine)  # were a check ever skipped
    work.mkdir()
    for name in spec.uses:
        (shutil.copytree if (inputs / name).is_dir() else shutil.copy2)(inputs / name, work / name)
    if spec.prepare is not None:
        spec.prepare(work, out)
    (spec.bad.get(kind) or GENERIC[kind])(work / spec.target)
    before = _digest(work)
    capfd.readouterr()
    code = cli_main([spec.cli, *spec.argv(work, out)])
    line = _one_error_line(code, capfd.readouterr().err, spec.cli)
    assert Path(spec.target).name in line, line  # names the file
    assert len(line) < 400, line
    assert not out.exists(), "output left behind"
    assert _digest(work) == before, "an input was changed"
    assert not marker.exists(), "a pickle ran code"


@pytest.mark.parametrize("cli", sorted(COMMANDS))
def test_bad_config_yaml_in_every_command(cli, tmp_path, capfd):
    config = tmp_path / "run.yaml"
    config.write_text("- a\n- b\n")
    capfd.readouterr()
    line = _one_error_line(cli_main([cli, "--config", str(config)]), capfd.readouterr().err, cli)
    assert "run.yaml: holds a list, expected a mapping" in line, line


@pytest.mark.parametrize("kind", [*GENERIC, "wrong-type"])
def test_bad_spool_file_is_skipped_in_one_line(kind, tmp_path):
    """A spool file a server left cut short (it died while writing) or garbled: the transport gives one line naming
    it (the client retries on another server, then skips the sample) and deletes it with its lock."""
    from safetensors.torch import save_file

    from speculators_hf.online.client import HiddenStatesClient, _Server
    from speculators_hf.online.transport import BadStates, SpoolTransport

    path = tmp_path / "cmpl-1.safetensors"
    save_file({"hidden_states": torch.ones(3, 4, 64), "token_ids": torch.tensor([1, 2, 3])}, str(path))
    Path(f"{path}.lock").touch()
    (tmp_path / "server.json").write_text("[1, 2]")  # a garbled record: no layer check, no crash
    if kind == "wrong-type":
        save_file({"hidden_states": torch.ones(3, 4, 64)}, str(path))
    else:
        GENERIC[kind](path)
    client = HiddenStatesClient(
        ["http://127.0.0.1:1"], hidden_shape=(4, 64), layer_ids=[1, 2, 3, 4], spool_dirs=[tmp_path]
    )
    with pytest.raises(BadStates) as caught:
        client._load_and_check(_Server("http://127.0.0.1:1"), {"hidden_states_path": str(path)}, [1, 2, 3])
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert path.name in message or kind == "wrong-type", message
    assert not path.exists() and not Path(f"{path}.lock").exists()
    assert SpoolTransport([tmp_path]).server_info({"hidden_states_path": str(path)}) is None


# --------------------------------------------------------------------------------------------------- coverage

# Raw reads outside speculators_hf/validation.py: (file, text on the line) -> the table row that feeds that reader
# bad files ("reader:<name>"), or why it reads no user file or needs no check ("exempt: <reason>").
RAW_READERS = {
    ("datagen/sources.py", 'load_dataset("json"'): "reader:chats",
    ("datagen/sources.py", 'open(path, "rb")'): "reader:chats",
    ("datagen/sources.py", "load_from_disk("): "exempt: datasets' own folder format, errors caught as one line",
    ("datagen/sources.py", "load_dataset(str(local)"): "exempt: a local dataset script folder, errors caught",
    ("datagen/sources.py", "load_dataset(path"): "exempt: a hub dataset, errors caught as one line",
    ("formats/shards.py", "with safe_open(str(path)"): "reader:shard",
    ("formats/shards.py", "with safe_open(str(file)"): "reader:shard",
    ("formats/shards.py", "safe_open(str(self.files[k])"): "reader:shard",
    ("datagen/hf_backend.py", "def from_pretrained("): "exempt: a definition",
    ("datagen/hf_backend.py", "auto.from_pretrained("): "reader:verifier-weights",
    ("datagen/backends.py", "HFHiddenStatesBackend.from_pretrained"): "reader:verifier-weights",
    ("datagen/vllm_backend.py", 'open(path + ".lock")'): "exempt: a lock file",
    ("modeling/verifier_weights.py", "with safe_open(path"): "reader:verifier-weights-train",
    ("modeling/modeling_eagle3.py", "Eagle3Config.from_pretrained(folder)"): "reader:draft-config",
    ("modeling/modeling_eagle3.py", "def from_pretrained("): "exempt: a definition",
    ("modeling/modeling_eagle3.py", "super().from_pretrained("): "reader:draft-weights",
    ("export/convert.py", "Eagle3DraftModel.from_pretrained("): "reader:export-weights",
    ("modeling/pretrained.py", "Eagle3DraftModel.from_pretrained("): "reader:draft-weights",
    ("formats/checkpoint.py", 'with safe_open(str(file), "pt")'): "reader:export-weights",
    ("runstate.py", 'with open(p, "rb") as f:'): "exempt: a checksum",
    ("runstate.py", 'open(manifest.with_suffix(".lock"), "a")'): "exempt: a lock file",
    ("evaluation/prompts.py", 'open(path, "rb")'): "reader:prompts",
    ("evaluation/stage.py", "AutoModelForCausalLM.from_pretrained("): "reader:verifier-weights",
    ("evaluation/stage.py", "Eagle3DraftModel.from_pretrained("): "reader:draft-config",
    ("evaluation/card.py", "/proc/cpuinfo"): "exempt: the machine's CPU name",
    ("evaluation/vllm_engine.py", "json.loads(spawn(request, timeout))"): "exempt: our own subprocess's result",
    ("evaluation/vllm_engine.py", "return res.read_text()"): "exempt: our own subprocess's result",
    ("evaluation/vllm_engine.py", "json.loads(Path(argv[0]).read_text())"): "exempt: our own subprocess's request",
    ("training/evaluation.py", "Eagle3DraftModel.from_pretrained("): "reader:draft-config",
    ("training/trainer.py", 'open(probe, "wb")'): "exempt: a write (a probe of free space after a failed save)",
    ("training/on_policy.py", "def from_pretrained("): "exempt: a definition",
    ("training/on_policy.py", "HFHiddenStatesBackend.from_pretrained("): "reader:verifier-weights",
    ("training/stage.py", "ContinuationScorer.from_pretrained("): "reader:verifier-weights",
    ("regenerate/sampling.py", "GenerationConfig.from_pretrained("): "reader:generation-config",
    ("regenerate/rollout.py", "json.loads(value)"): "exempt: parses a tool call the model generated",
    ("datagen/sources.py", "json.loads(tools)"): "exempt: a row's tools string; unparsable tools are dropped",
    ("regenerate/hf_engine.py", "AutoModelForCausalLM.from_pretrained("): "reader:verifier-weights",
    ("regenerate/writer.py", "def open(self)"): "exempt: a definition",
    ("regenerate/writer.py", 'open(self.path, "a"'): "exempt: an append",
    ("regenerate/writer.py", 'open(path, "rb+")'): "exempt: cuts a torn last line, parses nothing",
    ("regenerate/writer.py", 'with open(path, "rb") as f:  # streamed'): "exempt: parsed by validation.parse_json",
    ("regenerate/writer.py", 'handles[k] = open(self.files[k], "rb")'): "exempt: parsed by validation.parse_json",
    ("regenerate/writer.py", 'open(tmp, "w"'): "exempt: a write",
    ("online/cache.py", "safe_open(str(self.folder / name)"): "reader:hybrid-cache-shard",
    ("http.py", "return json.loads(data)"): "exempt: an HTTP answer, not a file (not JSON: retried)",
    ("http.py", "body = json.loads(data)"): "exempt: an HTTP error's body, any failure caught",
    ("online/server.py", 'open(log_path, "ab")'): "exempt: a write (the server's log)",
    ("online/transport.py", "json.loads(info.read_text())"): "exempt: the server's record: unreadable means no layer "
    "check (the states' shape is still checked)",
    ("datagen/holdout.py", 'open(source, "rb")'): "reader:pipeline-chats",
    ("datagen/holdout.py", 'open(tmp, "w'): "exempt: a write",
    ("tiny_kit.py", "json.loads(path.read_text())"): "exempt: the chitchat-dataset wheel's own file",
    ("tiny_kit.py", 'open(path, "w")'): "exempt: a write",
    ("tiny_kit.py", "PreTrainedTokenizerFast.from_pretrained("): "exempt: the kit's own cached tokenizer",
    ("vocab/mapping.py", 'open(tmp, "wb")'): "exempt: a write",
}
RAW_CALL = re.compile(
    r"json\.loads?\(|yaml\.(safe_)?load\(|torch\.load\(|np\.load\(|safe_open\(|load_file\(|\.read_text\(|"
    r"\.read_bytes\(|load_dataset\(|load_from_disk\(|from_pretrained\(|(?<![\w.])open\("
)


def _code_lines(path: Path) -> list[str]:
    """The file's lines with strings and comments blanked out (a reader named in a docstring is no reader)."""
    import io
    import tokenize

    lines = [list(line) for line in path.read_text().splitlines(keepends=True)]
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                a, b = (c0 if r == r0 else 0), (c1 if r == r1 else len(lines[r - 1]))
                lines[r - 1][a:b] = " " * (b - a)
    return ["".join(line) for line in lines]


def test_every_raw_reader_is_accounted_for():
    names = {r.name for r in READERS}
    used, unaccounted = set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "validation.py":
            continue
        source = path.read_text().splitlines()
        for number, code in enumerate(_code_lines(path), 1):
            if not RAW_CALL.search(code):
                continue
            line = source[number - 1]
            key = next((k for k in RAW_READERS if k[0] == rel and k[1] in line), None)
            if key is None:
                unaccounted.append(f"{rel}:{number}: {line.strip()}")
            else:
                used.add(key)
    assert not unaccounted, (
        "raw file readers outside speculators_hf/validation.py: route them through its helpers, or add them to "
        "RAW_READERS (with a READERS row feeding them bad files, or the reason they need none):\n"
        + "\n".join(unaccounted)
    )
    for key, why in RAW_READERS.items():
        assert why.startswith(("reader:", "exempt: ")), (key, why)
        assert not why.startswith("reader:") or why[7:] in names, (key, why)
    stale = sorted(set(RAW_READERS) - used)
    assert not stale, f"RAW_READERS entries that match no line any more: {stale}"
