"""Loss masks from chat templates (token by token, three template styles) and the fingerprint-cached map."""

import json
import re
from importlib.util import find_spec
from pathlib import Path

import datasets
import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from speculators_hf.datagen.sources import load_source
from speculators_hf.datagen.tokenize import tokenize_conversation, tokenize_dataset
from speculators_hf.utils import UserError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi, how are you?"},
    {"role": "assistant", "content": "good thanks. and you?"},
    {"role": "user", "content": "fine"},
    {"role": "assistant", "content": "great to hear"},
]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
    "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral style: no generation prompt at all, assistant text follows [/INST] and ends with eos.
INST_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
# The assistant text follows "Assistant: " with a space, so byte-level BPE merges " good" across the boundary.
MERGING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_verifier_path):
    return AutoTokenizer.from_pretrained(tiny_verifier_path)


def runs(tokenizer, ids, mask):
    """Decode the maximal runs of equal mask values: [(mask, text), ...]."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            out.append((mask[start], tokenizer.decode(ids[start:i])))
            start = i
    return out


def assistant_texts(result, tokenizer):
    return [text for m, text in runs(tokenizer, result["input_ids"], result["loss_mask"]) if m]


def test_chatml_mask_token_by_token(tokenizer):
    result = tokenize_conversation(tokenizer, CHAT, seq_length=1000)
    assert result["skip_reason"] == "" and not result["boundary_merge"]
    assert result["input_ids"] == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert runs(tokenizer, result["input_ids"], result["loss_mask"]) == [
        (
            0,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi, how are you?<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        (1, "good thanks. and you?<|im_end|>"),  # the newline after <|im_end|> is never generated
        (0, "\n<|im_start|>user\nfine<|im_end|>\n<|im_start|>assistant\n"),
        (1, "great to hear<|im_end|>"),
        (0, "\n"),
    ]


def test_llama3_header_mask(tokenizer):
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens({"additional_special_tokens": specials, "bos_token": "<|begin_of_text|>"})
    result = tokenize_conversation(tok, CHAT, seq_length=1000, chat_template=LLAMA3_TEMPLATE)
    pieces = runs(tok, result["input_ids"], result["loss_mask"])
    assert [text for m, text in pieces if m] == ["good thanks. and you?<|eot_id|>", "great to hear<|eot_id|>"]
    assert pieces[0][1].startswith("<|begin_of_text|><|start_header_id|>system")
    assert pieces[-2][1].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_without_generation_prompt(tokenizer):
    result = tokenize_conversation(tokenizer, CHAT[1:], seq_length=1000, chat_template=INST_TEMPLATE)
    assert assistant_texts(result, tokenizer) == ["good thanks. and you?<|im_end|>", "great to hear<|im_end|>"]
    assert runs(tokenizer, result["input_ids"], result["loss_mask"])[0] == (0, "[INST] hi, how are you? [/INST]")


def test_boundary_merge_falls_back_to_offsets(tokenizer):
    result = tokenize_conversation(tokenizer, CHAT[1:3], seq_length=1000, chat_template=MERGING_TEMPLATE)
    assert result["boundary_merge"]
    assert (
        result["input_ids"]
        == tokenizer(
            tokenizer.apply_chat_template(CHAT[1:3], tokenize=False, chat_template=MERGING_TEMPLATE),
            add_special_tokens=False,
        )["input_ids"]
    )
    assert assistant_texts(result, tokenizer) == [" good thanks. and you?<|im_end|>"]


def test_truncation_and_skips(tokenizer):
    full = tokenize_conversation(tokenizer, CHAT, seq_length=1000)
    first_assistant = full["loss_mask"].index(1)
    cut = tokenize_conversation(tokenizer, CHAT, seq_length=first_assistant + 2)
    assert cut["input_ids"] == full["input_ids"][: first_assistant + 2]
    assert cut["loss_mask"] == full["loss_mask"][: first_assistant + 2]
    assert tokenize_conversation(tokenizer, CHAT, seq_length=first_assistant)["skip_reason"].startswith("no assistant")
    assert tokenize_conversation(tokenizer, CHAT[:2], seq_length=100)["skip_reason"] == "no assistant turn"


def test_empty_think_block_is_not_supervised(tokenizer):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\n\n</think>\n\nhello"}]
    assert assistant_texts(tokenize_conversation(tokenizer, chat, 100), tokenizer) == ["hello<|im_end|>"]


def _write_jsonl(path, chats):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def test_map_cache_hit_and_misses(tokenizer, tmp_path):
    chats = [CHAT, CHAT[1:3], CHAT[:2]]
    cache = tmp_path / "cache"
    raw = load_source(str(_write_jsonl(tmp_path / "a.jsonl", chats)), cache_dir=str(cache))
    first, stats = tokenize_dataset(raw, tokenizer, 64, cache_dir=str(cache))
    assert not stats["cache_hit"] and stats["num_skipped"] == 1 and stats["skip_reasons"] == {"no assistant turn": 1}
    raw_again = load_source(str(tmp_path / "a.jsonl"), cache_dir=str(cache))
    second, stats2 = tokenize_dataset(raw_again, tokenizer, 64, cache_dir=str(cache))
    assert stats2["cache_hit"] and stats2["fingerprint"] == stats["fingerprint"]
    assert second.cache_files[0]["filename"] == stats["cache_file"]
    assert second["input_ids"] == first["input_ids"]
    # Any change of parameters, template, tokenizer or data misses the cache.
    assert not tokenize_dataset(raw_again, tokenizer, 65, cache_dir=str(cache))[1]["cache_hit"]
    assert not tokenize_dataset(raw_again, tokenizer, 64, INST_TEMPLATE, cache_dir=str(cache))[1]["cache_hit"]
    other_tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other_tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert not tokenize_dataset(raw_again, other_tok, 64, cache_dir=str(cache))[1]["cache_hit"]
    changed = load_source(str(_write_jsonl(tmp_path / "b.jsonl", chats[:2])), cache_dir=str(cache))
    assert not tokenize_dataset(changed, tokenizer, 64, cache_dir=str(cache))[1]["cache_hit"]


def test_processes_share_the_work_with_the_same_rows(tokenizer, tmp_path):
    chats = [CHAT, CHAT[1:3], CHAT[:2], CHAT[:4], CHAT]
    cache = tmp_path / "cache"
    raw = load_source(str(_write_jsonl(tmp_path / "a.jsonl", chats)), cache_dir=str(cache))
    shared, stats = tokenize_dataset(raw, tokenizer, 64, cache_dir=str(cache), num_proc=2)
    assert not stats["cache_hit"] and stats["num_skipped"] == 1
    again, stats2 = tokenize_dataset(raw, tokenizer, 64, cache_dir=str(cache), num_proc=2)
    names = [f"tokenized-{stats['fingerprint']}-i32u8_0000{rank}_of_00002.arrow" for rank in (0, 1)]
    assert stats2["cache_hit"] and [f["filename"] for f in again.cache_files] == [
        str(cache / "speculators_hf" / name) for name in names
    ]
    alone, stats3 = tokenize_dataset(raw, tokenizer, 64, cache_dir=str(tmp_path / "other"))
    assert stats3["fingerprint"] == stats["fingerprint"] and alone.to_list() == shared.to_list()


def test_the_cache_holds_five_bytes_per_token_and_an_older_one_is_not_misread(tokenizer, tmp_path):
    """ids int32 and the mask uint8 (the inferred int64 mask took 12 bytes per token). A cache of the inferred types
    (an earlier version's) is left alone and tokenized anew, with the same fingerprint and rows."""
    from speculators_hf.tiny_kit import chitchat_conversations

    raw = Dataset.from_list([{"messages": c} for c in chitchat_conversations(200)])
    tokenized, stats = tokenize_dataset(raw, tokenizer, 512, cache_dir=str(tmp_path / "cache"))
    tokens = sum(tokenized["num_tokens"])
    assert tokenized.features["input_ids"].feature.dtype == "int32"
    assert tokenized.features["loss_mask"].feature.dtype == "uint8"
    assert Path(stats["cache_file"]).stat().st_size / tokens < 6.5, stats["cache_file"]  # + Arrow's offsets

    older = tmp_path / "cache" / "speculators_hf" / f"tokenized-{stats['fingerprint']}.arrow"  # an earlier name
    tokenized.cast_column("loss_mask", datasets.List(datasets.Value("int64"))).save_to_disk(tmp_path / "old")
    [arrow] = (tmp_path / "old").glob("*.arrow")
    older.write_bytes(arrow.read_bytes())
    Path(stats["cache_file"]).unlink()
    again, stats2 = tokenize_dataset(raw, tokenizer, 512, cache_dir=str(tmp_path / "cache"))
    assert not stats2["cache_hit"] and stats2["fingerprint"] == stats["fingerprint"]
    assert again.features == tokenized.features and again.to_list() == tokenized.to_list()
    assert older.read_bytes() == arrow.read_bytes()  # not ours to replace


def test_all_skipped_explains_the_template(tokenizer, tmp_path):
    raw = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}] * 3)
    with pytest.raises(UserError, match="all 3 chats were skipped.*--chat-template") as err:
        tokenize_dataset(raw, tokenizer, 64, cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)
    only_users = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    with pytest.raises(UserError, match=r"^chats.jsonl: all 2 chats were skipped \(no assistant turn: 2\)") as err:
        tokenize_dataset(only_users, tokenizer, 64, cache_dir=str(tmp_path), source="chats.jsonl")
    # one short line; the rendered template (hundreds of characters on real templates) follows it as details
    assert "\n" not in str(err.value) and len(str(err.value)) < 200 and "im_start" not in str(err.value)
    assert re.search(r"roles \['user'\].*<\|im_start\|>user", err.value.details)


def test_tool_turns_are_context_rendered_with_the_rows_tools(tokenizer, tmp_path):
    """Tool results and assistant turns carrying `tool_calls` are rendered by a real template's tool branches (with
    the row's `tools`) and not trained; the answer after them is. Before, such chats were skipped (unknown role)."""
    vllm = find_spec("vllm")
    if vllm is None:
        pytest.skip("the template ships inside the vllm wheel")
    # Qwen3's published chat template (tools, <tool_call>, <tool_response>), as vLLM ships it for MiniCPM-V 4.5
    template = Path(vllm.submodule_search_locations[0], "transformers_utils/chat_templates/template_minicpmv45.jinja")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "18C and sunny", "tool_call_id": "1", "name": "get_weather"},
        {"role": "assistant", "content": "It is 18C and sunny."},
    ]
    path = tmp_path / "chats.jsonl"  # with a plain chat: Arrow gives its turns the tool keys, as None
    path.write_text(
        json.dumps({"messages": messages, "tools": tools}) + "\n" + json.dumps({"messages": CHAT[:3]}) + "\n"
    )
    tokenized, stats = tokenize_dataset(
        load_source(str(path)), tokenizer, 4096, template.read_text(), cache_dir=str(tmp_path / "cache")
    )
    assert stats["num_skipped"] == 0
    ids, mask = tokenized[0]["input_ids"], tokenized[0]["loss_mask"]
    text = tokenizer.decode(ids)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text  # the row's tools
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18C and sunny\n</tool_response><|im_end|>" in text
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "It is 18C and sunny.<|im_end|>"
