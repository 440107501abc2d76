"""The command line as documented: every command form the README shows, help order, the bare console script,
`--bf16` as a flag, the accelerate configs of an installed wheel (by name), and no stray files from the working dir."""

from __future__ import annotations

import re
import runpy
import shlex
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

from speculators_hf.cli import COMMANDS
from speculators_hf.cli import main as cli_main
from speculators_hf.commandline import make_parser, parse
from speculators_hf.utils import UserError

ROOT = Path(__file__).resolve().parents[1]
SHELL_SEPARATORS = {"&&", "||", "|", ";"}
FLAG = re.compile(r"--[A-Za-z][\w-]*")


def readme_commands(text: str) -> dict[tuple[str, str | None], set[str]]:
    """Every command form in the README's bash blocks and inline code -> the flags shown with it.

    Keys: `("cli", command)` for `speculators-hf X` / `python -m speculators_hf X` (a `<placeholder>` stands for
    every command; None: no command), `("module", name)` for `python -m speculators_hf.name` and accelerate's
    `-m speculators_hf.name` (`speculators_hf.<stage>`: one per command), `("script", path)` for `examples/*.py`.
    """
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    snippets = [line for block in blocks for line in block.replace("\\\n", " ").split("\n")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    snippets += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    found: dict[tuple[str, str | None], set[str]] = {}
    while snippets:
        snippet = snippets.pop()
        snippets += re.findall(r"\$\(([^)]*)\)", snippet)  # "$(speculators-hf accelerate-config --name ddp)"
        tokens = [t.strip("[]") for t in shlex.split(re.sub(r"\$\([^)]*\)", "SUBSHELL", snippet), comments=True)]
        for i, token in enumerate(tokens):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if token == "speculators-hf" or (token == "-m" and nxt == "speculators_hf"):
                start = i + 1 if token == "speculators-hf" else i + 2
                command = tokens[start] if start < len(tokens) and not tokens[start].startswith("-") else None
                keys = [("cli", c) for c in COMMANDS] if command and command.startswith("<") else [("cli", command)]
                start += command is not None
            elif token == "-m" and nxt and nxt.startswith("speculators_hf."):
                module = nxt.split("<")[0]  # "speculators_hf.<stage>" promises a module per command
                keys = [("module", module + c) for c in COMMANDS] if "<" in nxt else [("module", nxt)]
                start = i + 2
            elif token.startswith("examples/") and token.endswith(".py"):
                keys, start = [("script", token)], i + 1
            else:
                continue
            rest = tokens[start:]
            rest = rest[: next((j for j, t in enumerate(rest) if t in SHELL_SEPARATORS), len(rest))]
            for key in keys:
                found.setdefault(key, set()).update(t for t in rest if FLAG.fullmatch(t))
    return found


def run_help(kind: str, target: str | None, capsys) -> tuple[int, str]:
    """`--help` of one command form, in this process (runpy runs a module's `__main__` as `python -m` does)."""
    argv = [] if target is None else [target, "--help"]
    saved = sys.argv
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules ... prior to execution"
            if kind == "cli":
                code = cli_main(argv)
            elif kind == "module":
                sys.argv = [target, "--help"]
                runpy.run_module(target, run_name="__main__", alter_sys=True)
                code = None
            else:
                sys.argv = [target, "--help"]
                runpy.run_path(str(ROOT / target), run_name="__main__")
                code = None
    except SystemExit as done:
        code = done.code
    finally:
        sys.argv = saved
    return code or 0, capsys.readouterr().out


def test_every_command_the_readme_shows_runs_help(capsys):
    found = readme_commands((ROOT / "README.md").read_text())
    # the forms the README must show (a README edit that drops them fails here too)
    assert {("cli", None), ("cli", "pipeline"), ("cli", "export"), ("cli", "push"), ("cli", "evaluate")} <= set(found)
    assert {("module", "speculators_hf.datagen"), ("module", "speculators_hf.training")} <= set(found)
    for (kind, target), flags in sorted(found.items(), key=str):
        code, out = run_help(kind, target, capsys)
        assert code == 0 and "usage:" in out, (kind, target, code, out[-500:])
        if kind != "cli" or target is not None:
            unknown = flags - set(FLAG.findall(out))
            assert not unknown, f"README shows {sorted(unknown)} for {kind} {target}, which its --help does not list"


def test_bare_console_script_prints_usage_like_pip(capsys):
    """`speculators-hf` alone: the commands on stdout, exit 0 (as `pip`); an unknown command: stderr, exit 2."""
    assert cli_main([]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: speculators-hf <command>") and "pipeline" in captured.out
    assert captured.err == ""
    assert cli_main(["trian"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "unknown command 'trian'" in captured.err
    # the real `python -m speculators_hf` entry point (imports no stage: fast)
    done = subprocess.run([sys.executable, "-m", "speculators_hf"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: speculators-hf") and not done.stderr.strip()


def test_train_help_lists_our_flags_before_training_arguments(capsys):
    code, out = run_help("cli", "train", capsys)
    assert code == 0
    inherited = out.index("TrainingArguments flags (from transformers):")
    for ours in ("--ttt-steps", "--total-seq-len", "--verifier-name-or-path", "--save-path", "--bf16", "--log-dir"):
        assert out.index(ours) < inherited, ours
    for theirs in ("--max-steps", "--lr-scheduler-type", "--gradient-checkpointing"):
        assert out.index(theirs) > inherited, theirs
    assert len(out[:inherited].splitlines()) < 240  # ours (about 45 flags) come first, not after 600 lines
    assert "(default: None)" not in out


@pytest.mark.parametrize(("argv", "expected"), [(["--bf16"], True), (["--bf16", "false"], False), ([], False)])
def test_bf16_is_a_plain_flag_and_takes_a_value(argv, expected, tmp_path):
    from speculators_hf.training import Eagle3ModelArguments, Eagle3TrainingArguments

    parser = make_parser((Eagle3ModelArguments, Eagle3TrainingArguments))
    _, args = parse(parser, ["--verifier-name-or-path", "v", "--save-path", str(tmp_path), *argv])
    assert args.bf16 is expected  # off on CPU when not given (no CUDA in CI)


def test_no_vocabulary_from_the_working_directory(tmp_path, monkeypatch):
    """A d2t.npy/t2d.npy left in the working directory by another run is never picked up."""
    from speculators_hf.training import Eagle3ModelArguments
    from speculators_hf.training.setup import resolve_vocab_mapping
    from tests.training_data import save_bad_vocab

    save_bad_vocab(tmp_path)  # ./d2t.npy, ./t2d.npy
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_vocab_mapping(Eagle3ModelArguments(verifier_name_or_path="v", data_path="data")) is None


def test_accelerate_configs_by_name(tmp_path, monkeypatch):
    from speculators_hf.cli.accelerate_config import accelerate_config_names, resolve_accelerate_config

    monkeypatch.chdir(tmp_path)  # not the clone: names still resolve
    assert {"ddp", "fsdp2", "single_gpu", "multi_node", "cpu_ddp", "cpu"} <= set(accelerate_config_names())
    ddp = resolve_accelerate_config("ddp")
    assert ddp.name == "ddp.yaml" and ddp.is_file()
    assert resolve_accelerate_config("accelerate_configs/ddp.yaml") == ddp  # the README's clone-relative form
    own = tmp_path / "mine.yaml"
    own.write_text("num_processes: 1\n")
    assert resolve_accelerate_config(str(own)) == own.resolve()
    with pytest.raises(UserError, match="choose from .*cpu_ddp"):
        resolve_accelerate_config("dpp")

    from speculators_hf.pipeline import Pipeline, PipelineArguments

    args = PipelineArguments(
        verifier="v", train_data_path="d.jsonl", eval_prompts="e.jsonl", accelerate_config="cpu_ddp"
    )
    Pipeline(args).resolve_inputs()
    assert Path(args.accelerate_config) == resolve_accelerate_config("cpu_ddp")


def test_wheel_ships_every_module_and_the_accelerate_configs(tmp_path):
    """`pip wheel` (nothing is installed) of a copy of the source: every module and every accelerate config is
    inside, and the installed layout resolves config names to the files in the package."""
    pytest.importorskip("setuptools", minversion="68")
    import shutil

    src = tmp_path / "src"
    for name in ("speculators_hf", "accelerate_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("speculators_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "speculators_hf").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel (list the package in pyproject.toml)"
    configs = {f"speculators_hf/accelerate_configs/{p.name}" for p in (ROOT / "accelerate_configs").glob("*.yaml")}
    assert len(configs) >= 6 and configs <= names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = "from speculators_hf.cli.accelerate_config import resolve_accelerate_config as r; print(r('fsdp2'))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "", "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == site / "speculators_hf" / "accelerate_configs" / "fsdp2.yaml"
