"""The per-family pipeline shared by the family tests: datagen (transformers) -> vocab -> 1 epoch of training ->
export, once per family (and per draft option) and session (`family_runs`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from speculators_hf.tiny_kit import TINY_FAMILIES, tiny_family_verifier, write_chat_jsonl
from speculators_hf.utils import UserError

FAMILIES = list(TINY_FAMILIES)
SEQ, DRAFT_VOCAB = 96, 384
MAX_NEW = 16  # greedy tokens per serving prompt
# Draft options: the family whose data each trains on, and its training flags.
OPTIONS = {
    "eagle-3.1-norms": ("llama-3", ["--fc-norm", "true", "--norm-before-fc", "true"]),
    "qwen3-layer": ("qwen3", ["--draft-layer-type", "qwen3"]),
    "narrow-draft": ("llama-3", ["--draft-hidden-size", "32", "--draft-intermediate-size", "96"]),
    "sliding-window": ("mistral", ["--draft-sliding-window", "8"]),
}


def datagen_args(verifier: Path, chats: Path, out: Path, cache: Path, backend: str = "transformers"):
    from speculators_hf.datagen import DatagenArguments

    return DatagenArguments(
        target_model_path=str(verifier),
        train_data_path=str(chats),
        output_dir=str(out),
        cache_dir=str(cache),
        seq_length=SEQ,
        backend=backend,
        batch_size=4,
        dtype="float32",
    )


def train_and_export(verifier: Path, data: Path, root: Path, *flags: str) -> dict:
    """1 epoch of `speculators-hf train` on `data`, then export of the epoch draft (or its one-line refusal)."""
    from speculators_hf.commandline import make_parser, parse
    from speculators_hf.export import export_checkpoint
    from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments, train
    from tests.training_data import train_argv

    model_args, train_args = parse(
        make_parser((Eagle3ModelArguments, Eagle3TrainingArguments)),
        train_argv(verifier, data, root / "ckpt", "--total-seq-len", "192", "--ttt-steps", "2", *flags),
    )[:2]
    trainer = train(model_args, train_args)
    try:
        exported, error = (
            export_checkpoint(root / "ckpt" / "0", root / "draft", verifier_hub_id=str(verifier))[0],
            None,
        )
    except UserError as err:
        exported, error = None, str(err)
    return dict(trainer=trainer, exported=exported, export_error=error)


def load_verifier(path: Path):
    from speculators_hf.tiny_kit import tiny_family_model_class

    model_class = tiny_family_model_class(AutoConfig.from_pretrained(path))
    return model_class.from_pretrained(path, dtype=torch.float32).eval()


def serving_prompts(verifier: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from tests.draft_fit import chat_prompts

    return chat_prompts(AutoTokenizer.from_pretrained(verifier), 3) + [[5, 17, 300, 41, 1000, 7]]


def run_family(family: str, root: Path, chats: Path) -> dict:
    """One family through datagen (transformers) -> vocab -> 1 epoch of training -> export (or its refusal).

    The draft vocabulary is datagen's most frequent assistant tokens plus every token of the verifier's greedy
    continuations of the serving prompts, so that a draft fitted to them (test_families.py) can be accepted."""
    from collections import Counter

    from speculators_hf.datagen import build_dataset
    from speculators_hf.evaluation.online import greedy_baseline
    from speculators_hf.vocab import build_vocab_mapping, save_vocab_mapping

    verifier = tiny_family_verifier(family)
    data = root / "data"
    summary = build_dataset(datagen_args(verifier, chats, data, root / "cache"))
    prompts = serving_prompts(verifier)
    reference = greedy_baseline(load_verifier(verifier), prompts, MAX_NEW)[0]
    freq = Counter(torch.load(data / "token_freq.pt", weights_only=True))
    freq.update({t: 10**6 for t in set().union(*map(set, reference))})
    vocab_size = AutoConfig.from_pretrained(verifier).get_text_config().vocab_size
    d2t, t2d = build_vocab_mapping(freq, DRAFT_VOCAB, vocab_size)
    save_vocab_mapping(data, d2t, t2d)
    return dict(
        family=family, root=root, chats=chats, verifier=verifier, data=data, summary=summary, d2t=d2t, t2d=t2d,
        prompts=prompts, reference=reference, **train_and_export(verifier, data, root),
    )  # fmt: skip


class FamilyRuns:
    """Runs each family's pipeline (and each draft option) on first use and keeps the result for the session."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.chats = write_chat_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", limit=10)
        self.runs: dict[str, dict] = {}

    def get(self, family: str) -> dict:
        if family not in self.runs:
            torch.set_num_threads(1)
            self.runs[family] = run_family(family, self.tmp_path_factory.mktemp(family), self.chats)
        return self.runs[family]

    def option(self, name: str) -> dict:
        """A draft option (`OPTIONS`) trained on its family's data and exported."""
        if name not in self.runs:
            family, flags = OPTIONS[name]
            base = self.get(family)
            root = self.tmp_path_factory.mktemp(name)
            trained = train_and_export(base["verifier"], base["data"], root, *flags)
            self.runs[name] = {**base, "option": name, "root": root, **trained}
        return self.runs[name]


@pytest.fixture(scope="session", name="family_runs")
def family_runs_fixture(tmp_path_factory) -> FamilyRuns:
    """Import this into a test module to use the `family_runs` fixture."""
    return FamilyRuns(tmp_path_factory)
