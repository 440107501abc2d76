"""Distributed training on CPU processes (gloo), launched as users launch it (`accelerate launch` with the shipped
configs plus overrides): DDP, FSDP2 and two "nodes" on localhost give the loss curve, metrics and weights of one
process with gradient accumulation 2 on the same data; a sharded FSDP2 checkpoint resumes; a stuck node fails the run
after `--ddp-timeout`, and a rerun after killing it resumes to the same weights.

Each launch runs `examples/train_eagle3.py` through `tests/distributed_worker.py`, which writes a report per process.
The data: 16 chats, `--total-seq-len 128`, `--eval-split 0.3`: 6 training rows (3 optimizer steps per epoch on 2
processes, or on 1 process accumulating 2), and 3 held-out rows (uneven on 2 processes: accelerate repeats one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speculators_hf.commandline import run_command
from speculators_hf.training import Eagle3ModelArguments, Eagle3Trainer, Eagle3TrainingArguments, train
from tests.training_data import make_training_data, train_argv

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "accelerate_configs"
WORKER = str(Path(__file__).with_name("distributed_worker.py"))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
FLAGS = ("--epochs", "2", "--total-seq-len", "128", "--eval-split", "0.3")
STEPS = 6  # 2 epochs x 3 optimizer steps
# What must match the one-process run at every logged step (train and held-out).
CURVE = ("loss", "grad_norm", "tokens", "acc_0", "acc_1", "cond_acc_1", "tau_sim", "eval_loss", "eval_tokens")
CURVE += ("eval_acc_0", "eval_tau_sim")
WATCHDOG = 240  # seconds: a worker still running then prints its threads' stacks and exits (see distributed_worker)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tiny_verifier_path, tmp_path_factory):
    return make_training_data(tiny_verifier_path, tmp_path_factory.mktemp("data"), num_samples=16, max_len=64)


def train_in_process(argv: list[str]) -> Eagle3Trainer:
    trainers = []
    status = run_command((Eagle3ModelArguments, Eagle3TrainingArguments), lambda *a: trainers.append(train(*a)), argv)
    assert status == 0
    return trainers[0]


@pytest.fixture(scope="module")
def reference(tiny_verifier_path, data, tmp_path_factory):
    """One process accumulating 2 rows per step: what every topology must reproduce."""
    save = tmp_path_factory.mktemp("reference")
    argv = train_argv(tiny_verifier_path, data, save, *FLAGS, "--gradient-accumulation-steps", "2")
    trainer = train_in_process(argv)
    return trainer.state.log_history, load_file(save / "1" / "model.safetensors")


@pytest.fixture
def launch(tmp_path):
    """`launch(config, overrides, worker flags, train flags)`: `accelerate launch` of the worker, its output in a file
    (`proc.log`), never a pipe: a pipe nobody reads while the test waits on another launch fills up and blocks its
    writer, and torchrun's exit barrier then holds every other node up to 300 s. Whatever is still running when the
    test ends (a failed test) is killed."""
    pids, exits, procs = tmp_path / "pids", tmp_path / "exits", []
    pids.mkdir()
    exits.mkdir()

    def start(config: Path, overrides: list[str], worker: list[str], argv: list[str]) -> subprocess.Popen:
        cmd = [ACCELERATE, "launch", "--config_file", str(config), "--mixed_precision", "no", *overrides, WORKER]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DISTRIBUTED_TEST_PIDS": str(pids)}
        env.update(DISTRIBUTED_TEST_EXITS=str(exits), DISTRIBUTED_TEST_WATCHDOG=str(WATCHDOG))
        log = tmp_path / f"launch-{len(procs)}.log"
        with log.open("w") as out:
            procs.append(subprocess.Popen([*cmd, *worker, *argv], stdout=out, stderr=subprocess.STDOUT, env=env))
        procs[-1].log = log
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
    for pid in (int(p.name) for p in pids.iterdir()):  # workers run in their own sessions: kill them one by one
        try:
            if WORKER in Path(f"/proc/{pid}/cmdline").read_text():  # still our worker (not a reused pid)
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
    for proc in procs:
        proc.wait()


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")


def finish(*procs: subprocess.Popen, timeout: float = WATCHDOG + 60) -> list[str]:
    """Wait for every launch to exit 0 and return their outputs; the first that fails (or the first still running
    after `timeout`) fails the test with its own output, without waiting for the others."""
    deadline = time.time() + timeout
    while any(proc.poll() is None for proc in procs):
        failed = [proc for proc in procs if proc.poll() not in (None, 0)]
        assert not failed, f"exit {failed[0].returncode}:\n{output(failed[0])[-4000:]}"
        assert time.time() < deadline, f"still running after {timeout} s:\n{output(procs[0])[-4000:]}"
        time.sleep(0.2)
    for proc in procs:
        assert proc.returncode == 0, f"exit {proc.returncode}:\n{output(proc)[-4000:]}"
    return [output(proc) for proc in procs]


def reports(save: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(save.glob("report-*.json"))]


def curve(logs: list[dict]) -> dict:
    return {(entry["step"], key): entry[key] for entry in logs for key in CURVE if key in entry}


def assert_same_run(reference, save: Path, logs: list[dict]) -> None:
    """The same losses and metrics at every logged step, the same final weights, as the one-process run."""
    expected, got = curve(reference[0]), curve(logs)
    assert got.keys() == expected.keys() and len({step for step, _ in got}) == STEPS
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    weights = load_file(save / "1" / "model.safetensors")
    assert weights.keys() == reference[1].keys()
    for name, tensor in reference[1].items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_metrics_count_each_token_once_with_accumulation(tiny_verifier_path, data, tmp_path):
    """One process, 2 rows per micro-batch, accumulation 2, 7 rows (an uneven last step). Trainer fetches a step's
    micro-batches ahead, so accelerate marks the end of the dataloader while the step's first micro-batch still runs:
    metrics must not drop rows of that one (`gather_for_metrics` did, at every micro-step)."""
    flags = ("--total-seq-len", "128", "--eval-split", "0.2", "--per-device-train-batch-size", "2")
    argv = train_argv(tiny_verifier_path, data, tmp_path, *flags, "--gradient-accumulation-steps", "2")
    trainer = train_in_process([*argv, "--save-strategy", "no"])
    rows = trainer.train_dataset
    expected = sum(int((trainer.data_collator([rows[i]])["document_ids"] >= 0).sum()) for i in range(len(rows)))
    assert len(rows) == 7
    assert sum(e.get("tokens", 0) for e in trainer.state.log_history) == expected


def test_fsdp_config_on_cpu_warns_that_it_runs_as_ddp(tiny_verifier_path, data, tmp_path, monkeypatch, caplog):
    """What `accelerate launch --config_file fsdp2.yaml` gives a process on a machine without accelerators."""
    from speculators_hf.commandline import make_parser, parse
    from speculators_hf.training.setup import build_datasets, build_draft

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    argv = train_argv(tiny_verifier_path, data, tmp_path)
    model_args, args = parse(make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)), argv)
    train_dataset, _, layer_ids = build_datasets(model_args, args)
    trainer = Eagle3Trainer(model=build_draft(model_args, train_dataset, layer_ids), args=args)
    assert not trainer.is_fsdp_enabled
    assert "An FSDP accelerate config on cpu processes runs as DDP" in caplog.text


def test_ddp_on_two_processes_equals_one_process(tiny_verifier_path, data, reference, launch, tmp_path):
    """accelerate_configs/cpu_ddp.yaml (what the README runs on CPU); metrics gathered once per logging interval."""
    save = tmp_path / "ddp"
    proc = launch(CONFIGS / "cpu_ddp.yaml", ["--main_process_port", str(free_port())], [],
                  train_argv(tiny_verifier_path, data, save, *FLAGS))  # fmt: skip
    (out,) = finish(proc)
    first, second = reports(save)
    assert (first["process_index"], second["process_index"]) == (0, 1) and first["num_processes"] == 2
    # each process left its process group before the interpreter's finalizers (which can abort a rank mid-teardown)
    assert [p.read_text() for p in (tmp_path / "exits").iterdir()] == ["left", "left"]
    assert (first["should_save"], second["should_save"]) == (True, False)
    assert first["distributed_type"] == "DistributedType.MULTI_CPU"
    assert_same_run(reference, save, first["log_history"])
    checksums = dict(re.findall(r"\[process (\d)\] trained weights checksum ([-+]?\d\.\d{12}e[-+]\d+)", out))
    assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"], checksums
    # Metric sums are added up across processes in `log` (one all-reduce per logging interval), not per micro-step.
    logged = sum(1 for entry in first["log_history"] if "tokens" in entry or "eval_tokens" in entry)
    assert first["metric_collectives"] == logged == STEPS + 2 < first["calls"]["_record"]
    print(f"\nmetric collectives per process: {logged} (one per logging interval; gather per micro-step: "
          f"{first['calls']['_record']}); {first['metric_seconds'] * 1e3:.1f} ms in _record + log")  # fmt: skip


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_shards_and_resumes(tiny_verifier_path, data, reference, launch, tmp_path):
    """accelerate_configs/fsdp2.yaml on 2 CPU processes. accelerate 1.15 runs an FSDP config on CPU as DDP
    (`accelerate_chose`); the worker's `--fsdp-on-cpu` lifts that gate, so the rest is accelerate's FSDP2 path: the
    decoder layer its own `fully_shard` unit, frozen verifier head and embedding untouched, sharded resume states,
    full epoch drafts, and a resume from the sharded checkpoint."""
    from speculators_hf.export import main as export
    from speculators_hf.modeling import Eagle3DraftModel

    save = tmp_path / "fsdp"
    argv = train_argv(tiny_verifier_path, data, save, *FLAGS)

    def run():
        overrides = ["--num_processes", "2", "--main_process_port", str(free_port())]
        return finish(launch(CONFIGS / "fsdp2.yaml", overrides, ["--fsdp-on-cpu"], argv))[0]

    run()
    ranks = reports(save)
    for r in ranks:
        assert r["accelerate_chose"] == "DistributedType.MULTI_CPU"  # what accelerate does on CPU by itself
        assert r["distributed_type"] == "DistributedType.FSDP" and r["num_processes"] == 2
        assert {"", "layers.0"} <= set(r["fsdp_units"])
        assert r["frozen_moved"].keys() == {
            "embed_tokens.weight",
            "verifier_head.model.norm.weight",
            "verifier_head.lm_head.weight",
        }
        assert set(r["frozen_moved"].values()) == {0.0}
    for name, (local, full) in ranks[0]["parameter_pieces"].items():
        assert local + ranks[1]["parameter_pieces"][name][0] == full and local < full, name  # every one sharded
    assert_same_run(reference, save, ranks[0]["log_history"])

    checkpoint = save / "checkpoint-3"  # sharded resume state (torch.distributed.checkpoint), one file per process
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert (checkpoint / "training_config.json").is_file()  # the inputs a resume must match
    for epoch in ("0", "1"):  # epoch drafts: plain full checkpoints
        assert sorted(p.name for p in (save / epoch).iterdir() if p.is_dir()) == []
        assert (save / epoch / "model.safetensors").is_file()
    draft = Eagle3DraftModel.from_pretrained(save / "1")
    assert draft.layers[0].self_attn.q_proj.weight.shape == (128, 128)
    assert export(["--checkpoint", str(save / "1"), "--output-dir", str(tmp_path / "served")]) == 0

    # Resume from the sharded checkpoint of epoch 0: as if the run had died during epoch 1.
    shutil.rmtree(save / "checkpoint-6")
    shutil.rmtree(save / "1")
    out = run()
    resumed = reports(save)[0]
    assert resumed["resumed_from"] == str(checkpoint) and "resuming without checking" not in out
    assert_same_run(reference, save, resumed["log_history"])


@pytest.mark.slow
def test_two_nodes_on_localhost_fail_on_a_stuck_node_and_resume(tiny_verifier_path, data, reference, launch, tmp_path):
    """accelerate_configs/multi_node.yaml, launched once per "machine" (one process each). The second machine stops
    during epoch 1: the first fails after --ddp-timeout instead of hanging; the stuck one is killed; the same two
    launches again resume from epoch 0's checkpoint to the weights of the one-process run."""
    save = tmp_path / "nodes"
    argv = train_argv(tiny_verifier_path, data, save, *FLAGS, "--ddp-timeout", "20")

    def start(stop: list[str]):
        overrides = ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1"]
        overrides += ["--main_process_port", str(port)]
        return [
            launch(CONFIGS / "multi_node.yaml", [*overrides, "--machine_rank", str(k)], stop, argv) for k in (0, 1)
        ]

    port = free_port()
    nodes = start(["--stop-at-step", "4"])
    deadline = time.time() + 300
    while not (save / "stopped-1").is_file() or not (save / "stopped-1").read_text():
        assert time.time() < deadline and all(n.poll() is None for n in nodes), "no node stopped at step 4"
        time.sleep(0.1)
    stopped = time.time()
    nodes[0].wait(timeout=120)
    out = output(nodes[0])
    waited = time.time() - stopped
    assert nodes[0].returncode != 0 and "Timed out waiting 20000ms" in out, out[-3000:]
    os.kill(int((save / "stopped-1").read_text()), signal.SIGKILL)  # the stuck process on the second machine
    assert nodes[1].wait(timeout=60) != 0
    assert sorted(p.name for p in save.glob("checkpoint-*")) == ["checkpoint-3"] and not (save / "1").exists()
    print(f"\nthe first node failed {waited:.1f} s after the second stopped (--ddp-timeout 20)")

    port = free_port()
    finish(*start([]))
    # the rank that failed on the timeout left its group too (the killed one recorded nothing), as did both reruns
    assert sorted(p.read_text() for p in (tmp_path / "exits").iterdir()) == ["left"] * 3
    first, second = reports(save)
    assert first["resumed_from"] == second["resumed_from"] == str(save / "checkpoint-3")
    assert (first["process_index"], first["local_process_index"]) == (0, 0)
    assert (second["process_index"], second["local_process_index"]) == (1, 0)  # global rank 1, local rank 0
    assert (first["should_save"], second["should_save"]) == (True, False)
    assert_same_run(reference, save, first["log_history"])
