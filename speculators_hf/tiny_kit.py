"""A tiny offline verifier kit: a Llama-style verifier and a real tokenizer, built locally in seconds.

Used by the tests, the examples, the benchmarks and the embedded default of the pipeline. Nothing here touches the
network: the tokenizer is trained with `tokenizers` on real chat text that ships inside the `chitchat-dataset` wheel
(MIT), and the verifier is either random (`"random"`) or trained for a few hundred steps on that text (`"peaked"`) so
that its next-token distributions are peaked and a draft has something real to learn.

Everything is cached under `$SPECULATORS_HF_CACHE` (default `~/.cache/speculators_hf`), keyed by the build recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock

from .utils import get_logger

logger = get_logger(__name__)

KIT_VERSION = 2  # bump when a recipe below changes, so old caches are not reused

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Head size 32 is one that vLLM's CPU attention supports; 4 layers keep vLLM's aux ids distinct as [1, 2, 3].
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
VOCAB_SIZE = 2048

# The larger CPU setting (benchmarks/seeds.py): 6 layers (aux ids [1, 3, 5]), hidden 192, a 4,096-token vocabulary;
# ~4M parameters, trained for a few minutes on the same chat text. Still head size 32 for vLLM's CPU attention.
LARGER_LLAMA = dict(
    TINY_LLAMA,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=3,
)
LARGER_VOCAB_SIZE = 4096


def cache_root() -> Path:
    return Path(os.environ.get("SPECULATORS_HF_CACHE", Path.home() / ".cache" / "speculators_hf"))


def _recipe_dir(name: str, recipe: dict, root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root or cache_root()) / "tiny" / f"{name}-{digest}"


def _build_atomically(target: Path, build) -> Path:
    """Run `build(tmp_dir)` and move the result to `target`; a killed build never leaves half a folder, and processes
    asking at once (parallel test workers) build it once: the others wait on a lock file beside it."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / "config.json").exists():  # built while this process waited
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------------- data


def chitchat_conversations(limit: int | None = None, offset: int = 0) -> Iterator[list[dict]]:
    """Real human-human chats from the `chitchat-dataset` wheel, as `messages` (`user`/`assistant` alternating)."""
    try:
        import chitchat_dataset
    except ImportError as err:
        raise RuntimeError(
            "The tiny kit needs real chat text from the `chitchat-dataset` package: pip install 'speculators_hf[demo]'"
        ) from err
    path = Path(chitchat_dataset.__file__).parent / "dataset.json"
    data = json.loads(path.read_text())
    keys = sorted(data)[offset:]
    if limit is not None:
        keys = keys[:limit]
    for key in keys:
        turns = [" ".join(u["text"].strip() for u in group) for group in data[key]["messages"]]
        turns = [t for t in turns if t]
        if len(turns) < 2:
            continue
        yield [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def write_chat_jsonl(path: str | Path, limit: int, offset: int = 0) -> Path:
    """Write `limit` chitchat conversations as JSONL rows `{"messages": [...]}` (a local chat file for datagen)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for messages in chitchat_conversations(limit, offset):
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(vocab_size: int = VOCAB_SIZE, root: Path | None = None):
    """A byte-level BPE tokenizer trained locally on chitchat text, with a ChatML chat template (cached under `root`,
    default `cache_root()`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    recipe = {"kit": KIT_VERSION, "vocab_size": vocab_size, "template": CHATML_TEMPLATE}
    target = _recipe_dir("tokenizer", recipe, root)

    def build(tmp: Path) -> None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        texts = (m["content"] for conv in chitchat_conversations(3000) for m in conv)
        tok.train_from_iterator(texts, trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|pad|>",
            unk_token=None,
        )
        fast.chat_template = CHATML_TEMPLATE
        fast.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(recipe))  # marks the build as complete

    path = _build_atomically(target, build)
    return PreTrainedTokenizerFast.from_pretrained(path)


# ------------------------------------------------------------------------------------------------------ verifier


def tiny_llama_config(vocab_size: int = VOCAB_SIZE, **overrides):
    from transformers import LlamaConfig

    kwargs = {**TINY_LLAMA, "vocab_size": vocab_size, **overrides}
    return LlamaConfig(**kwargs)


def _chat_token_stream(tokenizer, limit: int, offset: int = 0) -> torch.Tensor:
    ids: list[int] = []
    for messages in chitchat_conversations(limit, offset):
        ids += tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    return torch.tensor(ids, dtype=torch.long)


def _train_briefly(model, tokenizer, steps: int, seq_len: int = 128, batch_size: int = 16, seed: int = 0) -> float:
    """Plain next-token training on chat text, just long enough to make the verifier's predictions peaked."""
    stream = _chat_token_stream(tokenizer, limit=2500)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # [B, T]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def tiny_verifier(kind: str = "random", tie_word_embeddings: bool = False, train_steps: int = 400) -> Path:
    """Path of a cached tiny Llama verifier folder (sharded safetensors + index, tokenizer with chat template).

    Args:
        kind (`str`): `"random"` (seeded random weights) or `"peaked"` (trained briefly on real chat text).
        tie_word_embeddings (`bool`): tie lm_head to the input embedding, as some real checkpoints do.
        train_steps (`int`): optimizer steps for the `"peaked"` verifier (~1 min on 2 cores at the default).
    """
    if kind not in ("random", "peaked"):
        raise ValueError(f"kind must be 'random' or 'peaked', got {kind!r}")
    return _llama_verifier(f"verifier-{kind}", TINY_LLAMA, build_tokenizer(), kind, tie_word_embeddings, train_steps)


def larger_verifier(root: Path | None = None, train_steps: int = 400) -> Path:
    """Path of the larger CPU setting's verifier (`LARGER_LLAMA`, a `LARGER_VOCAB_SIZE` tokenizer), trained like the
    peaked tiny one for `train_steps` steps (a few minutes on 2 cores); deterministic, cached under `root` (default
    `cache_root()`). Used by `benchmarks/seeds.py`, not by the tests."""
    tokenizer = build_tokenizer(LARGER_VOCAB_SIZE, root)
    return _llama_verifier("verifier-larger", LARGER_LLAMA, tokenizer, "peaked", False, train_steps, root)


def _llama_verifier(
    name: str,
    shape: dict,
    tokenizer,
    kind: str,
    tie_word_embeddings: bool,
    train_steps: int,
    root: Path | None = None,
) -> Path:
    from transformers import LlamaForCausalLM

    recipe = {
        "kit": KIT_VERSION,
        "kind": kind,
        "config": shape,
        "tie": tie_word_embeddings,
        "vocab": len(tokenizer),
        "steps": train_steps if kind == "peaked" else 0,
    }
    target = _recipe_dir(name, recipe, root)

    def build(tmp: Path) -> None:
        torch.manual_seed(0)
        config = tiny_llama_config(
            vocab_size=len(tokenizer),
            tie_word_embeddings=tie_word_embeddings,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            **{k: v for k, v in shape.items() if k != "tie_word_embeddings"},
        )
        model = LlamaForCausalLM(config)
        if kind == "peaked":
            logger.info("Training the %s verifier for %d steps (cached afterwards)...", name, train_steps)
            final = _train_briefly(model, tokenizer, train_steps)
            logger.info("%s verifier: final training loss %.3f", name, final)
        model.generation_config.do_sample = False
        # Small shards so that loaders are tested against the sharded layout real checkpoints use.
        model.save_pretrained(tmp, max_shard_size="300KB")
        tokenizer.save_pretrained(tmp)

    return _build_atomically(target, build)


# ------------------------------------------------------------------------------------------- verifier families

# Tiny random configs of the families users bring, each with its own quirks kept: Qwen3 ties its embeddings and has
# q/k norms, Qwen3-MoE and gpt-oss route experts, Gemma-3 scales embeddings by sqrt(H), norms by (1 + w) and mixes
# sliding/full attention with per-type RoPE, gpt-oss has attention sinks, YaRN RoPE and sliding layers, Phi-3 fuses
# qkv / gate_up. Head size 32 (vLLM's CPU attention kernels), 4 layers (aux ids [1, 2, 3]).
_FAMILY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama-3": (
        "LlamaConfig",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=256,
            )
        ),
    ),
    "qwen2.5": ("Qwen2Config", dict(rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "gemma-3": (
        "Gemma3TextConfig",
        dict(
            tie_word_embeddings=True,
            query_pre_attn_scalar=32,
            sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=10.0,  # None in released Gemma-3; set here so that the targets test covers it
        ),
    ),
    "phi-3": ("Phi3Config", dict(head_dim=None)),
    "gpt-oss": (
        "GptOssConfig",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * 2,
            max_position_embeddings=131072,
        ),
    ),
    # Multimodal: the text path of a vision-language verifier (M-RoPE over 3 position sections; 1 vision block).
    "qwen2.5-vl": (
        "Qwen2_5_VLConfig",
        dict(
            text_config=dict(rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[4, 6, 6])),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                fullatt_block_indexes=[0],
            ),
        ),
    ),
}


def tiny_family_config(family: str, vocab_size: int = VOCAB_SIZE, **overrides):
    """The tiny random config of a verifier family (`TINY_FAMILIES`), for a tokenizer of `vocab_size` tokens."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(TINY_FAMILIES)}")
    class_name, quirks = TINY_FAMILIES[family]
    config_class = getattr(transformers, class_name)
    if "text_config" in quirks:  # multimodal: the shape, vocabulary and token ids go to the text config
        text = {**_FAMILY_SHAPE, **quirks["text_config"], "vocab_size": vocab_size, **overrides}
        text = {k: v for k, v in text.items() if v is not None and k != "tie_word_embeddings"}
        return config_class(text_config=text, vision_config=quirks["vision_config"], tie_word_embeddings=False)
    kwargs = {**_FAMILY_SHAPE, **quirks, "vocab_size": vocab_size, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return config_class(**kwargs)


def tiny_family_model_class(config):
    """The transformers class a family's verifier is built with (image-text-to-text for multimodal ones)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForCausalLM if type(config) in AutoModelForCausalLM._model_mapping else AutoModelForImageTextToText


def _perturb_norms(model, scale: float = 0.3, seed: int = 0) -> None:
    """Move every norm weight away from its init (ones, or zeros for Gemma's `1 + w`): a head that applies the wrong
    norm formula then gives visibly wrong logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2]:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def tiny_family_verifier(family: str) -> Path:
    """Path of a cached tiny random verifier of `family` (safetensors, the kit's tokenizer with its chat template)."""
    tokenizer = build_tokenizer()
    config = tiny_family_config(
        family,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    recipe = {"kit": KIT_VERSION, "family": family, "config": config.to_diff_dict()}
    target = _recipe_dir(f"verifier-{family}", recipe)

    def build(tmp: Path) -> None:
        torch.manual_seed(0)
        model = tiny_family_model_class(config).from_config(config, dtype=torch.float32)
        _perturb_norms(model)
        model.generation_config.do_sample = False
        model.save_pretrained(tmp, max_shard_size="300KB")
        tokenizer.save_pretrained(tmp)

    return _build_atomically(target, build)
