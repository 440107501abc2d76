"""Vocab mapping on hand-computed cases, and its CLI errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from speculators_hf.utils import UserError
from speculators_hf.vocab import build_vocab_mapping, load_token_freq, validate_vocab_mapping
from speculators_hf.vocab.cli import main


def test_hand_computed_mapping():
    # counts: id 5 -> 10, id 2 -> 7, ids 7 and 3 tie at 4 (lower id wins), id 9 -> 1
    freq = {5: 10, 2: 7, 7: 4, 3: 4, 9: 1}
    d2t, t2d = build_vocab_mapping(freq, draft_vocab_size=3, target_vocab_size=10)
    # selected {5, 2, 3} sorted -> [2, 3, 5]; d2t = selected - arange
    assert d2t.tolist() == [2, 2, 3] and d2t.dtype == np.int64
    assert np.nonzero(t2d)[0].tolist() == [2, 3, 5] and t2d.dtype == bool and len(t2d) == 10
    validate_vocab_mapping(d2t, t2d, 3, 10)


def test_padding_with_lowest_unused_ids():
    d2t, t2d = build_vocab_mapping({4: 3, 1: 2}, draft_vocab_size=4, target_vocab_size=6)
    assert (np.arange(4) + d2t).tolist() == [0, 1, 2, 4]
    assert t2d.tolist() == [True, True, True, False, True, False]


def test_errors():
    with pytest.raises(UserError, match="larger than the target vocabulary"):
        build_vocab_mapping({1: 1}, draft_vocab_size=11, target_vocab_size=10)
    with pytest.raises(UserError, match="ids up to 12"):
        build_vocab_mapping({12: 1}, draft_vocab_size=2, target_vocab_size=10)


def test_load_token_freq_dict_and_tensor(tmp_path):
    torch.save({3: 2, 1: 5}, tmp_path / "d.pt")
    torch.save(torch.tensor([0, 5, 0, 2]), tmp_path / "t.pt")
    assert load_token_freq(tmp_path / "d.pt") == {3: 2, 1: 5} == load_token_freq(tmp_path / "t.pt")


def test_cli_writes_files_and_checks_the_model(tmp_path, tiny_verifier_path):
    torch.save({i: 100 - i for i in range(50)}, tmp_path / "freq.pt")
    out = tmp_path / "vocab"
    assert (
        main(
            [
                "--token-freq-path",
                str(tmp_path / "freq.pt"),
                "--draft-vocab-size",
                "8",
                "--target-model-path",
                str(tiny_verifier_path),
                "--output-path",
                str(out),
            ]
        )
        == 0
    )
    assert np.load(out / "d2t.npy").tolist() == [0] * 8 and np.load(out / "t2d.npy").sum() == 8
    assert (
        main(
            [
                "--token-freq-path",
                str(tmp_path / "freq.pt"),
                "--draft-vocab-size",
                "8",
                "--target-model-path",
                str(tiny_verifier_path),
                "--target-vocab-size",
                "99",
                "--output-path",
                str(out),
            ]
        )
        == 2
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--draft-vocab-size", "20", "--target-vocab-size", "10"], "larger than the target vocabulary"),
        (["--draft-vocab-size", "4"], "--target-vocab-size N or --target-model-path"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, extra, message):
    torch.save({1: 1}, tmp_path / "freq.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "speculators_hf.vocab",
            "--token-freq-path",
            str(tmp_path / "freq.pt"),
            "--output-path",
            str(tmp_path),
            *extra,
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "d2t.npy").exists()
