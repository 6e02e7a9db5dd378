import gzip
import hashlib

import pytest

from gptoss_train.harmony import encoding
from gptoss_train.harmony.tokenizer import special_tokens


def test_vocab_found_offline_from_wheel(monkeypatch, tmp_path):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setenv("GPTOSS_TRAIN_CACHE", str(tmp_path))
    found = encoding.find_vocab_dir()
    assert found is not None and found.parent == tmp_path
    data = (found / encoding.O200K_FILENAME).read_bytes()
    assert hashlib.sha256(data).hexdigest() == encoding.O200K_SHA256


def test_explicit_folder_without_vocab_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    with pytest.raises(encoding.VocabNotFoundError, match="does not exist"):
        encoding.find_vocab_dir()


def test_corrupt_packaged_vocab_is_rejected(monkeypatch, tmp_path):
    bad = tmp_path / "o200k_base.tiktoken.gz"
    with gzip.open(bad, "wb") as handle:
        handle.write(b"not a vocabulary\n")
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setenv("GPTOSS_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(encoding, "_packaged_vocab_gz", lambda: bad)
    with pytest.raises(encoding.VocabNotFoundError, match="sha256"):
        encoding.find_vocab_dir()
    assert not list((tmp_path / "cache" / "tiktoken").glob("*.tiktoken")), "no half-written vocab may remain"


def test_no_vocab_anywhere_explains_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setattr(encoding, "_packaged_vocab_gz", lambda: None)
    with pytest.raises(encoding.VocabNotFoundError, match=r"gptoss-train\[offline\]"):
        encoding.vocab_file()


def test_harmony_special_ids(harmony_encoding):
    for token_id, text in special_tokens():
        # <|endofprompt|> is kept in tokenizer.json for parity with the hub file; harmony does not know it.
        if not text.startswith("<|reserved") and text != "<|endofprompt|>":
            assert harmony_encoding.encode(text, allowed_special="all") == [token_id]
    assert harmony_encoding.encode("<|start|>", allowed_special="all") == [encoding.START]


SAMPLES = [
    "Hello world!",
    "  leading spaces and\ttabs\n\nnew lines\r\n",
    "ünïcödé, 日本語, emoji 🎉 and numbers 1234567",
    "def f(x):\n    return {'a': x ** 2}  # code",
    "I'M SHOUTING, they're quiet; don't you've we'd",
    '{"city": "Paris", "unit": "celsius"}',
]


@pytest.mark.parametrize("text", SAMPLES)
def test_hf_tokenizer_matches_harmony(hf_tokenizer, harmony_encoding, text):
    assert hf_tokenizer.encode(text) == harmony_encoding.encode(text, allowed_special="all")
    assert hf_tokenizer.decode(hf_tokenizer.encode(text)) == text


def test_hf_tokenizer_special_tokens(hf_tokenizer, harmony_encoding):
    assert len(hf_tokenizer) == encoding.VOCAB_SIZE
    text = "<|start|>assistant<|channel|>final<|message|>Hi<|return|>"
    assert hf_tokenizer.encode(text) == harmony_encoding.encode(text, allowed_special="all")
    assert hf_tokenizer.eos_token_id == encoding.RETURN
    assert hf_tokenizer.pad_token_id == encoding.ENDOFTEXT
