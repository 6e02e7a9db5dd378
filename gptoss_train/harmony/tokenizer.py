"""A Hugging Face tokenizer for gpt-oss built offline from the o200k vocabulary.

TRL's SFTTrainer, transformers' generation and the GGUF exporter all want an HF ``PreTrainedTokenizerFast``; the hub
checkpoints ship one, but nothing here can download it. We build the same tokenizer from ``o200k_base.tiktoken``
(found by :mod:`gptoss_train.harmony.encoding`) with transformers' own ``TikTokenConverter``, add the Harmony special
tokens at their fixed ids, and cache the result (building takes ~10 s, loading ~3 s).

Ids agree with openai-harmony for ordinary text and for every Harmony special token (tested).
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import tempfile
from pathlib import Path

from gptoss_train.harmony.encoding import VOCAB_SIZE, cache_dir, vocab_file

# o200k's pre-tokenizer regex (formats.md §5.2; the same pattern tiktoken and harmony use).
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

_NAMED_SPECIALS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}
FIRST_SPECIAL_ID = 199998
# Bump when the built files change so stale caches are rebuilt.
_BUILD_VERSION = "1"


def special_tokens() -> list[tuple[int, str]]:
    """Every id from 199998 to 201087 with its token text (named Harmony tokens, the rest reserved)."""
    return [(i, _NAMED_SPECIALS.get(i, f"<|reserved_{i}|>")) for i in range(FIRST_SPECIAL_ID, VOCAB_SIZE)]


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    # The .tiktoken format is one "base64(token) rank" pair per line; reading it ourselves spares a tiktoken dependency.
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


def _build_tokenizer_files(target: Path) -> None:
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _read_tiktoken_ranks(vocab_file())
    if len(ranks) != FIRST_SPECIAL_ID:
        raise RuntimeError(f"o200k vocabulary has {len(ranks)} ranks, expected {FIRST_SPECIAL_ID}")

    class _LocalConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url):  # noqa: ARG004 - the ranks are already read
            return ranks

    backend = _LocalConverter(vocab_file=str(vocab_file()), pattern=O200K_PATTERN).converted()
    # Added in id order, so each lands at its fixed id (199998 is the first free id after the BPE ranks).
    backend.add_special_tokens([AddedToken(text, normalized=False, special=True) for _, text in special_tokens()])
    if backend.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError("special tokens did not land at their fixed ids")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tokenizer.save_pretrained(str(target))


def hf_tokenizer_dir() -> Path:
    """Folder with ``tokenizer.json`` + ``tokenizer_config.json`` for gpt-oss, built once and cached."""
    target = cache_dir() / f"hf-tokenizer-v{_BUILD_VERSION}"
    if (target / "tokenizer.json").is_file():
        return target
    staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".hf-tokenizer-"))
    try:
        _build_tokenizer_files(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=1)
def load_hf_tokenizer():
    """The cached gpt-oss ``PreTrainedTokenizerFast`` (built on first use)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(hf_tokenizer_dir()))


CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")


def copy_tokenizer_files(dest: Path) -> None:
    """Write the tokenizer files (and our Harmony ``chat_template.jinja``) into a checkpoint folder."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for item in hf_tokenizer_dir().iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    if CHAT_TEMPLATE_PATH.is_file():
        shutil.copy2(CHAT_TEMPLATE_PATH, dest / "chat_template.jinja")
