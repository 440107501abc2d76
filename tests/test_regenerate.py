"""Response regeneration (`speculators_hf.regenerate`): the rollout, the round trip through datagen, resume, engines.

Real tiny verifier and tokenizer; the transformers run of `reference` is shared by most tests. The reasoning and tool
tests drive the rollout with a scripted engine (fixed answers) to reach cases a tiny model never produces; the vLLM
tests start one in-process engine and one OpenAI-compatible server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from speculators_hf.datagen import (
    DatagenArguments,
    ShardDataset,
    build_dataset,
    normalize_messages,
    tokenize_conversation,
)
from speculators_hf.datagen.sources import chat_tools
from speculators_hf.regenerate import Generation, RegenerateArguments, make_engine, prepare, run
from speculators_hf.regenerate.rollout import Conversation, RolloutConfig
from speculators_hf.regenerate.sampling import Sampling
from speculators_hf.tiny_kit import build_tokenizer, chitchat_conversations
from speculators_hf.utils import RunFailed, UserError

MAX_NEW = 24
MAX_TURNS = 3
SYSTEM = {"role": "system", "content": "You are a friendly chat partner."}


def write_chats(path: Path, limit: int = 8, offset: int = 0) -> Path:
    """Chitchat rows; the first has a system turn, odd rows carry an `id`."""
    rows = []
    for k, messages in enumerate(chitchat_conversations(limit, offset)):
        row = {"messages": [SYSTEM, *messages] if k == 0 else messages}
        if k % 2:
            row["id"] = f"chat-{k}"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def make_args(verifier, chats, out, **overrides) -> RegenerateArguments:
    values = dict(
        target_model_path=str(verifier),
        train_data_path=str(chats),
        output_path=str(out),
        backend="transformers",
        max_new_tokens=MAX_NEW,
        max_turns=MAX_TURNS,
        max_model_len=512,
        cache_dir=str(Path(out).parent / "hf-cache"),
    )
    return RegenerateArguments(**{**values, **overrides})


class Recording:
    """A real engine whose requests and answers are kept for the assertions."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        self.name, self.version, self.max_model_len = engine.name, engine.version, engine.max_model_len

    def generate(self, requests):
        out = self.engine.generate(requests)
        self.calls += list(zip(requests, out))
        return out

    def close(self):
        self.engine.close()


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl")


@pytest.fixture(scope="module")
def reference(peaked_verifier_path, chats, tmp_path_factory):
    """Greedy multi-turn regeneration with transformers, every request and answer recorded."""
    out = tmp_path_factory.mktemp("reference") / "regen.jsonl"
    args = make_args(peaked_verifier_path, chats, out)
    plan = prepare(args)
    engine = Recording(make_engine(args, plan.sampling, plan.dtype, plan.model_config))
    result = run(args, engine=engine)
    engine.close()
    return SimpleNamespace(args=args, out=out, rows=read_jsonl(out), summary=result, calls=engine.calls)


# ----------------------------------------------------------------------------------------- the rollout


def test_every_user_turn_is_answered_given_the_regenerated_prefix(reference, chats, peaked_verifier_path):
    tokenizer = AutoTokenizer.from_pretrained(peaked_verifier_path)
    source = read_jsonl(chats)
    answers = {tuple(r.prompt_ids): g.token_ids for r, g in reference.calls}
    s = reference.summary
    assert len(reference.rows) == len(source) == s.conversations == s.regenerated + s.truncated > 3
    assert s.failed == s.skipped == s.turns_not_round_trip == 0
    for src, row in zip(source, reference.rows):
        messages = row["messages"]
        if "id" in src:
            assert row["id"] == src["id"]
        # System and user turns are the source's, untouched and in order; assistant turns sit where the source's did.
        assert [m["role"] for m in messages] == [m["role"] for m in src["messages"]][: len(messages)]
        kept = [m for m in messages if m["role"] != "assistant"]
        assert kept == [m for m in src["messages"] if m["role"] != "assistant"][: len(kept)]
        assert messages[-1]["role"] == "assistant" and 1 <= sum(m["role"] == "assistant" for m in messages) <= 3
        previous = None
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:j], add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            produced = answers[tuple(prompt_ids)]  # the verifier was asked exactly this prefix ...
            text = tokenizer.decode(produced, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            assert message["content"] == text  # ... and the row holds exactly its answer
            if previous is not None:  # the next prompt holds the regenerated answer, token for token
                assert prompt_ids[: len(previous[0]) + len(previous[1])] == previous[0] + previous[1]
            previous = (prompt_ids, produced)


def test_datagen_loss_mask_is_exactly_the_regenerated_tokens(reference, peaked_verifier_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(peaked_verifier_path)
    args = DatagenArguments(
        target_model_path=str(peaked_verifier_path),
        train_data_path=str(reference.out),
        output_dir=str(tmp_path / "data"),
        seq_length=1024,  # whole conversations (prompt + answer <= 512, plus the template's closing newline)
        backend="transformers",
        cache_dir=str(tmp_path / "cache"),
    )
    build_dataset(args)
    answers = {tuple(r.prompt_ids): g.token_ids for r, g in reference.calls}
    data, runs = ShardDataset(tmp_path / "data"), 0
    for i in range(len(data)):
        ids, mask = data[i]["input_ids"].tolist(), data[i]["loss_mask"].tolist()
        t = 0
        while t < len(ids):
            if not mask[t]:
                t += 1
                continue
            end = t
            while end < len(ids) and mask[end]:
                end += 1
            produced = answers[tuple(ids[:t])]  # everything before the span is a prompt the verifier was given
            closing = [] if produced[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]  # truncated turns
            assert ids[t:end] == produced + closing  # through the stop token; the template's newline is not trained
            runs, t = runs + 1, end
    assert runs == reference.summary.turns
    regeneration = json.loads((tmp_path / "data" / "data_config.json").read_text())["data"]["regeneration"]
    assert regeneration["matches_source"] is True
    assert regeneration["counts"]["turns"] == runs and regeneration["verifier"]["name_or_path"] == str(
        peaked_verifier_path
    )


def test_turns_last_and_truncation(peaked_verifier_path, chats, tmp_path):
    source = read_jsonl(chats)[:3]
    # --turns last, into a save_to_disk folder: the source history, then one regenerated answer.
    args = make_args(peaked_verifier_path, chats, tmp_path / "last", turns="last", max_samples=3, max_model_len=2048)
    last = run(args)
    from datasets import load_from_disk

    rows = list(load_from_disk(str(tmp_path / "last")))
    assert last.written == len(rows) == 2 and (tmp_path / "last" / "regenerate_config.json").exists()
    (failure,) = read_jsonl(tmp_path / "last" / "failures.jsonl")  # chat 2 is 6.7k tokens long
    assert failure["index"] == 2 and "over --max-model-len" in failure["reason"]
    for src, row in zip(source, rows):
        end = max(i for i, m in enumerate(src["messages"]) if m["role"] == "assistant")
        assert [dict(m) for m in row["messages"][:end]] == src["messages"][:end] and len(row["messages"]) == end + 1

    # With --after-truncation end, a turn cut at --max-new-tokens ends the conversation (kept by default) ...
    cut_args = dict(max_new_tokens=2, max_samples=3, after_truncation="end")
    cut = run(make_args(peaked_verifier_path, chats, tmp_path / "cut.jsonl", **cut_args))
    assert cut.truncated == cut.truncated_turns == 3 and cut.regenerated == 0
    assert all(len(r["messages"]) in (2, 3) for r in read_jsonl(tmp_path / "cut.jsonl"))  # [system,] user, answer
    # ... or dropped with --drop-truncated; nothing disappears silently (here nothing is left: the run fails).
    args = make_args(peaked_verifier_path, chats, tmp_path / "drop.jsonl", max_new_tokens=2, max_samples=3)
    args.drop_truncated = True
    with pytest.raises(RunFailed, match=r"produced no conversations \(3 truncated, 0 failed, 0 skipped of 3"):
        run(args)  # written == 0, truncated == 3
    assert not (tmp_path / "drop.jsonl").exists()
    failures = read_jsonl(tmp_path / "drop.failures.jsonl")
    assert [f["status"] for f in failures] == ["truncated"] * 3 and "--drop-truncated" in failures[0]["reason"]


def test_skipped_rows_side_file_rerun_and_flag_errors(peaked_verifier_path, tmp_path, capsys):
    from speculators_hf.regenerate.cli import main

    chats = tmp_path / "mixed.jsonl"
    good = next(iter(chitchat_conversations(1)))[:2]
    rows = [
        {"id": "a", "messages": good},
        {"id": "b", "messages": [{"role": "assistant", "content": "no question"}]},
        {"id": "c", "messages": [{"role": "narrator", "content": "?"}, *good]},
    ]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    summary = run(make_args(peaked_verifier_path, chats, out))
    assert (summary.regenerated + summary.truncated, summary.skipped) == (1, 2)
    failures = {f["id"]: f for f in read_jsonl(tmp_path / "out.failures.jsonl")}
    assert failures["b"]["reason"] == "no user turn" and failures["c"]["reason"].startswith("unknown roles")
    # The same command again has nothing to do; other flags refuse to mix outputs (one line, exit 2).
    stamp = out.stat().st_mtime_ns
    again = run(make_args(peaked_verifier_path, chats, out))  # finished: its recorded result, nothing run
    assert again.reused and replace(again, reused=False) == summary and out.stat().st_mtime_ns == stamp
    argv = ["--target-model-path", str(peaked_verifier_path), "--train-data-path", str(chats)]
    assert main([*argv, "--output-path", str(out), "--backend", "transformers", "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "exists" in err.splitlines()[-1] and "--overwrite" in err.splitlines()[-1]
    assert main([*argv, "--output-path", str(tmp_path / "x.txt")]) == 2
    assert "write a .jsonl file" in capsys.readouterr().err


def test_resume_after_kill_gives_the_uninterrupted_output(reference, peaked_verifier_path, chats, tmp_path):
    """SIGKILL a real run after a few chats, tear its last record, rerun: same rows as the uninterrupted run."""
    out = tmp_path / "killed.jsonl"
    argv = [
        sys.executable, "-m", "speculators_hf.regenerate", "--target-model-path", str(peaked_verifier_path),
        "--train-data-path", str(chats), "--output-path", str(out), "--backend", "transformers", "--max-new-tokens",
        str(MAX_NEW), "--max-turns", str(MAX_TURNS), "--max-model-len", "512", "--chunk-size", "1",
        "--cache-dir", str(tmp_path / "hf-cache"),
    ]  # fmt: skip
    records = tmp_path / ".killed.jsonl.partial" / "records-000.jsonl"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if records.exists() and len(records.read_text().splitlines()) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()  # no final output from a killed run
    done = [json.loads(line) for line in records.read_text().split("\n")[:-1]]  # the kill may have torn the last
    assert 2 <= len(done) < len(reference.rows)
    with open(records, "a") as f:
        f.write('{"index": 99, "id": "torn')  # as if the kill had landed inside a write

    summary = run(make_args(peaked_verifier_path, chats, out, chunk_size=1))
    assert summary.this_run_conversations == len(reference.rows) - len(done)
    assert read_jsonl(out) == reference.rows
    assert not records.parent.exists()


def test_data_parallel_replicas_give_the_uninterrupted_output(reference, peaked_verifier_path, chats, tmp_path):
    """`--data-parallel-size 2` on CPU: two worker processes (started from `to_argv`) share the chats."""
    out = tmp_path / "dp.jsonl"
    result = run(make_args(peaked_verifier_path, chats, out, data_parallel_size=2))
    assert read_jsonl(out) == reference.rows and result.replicas == 2
    assert result.this_run_conversations == len(reference.rows) and not (tmp_path / ".dp.jsonl.partial").exists()


def test_pipeline_regenerate_stage_feeds_datagen_and_is_skipped_when_unchanged(peaked_verifier_path, chats, tmp_path):
    from speculators_hf.pipeline import Pipeline, PipelineArguments

    def stages():
        args = PipelineArguments(
            verifier=str(peaked_verifier_path),
            train_data_path=str(chats),
            eval_prompts=str(chats),
            output_dir=str(tmp_path / "run"),
            regenerate=True,
            stages={
                "regenerate": {"max_new_tokens": 12, "max_turns": 2},
                "datagen": {"seq_length": 256, "max_samples": 3, "backend": "transformers"},
            },
        )
        pipeline = Pipeline(args)
        pipeline.resolve_inputs()
        pipeline.regenerate()
        pipeline.datagen()
        return pipeline

    assert set(stages().timings) == {"regenerate", "datagen"}
    data = json.loads((tmp_path / "run" / "data" / "data_config.json").read_text())["data"]
    assert data["train_data_path"] == str(tmp_path / "run" / "regenerated.jsonl")
    assert data["regeneration"]["matches_source"] is True and data["regeneration"]["limits"]["max_model_len"] == 256
    assert stages().timings == {}  # same inputs: both skipped


# ------------------------------------------------------------------------------ reasoning, tools, round trip

# The parts of Qwen3's template that matter here: reasoning dropped from history, a think block on the last turn.
QWEN3_LIKE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
TWO_TURNS = [
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "source answer one"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "source answer two"},
]


def rollout(messages, answer, template=None, reasoning="keep", tools=None, char_level=False):
    """Roll out one conversation with scripted answers (`answer(turn) -> text`); returns it, its record and prompts."""
    tokenizer = build_tokenizer()
    eos = tokenizer.eos_token_id
    config = RolloutConfig(
        tokenizer=tokenizer,
        sampling=Sampling(0.0, 1.0, 0, 0, (eos,), "greedy"),
        max_new_tokens=64,
        max_model_len=1024,
        chat_template=template,
        reasoning=reasoning,
    )
    conv, prompts = Conversation("c", 0, messages, config, tools=tools), []
    while (request := conv.next_request()) is not None:
        prompts.append(tokenizer.decode(request.prompt_ids))
        text = answer(len(conv.turns))
        if char_level:  # a valid but non-canonical tokenisation: the template cannot reproduce it
            ids = [i for ch in text for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        conv.accept(Generation(ids + [eos], "stop"))
    return conv, conv.finalize(), prompts, tokenizer


def trained_ids(tokenizer, row, template):
    result = tokenize_conversation(tokenizer, row["messages"], 4096, template)
    return [t for t, m in zip(result["input_ids"], result["loss_mask"]) if m]


def test_reasoning_stays_in_the_trained_turn_and_out_of_the_history():
    def answer(k):
        return f"<think>\nplan {k}\n</think>\n\nanswer {k}"

    conv, record, prompts, tokenizer = rollout(TWO_TURNS, answer, QWEN3_LIKE)
    assert "answer 0" in prompts[1] and "plan 0" not in prompts[1]  # history as at inference
    # Qwen3 renders the first turn without its reasoning once a later turn follows: that turn cannot be trained
    # as produced, so the conversation ends after the first turn, which round-trips with its reasoning.
    assert record["stats"]["turns"] == 1 and record["stats"]["turns_not_round_trip"] == 1
    row = record["row"]
    assert row["messages"][-1]["content"] == answer(0)
    assert trained_ids(tokenizer, row, QWEN3_LIKE) == conv.turns[0].token_ids

    # --reasoning strip: the answer alone is kept (the reasoning is not trained).
    conv, record, _, _ = rollout(TWO_TURNS[:2], answer, QWEN3_LIKE, reasoning="strip")
    assert record["row"]["messages"][-1]["content"] == "answer 0"
    assert trained_ids(tokenizer, record["row"], QWEN3_LIKE) == conv.turns[0].trained_ids
    assert conv.turns[0].trained_ids == tokenizer("answer 0<|im_end|>", add_special_tokens=False)["input_ids"]


def test_disabled_thinking_round_trips_the_empty_think_block():
    conv, record, prompts, tokenizer = rollout(TWO_TURNS[:2], lambda k: f"answer {k}", QWEN3_LIKE, "disable")
    assert prompts[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # datagen renders the empty think block itself and does not supervise it: the mask is what the verifier produced
    assert record["stats"]["turns_not_round_trip"] == 0
    assert trained_ids(tokenizer, record["row"], QWEN3_LIKE) == conv.turns[0].token_ids


def test_non_canonical_tokens_are_cut_and_counted():
    _, record, _, _ = rollout(TWO_TURNS[:2], lambda k: "absolutely wonderful", char_level=True)
    assert record["status"] == "failed" and "round-trips" in record["reason"]


TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CHAT = [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
    {"role": "tool", "content": "18C and sunny", "tool_call_id": "1"},
    {"role": "assistant", "content": "It is 18C."},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def answer_with(city):
    def answer(k):
        if k == 0:
            return f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'
        return "Sunny, 18 degrees."

    return answer


def test_tool_calls_splice_the_cached_result_or_stop():
    messages, tools = TOOL_CHAT, TOOLS
    conv, record, prompts, _ = rollout(messages, answer_with("Paris"), tools=tools)
    roles = [m["role"] for m in record["row"]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"] and "18C and sunny" in prompts[1]
    assert record["row"]["messages"][2]["content"] == "18C and sunny" and record["row"]["tools"] == tools
    assert record["row"]["messages"][3]["content"] == "Sunny, 18 degrees."

    _, record, prompts, _ = rollout(messages, answer_with("Rome"), tools=tools)
    assert len(prompts) == 1 and [m["role"] for m in record["row"]["messages"]] == ["user", "assistant"]
    assert record["stats"]["tool_call_stop"] is True


def test_a_regenerated_tool_calling_chat_trains_in_datagen():
    """The regenerated row keeps the spliced tool result as context: datagen reads it (role `tool`, the row's
    `tools` to the template) and trains exactly the two answers the verifier produced."""
    conv, record, _, tokenizer = rollout(TOOL_CHAT, answer_with("Paris"), tools=TOOLS)
    row = json.loads(json.dumps(record["row"]))  # as datagen reads it from the file
    result = tokenize_conversation(tokenizer, normalize_messages(row), 4096, None, chat_tools(row))
    assert result["skip_reason"] == ""
    trained = [t for t, m in zip(result["input_ids"], result["loss_mask"]) if m]
    assert trained == conv.turns[0].token_ids + conv.turns[1].token_ids
    assert "18C and sunny" in tokenizer.decode(result["input_ids"])


# -------------------------------------------------------------------------------------------------- servers


def test_unreachable_server_one_line_and_no_output(peaked_verifier_path, chats, tmp_path, capsys):
    from speculators_hf.online.server import free_port
    from speculators_hf.regenerate.cli import main

    out = tmp_path / "out.jsonl"
    code = main(
        [
            "--target-model-path", str(peaked_verifier_path), "--train-data-path", str(chats),
            "--output-path", str(out), "--server-url", f"http://127.0.0.1:{free_port()}",
            "--max-retries", "2", "--retry-backoff", "0.01",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    line = err.splitlines()[-1]  # (the lines above it are datasets' progress bars)
    assert code == 2 and "Traceback" not in err and line.startswith("python -m speculators_hf.regenerate: error:")
    assert "after 3 attempts" in line and "cannot connect" in line
    assert not list(tmp_path.iterdir())  # no output, no failures file, no partial folder


@pytest.mark.vllm
def test_vllm_in_process_gives_the_transformers_conversations(reference, peaked_verifier_path, chats, tmp_path):
    from speculators_hf.regenerate.vllm_engine import VLLMEngine

    args = make_args(peaked_verifier_path, chats, tmp_path / "vllm.jsonl", backend="vllm")
    plan = prepare(args)
    engine = VLLMEngine(str(peaked_verifier_path), plan.sampling, dtype=plan.dtype, max_model_len=512)
    try:
        summary = run(args, engine=engine)
    finally:
        engine.close()
    assert read_jsonl(tmp_path / "vllm.jsonl") == reference.rows
    config = json.loads((tmp_path / "vllm.regenerate_config.json").read_text())
    assert list(config["engine"]["used"]) == [f"vllm {engine.version}"]
    print(
        f"\nregeneration tokens/s: vLLM {summary.tokens_per_second}, transformers "
        f"{reference.summary.tokens_per_second} (tiny verifier, CPU)"
    )


@pytest.mark.vllm
def test_server_mode_round_robin_gives_the_same_conversations(reference, peaked_verifier_path, chats, tmp_path):
    from .vllm_server import vllm_server

    with vllm_server(peaked_verifier_path, "--max-model-len", "512") as url:
        args = make_args(
            peaked_verifier_path, chats, tmp_path / "srv.jsonl", server_url=[url, url + "/v1"], concurrency=3
        )
        summary = run(args)
        # Sampling with a seed is reproducible: every request carries a seed derived from the chat id and turn.
        sampled = [
            run(make_args(peaked_verifier_path, chats, tmp_path / f"s{k}.jsonl", server_url=[url],
                                 temperature=1.0, seed=3, max_samples=3))
            for k in range(2)
        ]  # fmt: skip
    assert read_jsonl(tmp_path / "srv.jsonl") == reference.rows
    assert summary.engine.startswith("vllm-server")
    assert read_jsonl(tmp_path / "s0.jsonl") == read_jsonl(tmp_path / "s1.jsonl")
    assert sampled[0].conversations == 3 and sampled[0].written >= 1, sampled[0]
    config = json.loads((tmp_path / "s0.regenerate_config.json").read_text())
    assert config["sampling"]["temperature"] == 1.0 and config["sampling"]["greedy"] is False


def test_errors_are_user_errors(peaked_verifier_path, tmp_path):
    with pytest.raises(ValueError, match="--turns"):
        make_args(peaked_verifier_path, tmp_path / "x.jsonl", tmp_path / "o.jsonl", turns="first")
    with pytest.raises(UserError, match="does not exist"):
        run(make_args(peaked_verifier_path, tmp_path / "missing.jsonl", tmp_path / "o.jsonl"))


# ------------------------------------------------------------------------- flags, run state, consent (issue 22)

BAD_VALUES = [
    ("--max-new-tokens", "0"), ("--concurrency", "0"), ("--batch-size", "0"), ("--chunk-size", "0"),
    ("--tensor-parallel-size", "0"), ("--data-parallel-size", "0"), ("--max-samples", "0"), ("--max-turns", "0"),
    ("--max-model-len", "0"), ("--temperature", "-0.5"), ("--temperature", "nan"), ("--temperature", "inf"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--top-k", "-1"), ("--request-timeout", "0"),
    ("--request-timeout", "nan"), ("--request-timeout", "inf"), ("--max-retries", "-1"), ("--retry-backoff", "-1"),
    ("--retry-backoff", "nan"), ("--seed", "-1"), ("--gpu-memory-utilization", "0"),
    ("--gpu-memory-utilization", "nan"),
]  # fmt: skip


@pytest.mark.parametrize("flag, value", BAD_VALUES)
def test_every_numeric_flag_is_range_checked_when_parsed(flag, value, tmp_path, capsys):
    """Refused before anything is read (the verifier here does not even exist): one line naming the flag."""
    from speculators_hf.regenerate.cli import main

    argv = ["--target-model-path", str(tmp_path / "no-verifier"), "--train-data-path", str(tmp_path / "no.jsonl"),
            "--output-path", str(tmp_path / "out" / "o.jsonl"), flag, value]  # fmt: skip
    code, err = main(argv), capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{flag} must be" in err, err
    assert not (tmp_path / "out").exists()


def test_replicas_argv_round_trips_every_field_type(tmp_path):
    """`to_argv` (the replicas' and the accelerate launcher's command line) parses back into the same arguments."""
    from speculators_hf.commandline import make_parser, parse
    from speculators_hf.replicas import to_argv

    args = make_args(
        tmp_path / "verifier with space", "-chats.jsonl", tmp_path / "out.jsonl", server_url=["http://a:1", "http://b"],
        shuffle=True, drop_truncated=False, trust_remote_code=True, temperature=0.7, top_p=1e-05, top_k=0,
        revision=None, max_samples=None, chat_template="{{ '--x' }}",
    )  # fmt: skip
    (parsed,) = parse(make_parser(RegenerateArguments), to_argv(RegenerateArguments, asdict(args)))
    assert parsed == args
    defaults = make_args(tmp_path, tmp_path / "c.jsonl", tmp_path / "o.jsonl")
    (parsed,) = parse(make_parser(RegenerateArguments), to_argv(RegenerateArguments, asdict(defaults)))
    assert parsed == defaults and parsed.server_url is None and parsed.shuffle is False


class Scripted:
    """An engine whose answers are scripted by the user turn they answer (a real tokenizer renders them), to reach
    what a tiny model never produces; `canonical=False` answers with a valid but non-canonical tokenisation."""

    name, version, max_model_len = "scripted", "1", 0

    def __init__(self, tokenizer, answers: dict[str, tuple[str, str, bool]]):
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, requests):
        out = []
        for request in requests:
            prompt = self.tokenizer.decode(request.prompt_ids)
            text, finish, canonical = next(v for k, v in self.answers.items() if k in prompt)
            pieces = [text] if canonical else list(text)
            ids = [i for piece in pieces for i in self.tokenizer(piece, add_special_tokens=False)["input_ids"]]
            out.append(Generation(ids + ([self.tokenizer.eos_token_id] if finish == "stop" else []), finish))
        return out

    def close(self):
        pass


def test_the_summary_counts_every_dropped_turn(peaked_verifier_path, tmp_path):
    """A chat whose only turn was cut at the token limit and does not round-trip leaves the output: the summary (and
    its line) still counts that turn as dropped and cut."""
    chats = tmp_path / "chats.jsonl"
    rows = [{"id": "kept", "messages": [{"role": "user", "content": "say hello"}]},
            {"id": "cut", "messages": [{"role": "user", "content": "spell wonderful"}]}]  # fmt: skip
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(peaked_verifier_path)
    engine = Scripted(tokenizer, {"say hello": ("hello there", "stop", True),
                                  "spell wonderful": ("absolutely wonderful", "length", False)})  # fmt: skip
    result = run(make_args(peaked_verifier_path, chats, tmp_path / "out.jsonl"), engine=engine)
    assert (result.written, result.truncated, result.turns) == (1, 1, 1)
    assert result.dropped_turns == result.turns_not_round_trip == 1
    assert "1 turns written, 1 dropped (1 cut: not round-tripping" in result.line()
    config = json.loads((tmp_path / "out.regenerate_config.json").read_text())
    assert config["counts"]["turns_not_round_trip"] == 1 and config["counts"]["dropped_turns"] == 1


def test_after_a_cut_turn_the_rollout_goes_on_and_no_end_of_turn_is_trained():
    """`--after-truncation next-turn`: a turn cut at --max-new-tokens is kept, marked, and the next user turn is
    answered; datagen trains the cut turn's tokens but not the `<|im_end|>` the template appends (never produced)."""
    tokenizer = build_tokenizer()
    eos = tokenizer.eos_token_id
    script = [("once upon a time there", "length"), ("the end", "stop")]
    rows = {}
    for after in ("next-turn", "end"):
        config = RolloutConfig(tokenizer, Sampling(0.0, 1.0, 0, 0, (eos,), "greedy"), 64, 1024, after_truncation=after)
        conv = Conversation("c", 0, TWO_TURNS, config)
        while conv.next_request() is not None:
            text, finish = script[len(conv.turns)]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            conv.accept(Generation(ids + [eos] * (finish == "stop"), finish))
        record = conv.finalize()
        rows[after] = record["row"]["messages"]
        assert record["stats"]["truncated_turns"] == 1 and record["stats"]["turns_not_round_trip"] == 0
    # the old recipe ends the chat at the cut turn; both mark it, and only it
    assert [m["role"] for m in rows["end"]] == ["user", "assistant"] and rows["end"][1]["finish_reason"] == "length"
    cut, user, answer = rows["next-turn"][1:]
    assert cut == {"role": "assistant", "content": script[0][0], "finish_reason": "length"}
    assert user == TWO_TURNS[2] and answer == {"role": "assistant", "content": "the end"}
    result = tokenize_conversation(tokenizer, normalize_messages({"messages": rows["next-turn"]}), 4096)
    ids, mask = result["input_ids"], result["loss_mask"]
    edges = [t for t in range(1, len(mask)) if mask[t] != mask[t - 1]]  # start, end, start, end of the two spans
    first = tokenizer(script[0][0], add_special_tokens=False)["input_ids"]
    assert len(edges) == 4 and ids[edges[0] : edges[1]] == first
    assert ids[edges[1]] == eos  # the template's <|im_end|> after the cut turn: in the context, not trained
    assert ids[edges[2] : edges[3]] == tokenizer("the end", add_special_tokens=False)["input_ids"] + [eos]

    # A turn cut because the context is full ends the chat even with next-turn: nothing could follow it.
    chat = [*TWO_TURNS, {"role": "user", "content": "more"}, {"role": "assistant", "content": "source"}]
    config = RolloutConfig(tokenizer, Sampling(0.0, 1.0, 0, 0, (eos,), "greedy"), 64, 80, after_truncation="next-turn")
    conv = Conversation("c", 0, chat, config)
    while (request := conv.next_request()) is not None:
        conv.accept(Generation(tokenizer("once upon a time", add_special_tokens=False)["input_ids"], "length"))
    assert request is None and len(conv.turns) == 2 and conv.reason == "truncated at the token limit"
    assert (conv.truncated_turns, conv.context_cut_turns) == (2, 1)  # the second had under 64 tokens of room


def test_the_summary_line_counts_every_cut_turn_and_chat(peaked_verifier_path, tmp_path):
    """With `next-turn` a chat may hold several cut turns, and a chat whose only turn was cut and does not round-trip
    leaves the output: the line counts both the cut turns (of all answered) and the chats they were in."""
    chats = tmp_path / "chats.jsonl"
    rows = [{"id": "kept", "messages": [{"role": "user", "content": "say hello"}]},
            {"id": "gone", "messages": [{"role": "user", "content": "spell wonderful"}]},
            {"id": "two", "messages": [{"role": "user", "content": "tell a story"},
                                       {"role": "assistant", "content": "source answer"},
                                       {"role": "user", "content": "go on"}]}]  # fmt: skip
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(peaked_verifier_path)
    engine = Scripted(tokenizer, {"go on": ("and then", "length", True), "say hello": ("hello there", "stop", True),
                                  "spell wonderful": ("absolutely wonderful", "length", False),
                                  "tell a story": ("once upon", "length", True)})  # fmt: skip
    args = make_args(peaked_verifier_path, chats, tmp_path / "out.jsonl")  # --after-truncation next-turn: the default
    result = run(args, engine=engine)
    assert (result.written, result.regenerated, result.truncated, result.turns) == (2, 1, 2, 3)
    assert (result.truncated_turns, result.answered_turns, result.dropped_turns) == (3, 4, 1)
    line = result.line()
    assert "2 truncated" in line and "1 dropped (1 cut: not round-tripping" in line, line
    assert "3 of 4 answered turns (75.0%) cut at --max-new-tokens 24 (0 for want of context)" in line, line
    written = read_jsonl(tmp_path / "out.jsonl")
    assert [m.get("finish_reason") for m in written[1]["messages"]] == [None, "length", None, "length"]


def cli_argv(verifier, chats, out, *extra) -> list[str]:
    return ["--target-model-path", str(verifier), "--train-data-path", str(chats), "--output-path", str(out),
            "--backend", "transformers", "--max-new-tokens", "4", "--max-turns", "1", "--max-samples", "2",
            "--max-model-len", "512", *extra]  # fmt: skip


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_bytes().hex() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["out.failures.jsonl", "out.regenerate_config.json", ".out.jsonl.partial"])
def test_a_users_file_beside_the_output_is_never_replaced(name, peaked_verifier_path, chats, tmp_path, capsys):
    """Refused before any engine starts (the server named here does not exist), with or without --overwrite."""
    from speculators_hf.online.server import free_port
    from speculators_hf.regenerate.cli import main

    (tmp_path / name).write_text("the user's")
    dead = ["--server-url", f"http://127.0.0.1:{free_port()}", "--max-retries", "0"]
    for extra in ([], ["--overwrite"]):
        code, err = (
            main(cli_argv(peaked_verifier_path, chats, tmp_path / "out.jsonl", *dead, *extra)),
            capsys.readouterr().err,
        )
        line = err.strip().splitlines()[-1]
        assert code == 2 and f"{name} exists and was not written by speculators_hf" in line, err
        assert "cannot connect" not in err and (tmp_path / name).read_text() == "the user's"
        assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_overwrite_deletes_only_what_regenerate_wrote(peaked_verifier_path, chats, tmp_path, capsys):
    from speculators_hf.online.server import free_port
    from speculators_hf.regenerate.cli import main

    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "mine", "messages": []}\n')  # a user's chats where the output would go
    assert main(cli_argv(peaked_verifier_path, chats, out, "--overwrite")) == 2
    assert "out.jsonl exists and was not written" in capsys.readouterr().err and "mine" in out.read_text()
    out.unlink()

    assert main(cli_argv(peaked_verifier_path, chats, out)) == 0
    ours = sorted(p.name for p in tmp_path.iterdir())
    assert ours == [".speculators_hf", "out.failures.jsonl", "out.jsonl", "out.regenerate_config.json"]
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "out.jsonl.bak").write_text("keep")
    (tmp_path / ".notes").mkdir()
    (tmp_path / ".notes" / "f").write_text("keep")
    users = {k: v for k, v in digest(tmp_path).items() if not k.startswith(("out.", ".speculators_hf"))}
    first = out.read_text()
    # The same command is finished: nothing loads (the server named here does not exist) and nothing changes.
    dead = ["--server-url", f"http://127.0.0.1:{free_port()}"]
    stamp = out.stat().st_mtime_ns
    assert main(cli_argv(peaked_verifier_path, chats, out, *dead)) == 0 and out.stat().st_mtime_ns == stamp
    # Other flags: refused; with --overwrite, regenerate's own files are replaced and nothing else is touched.
    assert main(cli_argv(peaked_verifier_path, chats, out, "--max-new-tokens", "2")) == 2
    assert "arguments.max_new_tokens changed" in capsys.readouterr().err
    assert main(cli_argv(peaked_verifier_path, chats, out, "--max-new-tokens", "2", "--overwrite")) == 0
    assert out.read_text() != first and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*ours, "notes.txt", "out.jsonl.bak", ".notes"]
    )
    assert {k: v for k, v in digest(tmp_path).items() if k in users} == users
    # The pipeline, in its own folders, replaces a run with other inputs without --overwrite.
    replaced = run(make_args(peaked_verifier_path, chats, out, max_new_tokens=3, max_samples=2), replace_stale=True)
    assert replaced.written == 2 and {k: v for k, v in digest(tmp_path).items() if k in users} == users


MARKER_CODE = """
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("the verifier's own code ran")


class MarkerConfig(LlamaConfig):
    model_type = "marker-llama"


class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig
"""


def test_a_verifiers_own_code_runs_only_with_trust_remote_code(peaked_verifier_path, chats, tmp_path):
    """A verifier folder whose `auto_map` names its own code: without --trust-remote-code one line, the code never
    runs and stdin is never read (a `y` waits there); with it, config, tokenizer and model load through that code."""
    import shutil

    verifier, marker = tmp_path / "verifier", tmp_path / "code-ran"
    shutil.copytree(peaked_verifier_path, verifier)
    config = json.loads((verifier / "config.json").read_text())
    auto_map = {"AutoConfig": "marker.MarkerConfig", "AutoModelForCausalLM": "marker.MarkerForCausalLM"}
    config.update(model_type="marker-llama", architectures=["MarkerForCausalLM"], auto_map=auto_map)
    (verifier / "config.json").write_text(json.dumps(config))
    (verifier / "marker.py").write_text(MARKER_CODE.format(marker=str(marker)))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "TRANSFORMERS_VERBOSITY": "error",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}  # fmt: skip
    argv = [sys.executable, "-m", "speculators_hf.regenerate",
            *cli_argv(verifier, chats, tmp_path / "out.jsonl", "--cache-dir", str(tmp_path / "cache"))]  # fmt: skip
    refused = subprocess.run(argv, input="y\ny\n", capture_output=True, text=True, env=env, timeout=300)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "pass --trust-remote-code" in lines[0], refused.stderr
    assert not marker.exists() and not (tmp_path / "out.jsonl").exists()

    trusted = subprocess.run([*argv, "--trust-remote-code"], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, env=env, timeout=300)  # fmt: skip
    assert trusted.returncode == 0, trusted.stderr
    assert marker.exists() and len(read_jsonl(tmp_path / "out.jsonl")) == 2


def test_a_run_that_regenerates_nothing_fails_with_its_failures_written(peaked_verifier_path, tmp_path, capsys):
    from speculators_hf.regenerate.cli import main

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"id": "a", "messages": [{"role": "assistant", "content": "no question"}]}) + "\n")
    out = tmp_path / "out" / "out.jsonl"
    for _ in range(2):  # the rerun resumes (nothing left to generate) and fails the same way
        code, err = main(cli_argv(peaked_verifier_path, chats, out)), capsys.readouterr().err
        line = err.strip().splitlines()[-1]
        assert code == 1 and "produced no conversations (0 truncated, 0 failed, 1 skipped of 1" in line, err
        assert "Traceback" not in err and not out.exists()
        assert read_jsonl(tmp_path / "out" / "out.failures.jsonl") == [
            {"index": 0, "id": "a", "status": "skipped", "reason": "no user turn"}
        ]


def test_finishing_a_run_streams_its_records_from_the_partial_store(tmp_path):
    """Resume and the final write keep where each record lies, not the records: a million regenerated chats do not
    fit in memory. 40 records of 250 kB, finished out of source order: the traced peak stays at a few records (and
    the 1 MiB blocks the output's checksum reads)."""
    import tracemalloc

    from speculators_hf.regenerate.result import summarize
    from speculators_hf.regenerate.writer import OutputLayout, PartialStore, read_records, write_final
    from speculators_hf.runstate import claim

    layout = OutputLayout(tmp_path / "out.jsonl")
    store = PartialStore(layout).open()
    text = "x" * 250_000
    for i in reversed(range(40)):
        ok = bool(i % 4)
        row = {"id": f"c{i}", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]}
        status = {"status": "ok", "row": row} if ok else {"status": "failed", "reason": "boom"}
        store.write(
            {"id": f"c{i}", "index": i, "reason": "", "stats": {"truncated": 0, "turns": 1, "answered": 1}, **status}
        )
    store.close()
    state = claim(tmp_path, layout.key, {"test": 1}, owned=False, label="--output-path")
    tracemalloc.start()
    records = read_records(layout)
    summary = summarize(records)
    output = write_final(state, layout, records, {"counts": summary})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "c3" in records and "c40" not in records and len(records) == 40
    assert summary["written"] == output["rows"] == 30 and summary["failed"] == 10 and summary["turns"] == 30
    rows = [json.loads(line) for line in layout.output.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"c{i}" for i in range(40) if i % 4]  # source order
    failures = [json.loads(line)["id"] for line in layout.failures.read_text().splitlines()]
    assert failures == [f"c{i}" for i in range(0, 40, 4)]
    assert peak < 3_000_000, f"{peak} bytes traced: the 10 MB of records were held"
