"""Every source format normalises to `messages` with role/content."""

import json

import pytest
from datasets import Dataset

from speculators_hf.datagen.sources import BUILTIN_SOURCES, load_source, normalize_messages
from speculators_hf.utils import UserError

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"
EXPECTED_FIRST_SHAREGPT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def normalized(dataset):
    return [normalize_messages(row) for row in dataset]


def test_sharegpt_shaped_json(tmp_path):
    rows = normalized(load_source(str(FIXTURES / "sharegpt_sample.json"), cache_dir=str(tmp_path)))
    assert rows[0] == EXPECTED_FIRST_SHAREGPT
    assert rows[2][1] == {"role": "assistant", "content": "Why did the chicken cross the road?"}


def test_ultrachat_shaped_jsonl(tmp_path):
    rows = normalized(load_source(str(FIXTURES / "ultrachat_sample.jsonl"), cache_dir=str(tmp_path)))
    assert [m["role"] for m in rows[1]] == ["user", "assistant", "user", "assistant"]
    assert rows[0][1] == {"role": "assistant", "content": "Blue."}


def test_plain_json_list_of_messages(tmp_path):
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([{"messages": chat}, {"messages": chat[::-1]}]))
    assert normalized(load_source(str(path), cache_dir=str(tmp_path / "c"))) == [chat, chat[::-1]]


def test_save_to_disk_folder(tmp_path):
    chat = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    Dataset.from_list([{"conversations": chat}]).save_to_disk(str(tmp_path / "saved"))
    rows = normalized(load_source(str(tmp_path / "saved")))
    assert rows == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]


def test_unknown_roles_and_builtin_names():
    assert normalize_messages({"messages": [{"role": "narrator", "content": "x"}]}) is None
    assert normalize_messages({"messages": []}) is None
    assert BUILTIN_SOURCES["sharegpt"][0] == "Aeala/ShareGPT_Vicuna_unfiltered"
    assert BUILTIN_SOURCES["ultrachat"] == ("HuggingFaceH4/ultrachat_200k", "train_sft")


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_source(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "no chat here"}\n')
    with pytest.raises(UserError, match=r"columns \['text'\]; expected `messages`"):
        load_source(str(bad), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match="cannot load it") as err:  # offline: hub ids fail as one line
        load_source("nobody/not-a-dataset-xyz", cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(err.value)
