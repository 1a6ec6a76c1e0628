"""A small BERT-style WordPiece vocabulary built from a dataset's own words, so a model trained from scratch has tiny
embeddings. Normalisation and pre-tokenisation are BERT's (uncased); ids 0..6 are the special tokens."""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordPiece

from ..processing import BLIP_DEC, BLIP_ENC, Tokenizer

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", BLIP_DEC, BLIP_ENC)  # [PAD] = 0


def _normalizer() -> normalizers.BertNormalizer:
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)


_NORMALIZER, _PRE_TOKENIZER = _normalizer(), pre_tokenizers.BertPreTokenizer()


def words_in(text: str) -> list[str]:
    """The words of `text` in order, after BERT normalisation (lower case, accents stripped) and pre-tokenisation."""
    return [word for word, _ in _PRE_TOKENIZER.pre_tokenize_str(_NORMALIZER.normalize_str(text))]


def words_of(texts: Iterable[str]) -> list[str]:
    """Distinct words of `texts` after BERT normalisation and pre-tokenisation, in order of first appearance."""
    seen: dict[str, None] = {}
    for text in texts:
        seen.update(dict.fromkeys(words_in(text)))
    return list(seen)


def build_tokenizer(texts: Iterable[str], max_length: int = 64) -> Tokenizer:
    """A WordPiece tokenizer whose vocabulary is the specials, every word of `texts`, and single characters.

    Lowercase letters, digits and punctuation (also as `##` continuations) are included so unseen words are spelled
    out rather than becoming `[UNK]`. Inputs become `[CLS] text [SEP]`; `[DEC]` is the decoder's start token.
    """
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab_list = list(dict.fromkeys([*SPECIALS, *sorted(words_of(texts)), *chars, *("##" + c for c in chars)]))
    vocab = {token: i for i, token in enumerate(vocab_list)}
    backend = Backend(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    special = {"bos": BLIP_DEC, "unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}
    return Tokenizer(backend, special, [BLIP_ENC], model_max_length=max_length)
