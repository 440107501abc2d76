"""Online training without servers: tokens-only datagen, the hidden-state spool transport, client failure modes."""

import json
from pathlib import Path

import pytest
import torch

from speculators_hf.datagen import DatagenArguments, ShardDataset, build_dataset
from speculators_hf.tiny_kit import write_chat_jsonl
from speculators_hf.training.data import PackedDataset

SEQ = 160


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", limit=24)


def datagen_args(model, data, out, cache, **kw):
    kw = {"seq_length": SEQ, "backend": "transformers", "shard_size_mb": 1, "batch_size": 8, **kw}
    return DatagenArguments(
        target_model_path=str(model), train_data_path=str(data), output_dir=str(out), cache_dir=str(cache), **kw
    )


@pytest.fixture(scope="module")
def full_and_tokens(tiny_verifier_path, chats, tmp_path_factory):
    root = tmp_path_factory.mktemp("datagen")
    full = build_dataset(datagen_args(tiny_verifier_path, chats, root / "full", root / "cache"))
    tokens = build_dataset(datagen_args(tiny_verifier_path, chats, root / "tokens", root / "cache", tokens_only=True))
    return root / "full", full, root / "tokens", tokens


def test_tokens_only_datagen_matches_full_datagen_without_states(full_and_tokens):
    full_dir, full, tokens_dir, tokens = full_and_tokens
    assert tokens["complete"] and tokens["samples"] == full["samples"] > 10 and tokens["tokens"] == full["tokens"]
    assert tokens["bytes"] * 100 < full["bytes"]  # 9 bytes a token instead of 4 x 64 fp32 states
    with_states, without = ShardDataset(full_dir), ShardDataset(tokens_dir)
    assert without.tokens_only and without.hidden_shape is None and with_states.hidden_shape == (4, 64)
    for i in range(len(with_states)):
        a, b = with_states[i], without[i]
        assert set(b) == {"input_ids", "loss_mask"}
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        assert with_states.sample_id(i) == without.sample_id(i)
    # vocab and packing read the same inputs as from full data
    freq = torch.load(tokens_dir / "token_freq.pt", weights_only=True)
    assert freq == torch.load(full_dir / "token_freq.pt", weights_only=True)
    assert (
        PackedDataset(without, list(range(len(without))), 512).packs
        == PackedDataset(with_states, list(range(len(with_states))), 512).packs
    )
    # data_config.json: what a producer must capture
    config = json.loads((tokens_dir / "data_config.json").read_text())
    assert config["tokens_only"] is True and config["layer_ids"] == [1, 2, 3, 4] and config["backend"] == "none"
    assert "hidden_states" not in config["hidden_states_layout"]["tensors"]
    assert "[1, 2, 3, 4]" in config["hidden_states_layout"]["hidden_states"]
    assert json.loads((full_dir / "data_config.json").read_text())["tokens_only"] is False


def test_tokens_only_resumes_and_refuses_offline_training(full_and_tokens, tiny_verifier_path, chats, tmp_path):
    from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments, build_datasets
    from speculators_hf.utils import UserError

    _, _, tokens_dir, _ = full_and_tokens
    before = {p.name: p.read_bytes() for p in Path(tokens_dir).glob("data-*.safetensors")}
    again = build_dataset(
        datagen_args(tiny_verifier_path, chats, tokens_dir, Path(tokens_dir).parent / "cache", tokens_only=True)
    )
    assert again["this_run"]["samples"] == 0
    assert before == {p.name: p.read_bytes() for p in Path(tokens_dir).glob("data-*.safetensors")}
    model_args = Eagle3ModelArguments(verifier_name_or_path=str(tiny_verifier_path), data_path=str(tokens_dir))
    args = Eagle3TrainingArguments(output_dir=str(tmp_path / "ckpt"), report_to="none")
    with pytest.raises(UserError, match="tokens only.*--hidden-states-source online"):
        build_datasets(model_args, args)


# ------------------------------------------------------------------------------------------------------------------
# The client against small stand-in servers (real HTTP, real spool files) that can misbehave on purpose: NaN states,
# 503s, wrong token ids, other layers. vLLM itself is exercised in test_online_vllm.py.


class FakeServer:
    """Speaks the part of vLLM's OpenAI API the client uses; writes `[T, 4, 64]` states into its spool like the
    hidden-states connector (states = token id + layer index, so a test can check which tokens they belong to)."""

    def __init__(self, spool: Path, behaviour: str = "ok", layer_ids=(1, 2, 3, 4)):
        import http.server
        import threading

        from safetensors.torch import save_file

        self.spool, self.behaviour, self.requests = spool, behaviour, 0
        spool.mkdir(parents=True, exist_ok=True)
        (spool / "server.json").write_text(json.dumps({"layer_ids": list(layer_ids)}))
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "fake"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests += 1
                assert body["max_tokens"] == 1 and body["return_token_ids"] is True
                ids = body["prompt"]
                assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)  # one prompt of token ids
                if owner.behaviour == "503":
                    return self._send(503, {"error": {"message": "overloaded"}})
                states = torch.tensor(ids, dtype=torch.float32)[:, None, None] + torch.arange(4.0)[None, :, None]
                states = states.expand(len(ids), 4, 64).contiguous()
                if owner.behaviour == "nan":
                    states[0, 0, 0] = float("nan")
                path = owner.spool / f"cmpl-{owner.requests}-{threading.get_ident()}.safetensors"
                save_file({"hidden_states": states, "token_ids": torch.tensor(ids)}, str(path))
                Path(f"{path}.lock").touch()
                returned = ids[:-1] if owner.behaviour == "wrong_ids" else ids
                self._send(
                    200,
                    {
                        "choices": [{"prompt_token_ids": returned}],
                        "kv_transfer_params": {"hidden_states_path": str(path)},
                    },
                )

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_servers(tmp_path, monkeypatch):
    from speculators_hf.online.common import SPOOL_DIRS_ENV

    monkeypatch.setenv(SPOOL_DIRS_ENV, str(tmp_path))  # the trainer reads states only in spools it was told of
    servers = []

    def make(behaviour="ok", **kw):
        server = FakeServer(tmp_path / f"spool{len(servers)}", behaviour, **kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def spool_files(server):
    return sorted(p.name for p in server.spool.iterdir() if p.name != "server.json")


def expected_states(ids):
    return (torch.tensor(ids, dtype=torch.float32)[:, None, None] + torch.arange(4.0)[None, :, None]).expand(-1, 4, 64)


def test_client_round_robin_checks_and_deletes(fake_servers):
    from speculators_hf.online import HiddenStatesClient

    a, b = fake_servers(), fake_servers()
    client = HiddenStatesClient([a.url, b.url], hidden_shape=(4, 64), layer_ids=[1, 2, 3, 4])
    for n in (1, 7, 30, 3):
        ids = list(range(5, 5 + n))
        got = client.fetch(ids)
        assert got.skip_reason is None and got.retries == 0 and got.spool_bytes > 0
        assert torch.equal(got.hidden_states, expected_states(ids))
    assert a.requests == b.requests == 2 and client.stats() == {a.url: 2, b.url: 2}
    assert spool_files(a) == spool_files(b) == []  # read, then deleted with their lock files


def test_client_retries_other_servers_then_skips_bad_states(fake_servers):
    from speculators_hf.online import HiddenStatesClient

    down, nan, ok = fake_servers("503"), fake_servers("nan"), fake_servers()
    client = HiddenStatesClient([down.url, nan.url, ok.url], hidden_shape=(4, 64), timeout=10)
    results = [client.fetch([3, 4, 5]) for _ in range(4)]
    assert all(
        r.hidden_states is not None and torch.equal(r.hidden_states, expected_states([3, 4, 5])) for r in results
    )
    assert sum(r.retries for r in results) >= 2 and ok.requests == 4  # the 503 and NaN answers went elsewhere
    only_nan = HiddenStatesClient([nan.url], hidden_shape=(4, 64), bad_attempts=2)
    skipped = only_nan.fetch([1, 2])
    assert skipped.hidden_states is None and "NaN" in skipped.skip_reason
    assert spool_files(nan) == []


def test_client_user_errors_are_one_line(fake_servers, tmp_path):
    from speculators_hf.online import HiddenStatesClient, ProducerUnavailable
    from speculators_hf.online.client import OnlineError
    from speculators_hf.online.server import free_port

    with pytest.raises(OnlineError, match="computed 2 prompt tokens, not the 3 sent"):
        HiddenStatesClient([fake_servers("wrong_ids").url]).fetch([1, 2, 3])
    other = fake_servers(layer_ids=(1, 2, 4))
    with pytest.raises(OnlineError, match=r"captures layer ids \[1, 2, 4\] but the data needs \[1, 2, 3, 4\]"):
        HiddenStatesClient([other.url], layer_ids=[1, 2, 3, 4]).fetch([1, 2, 3])
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ProducerUnavailable, match="no hidden-states server answered for 2 s") as caught:
        HiddenStatesClient([dead], timeout=2).fetch([1, 2, 3])
    assert "\n" not in str(caught.value) and "Connection refused" in str(caught.value)


def test_dataset_placeholders_for_skipped_samples_and_worker_errors(full_and_tokens, fake_servers, tmp_path):
    from speculators_hf.online.client import ProducerUnavailable
    from speculators_hf.online.dataset import FETCH_STATS_COLUMNS, OnlineHiddenStatesDataset
    from speculators_hf.online.server import free_port
    from speculators_hf.training.collator import FETCH_STATS, DataCollatorForEagle3

    _, _, tokens_dir, _ = full_and_tokens
    tokens = ShardDataset(tokens_dir, tokens_only=True)
    ok, nan = fake_servers(), fake_servers("nan")
    good = OnlineHiddenStatesDataset(tokens, [ok.url], [1, 2, 3, 4], 64, max_in_flight=4)
    sample = good[0]
    assert torch.equal(sample["hidden_states"], expected_states(tokens[0]["input_ids"].tolist()))
    assert sample["fetch_stats"][FETCH_STATS_COLUMNS.index("fetched")] == 1
    bad = OnlineHiddenStatesDataset(tokens, [nan.url], [1, 2, 3, 4], 64)
    packed = PackedDataset(bad, list(range(4)), 512)  # asks the online dataset for a whole pack at once
    batch = DataCollatorForEagle3(512)(packed.__getitems__([0]))
    assert batch["loss_mask"].sum() == 0 and batch["aux_hidden_states"].abs().sum() == 0  # zero-loss placeholders
    assert batch[FETCH_STATS][:, FETCH_STATS_COLUMNS.index("skipped")].sum() == len(packed.packs[0])
    # an error inside a DataLoader worker still reaches the user as one line
    dead = OnlineHiddenStatesDataset(tokens, [f"http://127.0.0.1:{free_port()}"], [1, 2, 3, 4], 64, timeout=1)
    loader = torch.utils.data.DataLoader(dead, batch_size=None, num_workers=1)
    with pytest.raises(ProducerUnavailable) as caught:
        next(iter(loader))
    assert str(caught.value).startswith("no hidden-states server answered") and "\n" not in str(caught.value)


def test_train_cli_without_servers_fails_with_one_line(full_and_tokens, tiny_verifier_path, tmp_path, capsys):
    from speculators_hf.online.server import free_port
    from speculators_hf.training.cli import main

    _, _, tokens_dir, _ = full_and_tokens
    argv = ["--verifier-name-or-path", str(tiny_verifier_path), "--data-path", str(tokens_dir), "--save-path"]
    argv += [str(tmp_path / "ckpt"), "--hidden-states-source", "online", "--hidden-states-timeout", "1"]
    assert main(argv) == 2 and "needs --hidden-states-servers" in capsys.readouterr().err
    assert main(argv + ["--hidden-states-servers", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("speculators-hf train: error: no hidden-states server answered for 1 s")


def test_a_spool_folder_with_other_files_is_refused_and_left_as_it_is(tiny_verifier_path, tmp_path, capsys):
    from speculators_hf.online.server import main

    spool = tmp_path / "mine"
    spool.mkdir()
    (spool / "weights.safetensors").write_bytes(b"user data")
    argv = ["--target-model-path", str(tiny_verifier_path), "--spool-dir", str(spool), "--port", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty and no hidden-states server used it" in err[0]
    assert (spool / "weights.safetensors").read_bytes() == b"user data"
