"""Consent for code, read from the source: every load of a config, tokenizer or model, and every vLLM engine or
`vllm serve` the package starts, says `trust_remote_code` explicitly (False unless the user gave
`--trust-remote-code`), so a folder's `auto_map` code never runs unasked and transformers never asks on stdin."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "speculators_hf"
ENGINES = {"LLM", "AsyncEngineArgs", "EngineArgs"}  # vLLM: trust_remote_code in the engine's arguments


def _calls_without_consent() -> list[str]:
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            # transformers' Auto classes dispatch on a config's auto_map (our own classes never run a folder's code)
            if not (name in ENGINES or (name == "from_pretrained" and owner.startswith("Auto"))):
                continue
            keywords = {k.arg for k in node.keywords}
            if "trust_remote_code" not in keywords and None not in keywords:  # None: **kwargs passed through
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}(...)")
    return missing


def test_every_loader_says_trust_remote_code():
    assert _calls_without_consent() == []


def test_the_check_sees_a_call_without_it(tmp_path, monkeypatch):
    (tmp_path / "speculators_hf").mkdir()
    (tmp_path / "speculators_hf" / "m.py").write_text(
        "AutoConfig.from_pretrained(path)\nEagle3Config.from_pretrained(path)\nLLM(model=path, trust_remote_code=x)\n"
    )
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "speculators_hf")
    assert _calls_without_consent() == ["speculators_hf/m.py:1 from_pretrained(...)"]
