"""build_dataset end to end on the tiny verifier (transformers backend): shards, metadata, resume, v1, errors."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from speculators_hf.datagen import DatagenArguments, HFHiddenStatesBackend, ShardDataset, build_dataset
from speculators_hf.datagen.cli import main
from speculators_hf.datagen.sources import load_source, normalize_messages
from speculators_hf.datagen.tokenize import tokenize_conversation
from speculators_hf.modeling.configuration_eagle3 import default_aux_layer_ids
from speculators_hf.tiny_kit import write_chat_jsonl
from speculators_hf.utils import UserError

SEQ = 192


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", limit=40)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def make_args(model, data, out, cache_dir, **kw):
    kw = {"seq_length": SEQ, "backend": "transformers", "shard_size_mb": 1, "batch_size": 4, **kw}
    return DatagenArguments(
        target_model_path=str(model), train_data_path=str(data), output_dir=str(out), cache_dir=cache_dir, **kw
    )


@pytest.fixture(scope="module")
def built(tiny_verifier_path, chats, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    summary = build_dataset(make_args(tiny_verifier_path, chats, out, cache_dir))
    return out, summary


def files_of(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("data-*.safetensors"))}


def test_shards_hold_tokens_masks_and_states(built, tiny_verifier_path, chats):
    out, summary = built
    tokenizer = AutoTokenizer.from_pretrained(tiny_verifier_path)
    expected = [tokenize_conversation(tokenizer, normalize_messages(row), SEQ) for row in load_source(str(chats))]
    expected = [e for e in expected if not e["skip_reason"]]
    dataset = ShardDataset(out)
    assert len(dataset) == len(expected) == summary["samples"] and summary["complete"]
    assert summary["shards"] > 1 and dataset.hidden_shape == (4, 64)
    reference = HFHiddenStatesBackend.from_pretrained(str(tiny_verifier_path), [1, 2, 3, 4], dtype=torch.float32)
    for i in (0, len(dataset) - 1):
        sample = dataset[i]
        assert sample["input_ids"].tolist() == expected[i]["input_ids"]
        assert sample["loss_mask"].tolist() == expected[i]["loss_mask"]
        ref = reference.extract([expected[i]["input_ids"]])[0]  # [T, 4, H], batch of 1
        assert sample["hidden_states"].dtype == torch.float32
        torch.testing.assert_close(sample["hidden_states"], ref, atol=1e-5, rtol=1e-5)
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and [s["file"] for s in index["shards"]] == sorted(files_of(out))
    assert sum(s["num_tokens"] for s in index["shards"]) == summary["tokens"]


def test_data_config_and_token_freq(built):
    out, summary = built
    config = json.loads((out / "data_config.json").read_text())
    assert config["status"] == "complete" and config["data_format_version"] == 2
    assert config["layer_ids"] == default_aux_layer_ids(4) + [4] == [1, 2, 3, 4]
    assert config["aux_layer_ids"] == [1, 2, 3] and config["target_layer_id"] == 4
    assert "input to decoder layer i" in config["layer_id_convention"]
    assert config["model"]["num_hidden_layers"] == 4 and config["model"]["hidden_states_dtype"] == "float32"
    assert {"torch", "transformers", "datasets"} <= set(config["package_versions"])
    assert config["hidden_states_layout"]["tensors"]["hidden_states"] == "float32 [N, 4, 64]"
    assert config["summary"]["samples"] == summary["samples"] and len(config["fingerprint"]) == 16
    freq = torch.load(out / "token_freq.pt", weights_only=True)
    counts = Counter()
    for sample in ShardDataset(out):
        counts.update(sample["input_ids"][sample["loss_mask"].bool()].tolist())
    assert freq == dict(counts) and isinstance(next(iter(freq)), int)


def test_second_run_reuses_cache_and_shards(built, tiny_verifier_path, chats, cache_dir):
    out, _ = built
    before = files_of(out)
    summary = build_dataset(make_args(tiny_verifier_path, chats, out, cache_dir))
    assert summary["this_run"]["samples"] == 0 and files_of(out) == before


class CrashAfter:
    """Wraps a backend; raises on the n-th call to extract (a kill in the middle of a run)."""

    def __init__(self, backend, n):
        self.inner, self.n, self.name, self.layer_ids = backend, n, "crashing", backend.layer_ids

    def extract(self, batch):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("killed")
        return self.inner.extract(batch)

    def close(self):
        pass


def test_kill_and_resume_gives_identical_shards(built, tiny_verifier_path, chats, cache_dir, tmp_path):
    out, summary = built
    backend = HFHiddenStatesBackend.from_pretrained(str(tiny_verifier_path), [1, 2, 3, 4], dtype=torch.float32)
    args = make_args(tiny_verifier_path, chats, tmp_path / "resumed", cache_dir)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(args, backend=CrashAfter(backend, 2))
    partial = tmp_path / "resumed"
    index = json.loads((partial / "index.json").read_text())
    assert not index["complete"] and 0 < len(index["shards"]) < summary["shards"]
    assert [s["file"] for s in index["shards"]] == sorted(files_of(partial))  # only complete files, all listed
    assert not list(partial.glob(".*.tmp")) and json.loads((partial / "data_config.json").read_text())["status"] == (
        "running"
    )
    assert len(ShardDataset(partial)) == sum(s["num_samples"] for s in index["shards"])
    resumed = build_dataset(args)
    assert 0 < resumed["this_run"]["samples"] < summary["samples"]
    assert files_of(partial) == files_of(out)  # byte for byte the uninterrupted run


def test_v1_pt_output(tiny_verifier_path, chats, cache_dir, tmp_path):
    summary = build_dataset(
        make_args(tiny_verifier_path, chats, tmp_path, cache_dir, data_format_version=1, max_samples=3)
    )
    files = sorted(tmp_path.glob("data_*.pt"))
    assert len(files) == summary["samples"] == 3 and not (tmp_path / "index.json").exists()
    data = torch.load(files[0], weights_only=True)
    assert set(data) == {"input_ids", "hidden_states", "loss_mask"}
    assert len(data["hidden_states"]) == 4 and data["hidden_states"][0].shape == (len(data["input_ids"]), 64)


def test_refuses_to_mix_runs(built, tiny_verifier_path, chats, cache_dir):
    out, _ = built
    with pytest.raises(UserError, match="other flags or inputs.*--overwrite"):
        build_dataset(make_args(tiny_verifier_path, chats, out, cache_dir, seq_length=SEQ + 1))


def test_data_parallel_replicas_on_cpu(built, tiny_verifier_path, chats, cache_dir, tmp_path):
    out, summary = built
    replicated = build_dataset(make_args(tiny_verifier_path, chats, tmp_path, cache_dir, data_parallel_size=2))
    assert replicated["complete"] and files_of(tmp_path) == files_of(out)  # 2 processes: --rank 0/1 --world-size 2
    assert json.loads((tmp_path / "index.json").read_text()) == json.loads((out / "index.json").read_text())


def run_cli(*argv):
    proc = subprocess.run(
        [sys.executable, "-m", "speculators_hf.datagen", *map(str, argv)], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    return proc, lines


# Three cases through a real subprocess (exit code, stderr, no traceback); the rest through `main` (imports are slow).
@pytest.mark.parametrize(
    "case, subprocess_run",
    [
        ("model", True),
        ("skipped", True),
        ("mixed", True),
        ("data", False),
        ("layers", False),
        ("backend", False),
    ],
)
def test_cli_bad_inputs_are_one_line_errors(
    case, subprocess_run, built, tiny_verifier_path, chats, cache_dir, tmp_path, capsys
):
    out, _ = built
    target = tmp_path / "out"
    flags = {
        "--target-model-path": tiny_verifier_path,
        "--train-data-path": chats,
        "--output-dir": target,
        "--cache-dir": cache_dir,
        "--backend": "transformers",
        "--seq-length": SEQ,
        "--shard-size-mb": 1,
    }
    expected = {
        "model": ("--target-model-path", tmp_path / "no-model", "cannot load its config"),
        "data": ("--train-data-path", tmp_path / "none.jsonl", "does not exist"),
        "layers": ("--layer-ids", "1 9 4", "out of range; the verifier has 4 decoder layers"),
        "skipped": ("--train-data-path", tmp_path / "users.jsonl", "chats were skipped"),
        "backend": ("--backend", "tensorrt", "choose one of auto, vllm, transformers"),
        "mixed": ("--seq-length", SEQ + 7, "holds data written with other flags"),
    }[case]
    flags[expected[0]] = expected[1]
    if case == "skipped":
        (tmp_path / "users.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    if case == "mixed":
        flags["--output-dir"] = target = out
    before = {p.name: p.stat().st_mtime_ns for p in Path(target).glob("*")} if case == "mixed" else None
    argv = [x for k, v in flags.items() for x in (k, *str(v).split())]
    if subprocess_run:
        proc, lines = run_cli(*argv)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
    else:
        assert main(argv) == 2
        lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    details = [line for line in lines if line.startswith("  ")]  # indented details may follow the error line
    assert len(errors) == 1 and errors[0] == lines[-1 - len(details)] and expected[2] in errors[0]
    if case == "mixed":
        assert {p.name: p.stat().st_mtime_ns for p in Path(target).glob("*")} == before
    else:
        assert not target.exists()


def test_rank_split_across_machines(built, tiny_verifier_path, chats, cache_dir, tmp_path):
    out, summary = built
    first = build_dataset(make_args(tiny_verifier_path, chats, tmp_path, cache_dir, rank=1, world_size=2))
    assert not first["complete"] and not (tmp_path / "token_freq.pt").exists()  # rank 0 writes token_freq
    second = build_dataset(make_args(tiny_verifier_path, chats, tmp_path, cache_dir, rank=0, world_size=2))
    assert second["complete"] and files_of(tmp_path) == files_of(out)
    assert json.loads((tmp_path / "index.json").read_text()) == json.loads((out / "index.json").read_text())


def test_yaml_config_and_chat_template_file(tiny_verifier_path, chats, cache_dir, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    config = tmp_path / "datagen.yaml"
    values = {
        "target_model_path": tiny_verifier_path,
        "train_data_path": chats,
        "output_dir": tmp_path / "o",
        "cache_dir": cache_dir,
        "backend": "transformers",
        "max_samples": 2,
        "seq_length": 64,
    }
    config.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    assert main(["--config", str(config), "--chat-template", str(template)]) == 0
    sample = ShardDataset(tmp_path / "o")[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_verifier_path)
    assert tokenizer.decode(sample["input_ids"][:6]).startswith("user: ")
    saved = json.loads((tmp_path / "o" / "data_config.json").read_text())
    assert saved["arguments"]["chat_template"] == str(template) and saved["arguments"]["seq_length"] == 64


def test_planning_reads_the_tokenized_columns_once_not_row_by_row(
    built, tiny_verifier_path, chats, cache_dir, monkeypatch
):
    """`prepare` on a cached tokenization reads the lengths as one column: indexing a lazy `datasets` column row by
    row rebuilds a table per row (its cost grows with the table: minutes at 100k chats)."""
    import datasets

    from speculators_hf.datagen.plan import prepare

    calls = Counter()
    real = datasets.Dataset.__getitem__

    def counted(self, key):
        calls[type(key).__name__] += 1
        return real(self, key)

    monkeypatch.setattr(datasets.Dataset, "__getitem__", counted)
    plan = prepare(make_args(tiny_verifier_path, chats, built[0], cache_dir))
    assert plan.token_stats["cache_hit"] and len(plan.lengths) >= 20
    assert sum(calls.values()) <= 3, calls
    assert [plan.index_entry(k)["num_tokens"] for k in range(len(plan.shards))] == [
        sum(plan.lengths[i] for i in shard) for shard in plan.shards
    ]


def test_index_is_rewritten_a_bounded_number_of_times(
    built, tiny_verifier_path, chats, cache_dir, tmp_path, monkeypatch
):
    """Each index.json rewrite looks at every planned shard: rewritten after every shard, a 31k-shard run would make
    ~1e9 checks. It is rewritten at most `INDEX_REWRITES` times in the loop (plus the last), and ends the same."""
    from speculators_hf.datagen import builder

    calls = []
    real = builder.write_index
    monkeypatch.setattr(builder, "write_index", lambda *a: (calls.append(1), real(*a)))
    monkeypatch.setattr(builder, "INDEX_REWRITES", 1, raising=False)  # 1 rewrite per run: every shard count shows it
    out, summary = built
    assert build_dataset(make_args(tiny_verifier_path, chats, tmp_path / "out", cache_dir))["shards"] > 2
    assert len(calls) <= 2, len(calls)
    assert json.loads((tmp_path / "out" / "index.json").read_text()) == json.loads((out / "index.json").read_text())
