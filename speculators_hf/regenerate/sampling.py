"""Sampling settings shared by every engine: the verifier's `generation_config` unless a flag overrides it.

Only `do_sample`, `temperature`, `top_p` and `top_k` are read, and only where the file sets them (transformers'
implicit `top_k=50` is not applied: vLLM does not apply it either). `do_sample` false or absent means greedy unless
`--temperature` asks for sampling. Every engine gets the same explicit values and the same stop token ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import GenerationConfig

from ..utils import get_logger
from ..validation import read_json_if_exists

logger = get_logger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    seed: int
    stop_token_ids: tuple[int, ...]
    origin: str  # where the values came from, for the provenance record

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def request_seed(self, conversation_id: str, turn: int) -> int | None:
        """A per-request seed, so that a sampled conversation does not depend on batching or resume."""
        if self.greedy:
            return None
        digest = hashlib.sha256(f"{self.seed}/{conversation_id}/{turn}".encode()).digest()
        return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF

    def record(self) -> dict:
        return {**asdict(self), "stop_token_ids": list(self.stop_token_ids), "greedy": self.greedy}


def generation_config_values(model_path: str, revision: str | None = None) -> dict:
    """The values the verifier's `generation_config.json` sets explicitly ({} when it has none)."""
    local = Path(model_path) / "generation_config.json"
    if Path(model_path).is_dir() and read_json_if_exists(local, fix="fix or delete it") is None:
        return {}  # checked first: an unreadable file would otherwise be taken for a missing one (greedy, silently)
    try:
        return GenerationConfig.from_pretrained(model_path, revision=revision).to_diff_dict()
    except (OSError, ValueError):
        return {}


def resolve_sampling(args, tokenizer, model_config) -> Sampling:
    """Flags > the verifier's generation_config > greedy."""
    values = generation_config_values(args.target_model_path, args.revision)
    sampled = bool(values.get("do_sample", False))
    temperature = float(values.get("temperature", 1.0)) if sampled else 0.0
    top_p = float(values.get("top_p", 1.0) or 1.0) if sampled else 1.0
    top_k = int(values.get("top_k", 0) or 0) if sampled else 0
    origin = "generation_config" if sampled else "greedy (generation_config has do_sample false or unset)"
    overrides = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k") if getattr(args, k) is not None}
    if overrides:
        origin += f"; flags {sorted(overrides)}"
        temperature = float(overrides.get("temperature", temperature))
        top_p = float(overrides.get("top_p", top_p))
        top_k = int(overrides.get("top_k", top_k))
    stop = stop_token_ids(values, tokenizer, model_config)
    if not stop:
        logger.warning("The verifier declares no eos token: every turn runs to --max-new-tokens.")
    return Sampling(temperature, top_p, top_k, args.seed, stop, origin)


def stop_token_ids(generation_values: dict, tokenizer, model_config) -> tuple[int, ...]:
    """eos ids of the generation config, the model config and the tokenizer, in that order, without repeats."""
    ids: list[int] = []
    for value in (
        generation_values.get("eos_token_id"),
        getattr(model_config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)
