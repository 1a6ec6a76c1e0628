"""Tokenizers equal to the transformers tokenizers of the BLIP / BLIP-2 checkpoints (BERT WordPiece, GPT-2 BPE, T5)."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE, WordPiece

from ..errors import CheckpointError, InputError
from ..fields import BOOL, Int, Rule, check, fail, read_json

_SPECIAL_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # transformers' order of adding them
_BERT_SPECIALS = {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}
_GPT2_SPECIALS = {"unk": "<|endoftext|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>"}
BLIP_DEC, BLIP_ENC = "[DEC]", "[ENC]"  # BLIP's decoder-start (bos) and image-grounded-encoder tokens


def _read_json(path: Path) -> dict[str, Any]:
    """A tokenizer JSON file as a dict ({} when absent); CheckpointError naming the file when unreadable."""
    return read_json(path) if path.is_file() else {}


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _token_problem(token: Any) -> str | None:
    """Why `token` is not a token entry (a string, or an object with a string "content"), or None."""
    if isinstance(token, str) or (isinstance(token, dict) and isinstance(token.get("content"), str)):
        return None
    return f"is {token!r:.60}, not a token (a string or an object with a string 'content')"


def _check_token_file(d: dict[str, Any], path: Path) -> None:
    """The special-token entries and flags of tokenizer_config.json or special_tokens_map.json, checked."""
    for name in _SPECIAL_NAMES:
        token = d.get(f"{name}_token")
        if token is not None and _token_problem(token):
            raise fail(path, f"{name}_token", _token_problem(token))
    for key in ("extra_special_tokens", "additional_special_tokens"):
        extra = d.get(key)
        items = list(extra.values()) if isinstance(extra, dict) else extra
        if extra is not None and not isinstance(items, list):
            raise fail(path, key, f"is {extra!r:.60}, not a list of tokens")
        problem = next((_token_problem(t) for t in items or [] if _token_problem(t)), None)
        if problem:
            raise fail(path, key, f"has an item that {problem}")
    flags = ("do_lower_case", "tokenize_chinese_chars", "add_prefix_space", "add_bos_token", "add_eos_token")
    check(d, {k: BOOL for k in flags}, path)
    check(d, {k: Rule(bool, nullable=True) for k in ("strip_accents", "clean_up_tokenization_spaces")}, path)
    decoder = d.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise fail(path, "added_tokens_decoder", f"is {decoder!r:.60}, not an object of id -> token")
    allowed = {"content", "single_word", "lstrip", "rstrip", "normalized", "special", "__type"}
    for i, token in decoder.items():
        ok = i.isdigit() and isinstance(token, dict) and isinstance(token.get("content"), str) and set(token) <= allowed
        if not ok or not all(isinstance(v, bool) for k, v in token.items() if k not in ("content", "__type")):
            raise fail(path, f"added_tokens_decoder.{i}", f"is {token!r:.60}, not an id mapped to an added token")


def _max_length(config: dict[str, Any], path: Path) -> int | None:
    """`model_max_length`: None when absent or huge (transformers writes 1e30 for "no limit"), else at least 2."""
    value = config.get("model_max_length")
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 10**9):
        return None
    check(config, {"model_max_length": Int(2)}, path)
    return value


def _special_tokens(config: dict[str, Any], token_map: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Named special tokens and extra ones, merged as transformers' `from_pretrained` does."""
    merged = dict(config) if "added_tokens_decoder" in config else {**config, **token_map}
    named = {n: _content(merged[f"{n}_token"]) for n in _SPECIAL_NAMES if merged.get(f"{n}_token")}
    extra = merged.get("extra_special_tokens") or merged.get("additional_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else extra
    return named, [_content(t) for t in extra]


def _added_tokens(path: Path) -> dict[str, int]:
    """added_tokens.json (token -> id), checked; {} when absent."""
    added = _read_json(path)
    bad = next((k for k, v in added.items() if type(v) is not int or v < 0), None)
    if bad is not None:
        raise fail(path, bad, f"is {added[bad]!r:.60}, not a token id")
    return added


def _read_text(path: Path) -> str:
    """A tokenizer text file (vocab.txt, merges.txt) as UTF-8; CheckpointError naming the file otherwise."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}); check the file's permissions") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); restore it from the checkpoint") from None


def _bert_backend(vocab_file: Path, config: dict[str, Any]) -> Backend:
    """BERT WordPiece exactly as transformers' BertTokenizer builds it from `vocab.txt`."""
    lines = _read_text(vocab_file).split("\n")
    vocab = {token: i for i, token in enumerate(lines[:-1] if lines[-1] == "" else lines)}
    backend = Backend(WordPiece(vocab, unk_token=_content(config.get("unk_token")) or "[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _bpe_backend(vocab_file: Path, merges_file: Path, config: dict[str, Any]) -> Backend:
    """GPT-2 byte-level BPE as transformers' GPT2Tokenizer builds it (OPT uses it with `add_bos_token`)."""
    read_json(vocab_file)
    _read_text(merges_file)
    try:
        vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{vocab_file}: cannot load it with {merges_file.name} ({e}); restore them from the "
                              "checkpoint") from None
    backend = Backend(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=config.get("add_prefix_space", False))
    backend.decoder = decoders.ByteLevel()
    return backend


_BLANK_CATEGORIES = ("Cc", "Cf", "Zs", "Zl", "Zp")  # control, format (e.g. zero-width space), separators


def is_blank(text: str) -> bool:
    """True when `text` has no visible character: only spaces, control and format characters (the tokenizers drop
    those, so such a text would become an empty one). The one blank rule of the package."""
    return all(c.isspace() or unicodedata.category(c) in _BLANK_CATEGORIES for c in text)


def check_text(text: object, name: str) -> None:
    """Raise InputError unless `text` is a string with a visible character that encodes as UTF-8.

    Control and format characters (NUL, U+200B zero-width space, ...) count as blank: the tokenizers drop them, so
    such a text would become an empty one.
    """
    if not isinstance(text, str):
        raise InputError(f"{name} is a {type(text).__name__}, not a string: pass text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{name} is not valid Unicode (character {e.start} is a lone surrogate "
                         f"{text[e.start]!r}): pass text decoded as UTF-8") from e
    if is_blank(text):
        raise InputError(f"{name} ({text[:40]!r}) is blank: pass text with visible characters")


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens, padding and decoding of the checkpoint's HF tokenizer.

    `vocab_size` counts every id the tokenizer can emit (base vocabulary plus added tokens, i.e. `len(hf_tokenizer)`):
    30524 for BLIP's BERT with `[DEC]` (30522) and `[ENC]` (30523).
    """

    backend: Backend = field(repr=False)
    special: dict[str, str] = field(default_factory=dict)  # "bos" → "[DEC]", "pad" → "[PAD]", ...
    extra_special: list[str] = field(default_factory=list)
    model_max_length: int | None = None
    clean_up_tokenization_spaces: bool = False

    def __post_init__(self) -> None:
        self.backend.no_padding()  # padding and truncation are done per call (tokenizer.json may carry fixed ones)
        self.backend.no_truncation()

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, else BERT vocab.txt, else GPT-2/OPT vocab.json + merges.txt, with their configs."""
        path = Path(path)
        config, token_map = _read_json(path / "tokenizer_config.json"), _read_json(path / "special_tokens_map.json")
        _check_token_file(config, path / "tokenizer_config.json")
        _check_token_file(token_map, path / "special_tokens_map.json")
        named, extra = _special_tokens(config, token_map)
        if (path / "tokenizer.json").is_file():
            try:
                backend = Backend.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                msg = f"{path / 'tokenizer.json'}: cannot load it ({e}); restore it from the checkpoint"
                raise CheckpointError(msg) from e
            if type(backend.model).__name__ == "WordPiece":
                named = {**_BERT_SPECIALS, **named}
            template = None  # tokenizer.json carries its own post-processor and added tokens
        elif (path / "vocab.txt").is_file():
            backend, named = _bert_backend(path / "vocab.txt", config), {**_BERT_SPECIALS, **named}
            template = [named["cls"], "$A", named["sep"]]
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            backend, named = _bpe_backend(path / "vocab.json", path / "merges.txt", config), {**_GPT2_SPECIALS, **named}
            template = [named["bos"]] * bool(config.get("add_bos_token")) + ["$A"]
            template += [named["eos"]] * bool(config.get("add_eos_token"))
        else:
            raise CheckpointError(f"{path}: no tokenizer; looked for tokenizer.json, vocab.txt (BERT), and "
                                  "vocab.json + merges.txt (GPT-2/OPT); download the checkpoint's tokenizer files")
        if backend.token_to_id(BLIP_DEC) is not None:
            named.setdefault("bos", BLIP_DEC)
        tok = cls(backend, named, extra, _max_length(config, path / "tokenizer_config.json"),
                  bool(config.get("clean_up_tokenization_spaces", False)))
        if template is not None:
            tok._add_declared_tokens(config, _added_tokens(path / "added_tokens.json"), path)
        tok._add_special_tokens()
        if template is not None:
            specials = [t for t in template if t != "$A"]
            backend.post_processor = processors.TemplateProcessing(
                single=template, special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(specials)])
        tok._probe(path)
        return tok

    def _probe(self, path: Path) -> None:
        """Encode and decode a sample once, so tokenizer files that load but cannot work fail here, naming them."""
        try:
            ids = self.backend.encode("a photo of 2 cats.", add_special_tokens=True).ids
            self.backend.decode(ids)
        except BaseException as e:  # bare Exceptions, and Rust panics (PanicException, a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            raise CheckpointError(f"{path}: the tokenizer files load but cannot encode text ({e}); restore them "
                                  "from the checkpoint") from None
        if not ids or max(ids) >= self.vocab_size:
            what = "no tokens" if not ids else f"id {max(ids)}, beyond its {self.vocab_size} tokens"
            raise CheckpointError(f"{path}: the tokenizer encodes a sample text to {what}; restore the tokenizer "
                                  "files from the checkpoint")

    def _add_declared_tokens(self, config: dict[str, Any], added_tokens: dict[str, int], path: Path) -> None:
        """Register the added tokens that tokenizer_config.json / added_tokens.json in `path` declare, at their ids."""
        declared = {int(i): AddedToken(**{k: v for k, v in t.items() if k != "__type"})
                    for i, t in config.get("added_tokens_decoder", {}).items()}
        specials = set(self.special.values()) | set(self.extra_special)
        for token, i in added_tokens.items():
            declared.setdefault(i, AddedToken(token, normalized=token not in specials, special=token in specials))
        for i, token in sorted(declared.items()):
            self.backend.add_tokens([token])
            if self.backend.token_to_id(token.content) != i:
                raise CheckpointError(f"{path}: added token {token.content!r} should have id {i} but gets "
                                      f"{self.backend.token_to_id(token.content)}: the tokenizer files disagree; "
                                      "restore them from the checkpoint")

    def _add_special_tokens(self) -> None:
        """Make the named then the extra special tokens added tokens, as transformers does (new ones get new ids)."""
        present = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        for token in [self.special[n] for n in _SPECIAL_NAMES if n in self.special] + self.extra_special:
            if token not in present:
                self.backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])

    def add_blip_tokens(self) -> Tokenizer:
        """Add BLIP's `[DEC]` (as bos) and `[ENC]` when missing, as BLIP's `init_tokenizer` does; returns self."""
        for token in (BLIP_DEC, BLIP_ENC):
            if self.backend.token_to_id(token) is None:
                self.backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self.special["bos"] = BLIP_DEC
        if BLIP_ENC not in self.extra_special:
            self.extra_special.append(BLIP_ENC)
        return self

    def token_to_id(self, token: str | None) -> int | None:
        """Id of a token, or None if it is not in the vocabulary."""
        return None if token is None else self.backend.token_to_id(token)

    bos_token_id = property(lambda self: self.token_to_id(self.special.get("bos")), doc="Id of the bos token.")
    eos_token_id = property(lambda self: self.token_to_id(self.special.get("eos")), doc="Id of the eos token.")
    pad_token_id = property(lambda self: self.token_to_id(self.special.get("pad")), doc="Id of the pad token.")
    sep_token_id = property(lambda self: self.token_to_id(self.special.get("sep")), doc="Id of the sep token.")
    cls_token_id = property(lambda self: self.token_to_id(self.special.get("cls")), doc="Id of the cls token.")
    enc_token_id = property(lambda self: self.token_to_id(BLIP_ENC), doc="Id of BLIP's [ENC] token (None if absent).")
    vocab_size = property(lambda self: self.backend.get_vocab_size(with_added_tokens=True), doc="Number of ids.")

    def __call__(self, texts: str | list[str], max_length: int | None = None, padding_side: str = "right",
                 add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize into (input_ids, attention_mask), both (N, T) int64, padded to the longest text.

        Texts longer than `max_length` tokens (default: the tokenizer's `model_max_length`, e.g. 512 for BERT) are
        truncated on the right, special tokens included in the count, as transformers' `truncation=True` does.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, (list, tuple)):
            texts = list(texts)
        else:
            raise InputError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        if not texts:
            raise InputError("no texts given: pass a non-empty string or a list of them")
        for i, text in enumerate(texts):
            check_text(text, f"text {i}")
        if padding_side not in ("right", "left"):
            raise InputError(f"padding_side={padding_side!r}: use 'right' or 'left'")
        n_special = self.backend.num_special_tokens_to_add(is_pair=False) if add_special_tokens else 0
        limit = max_length if max_length is not None else self.model_max_length
        if limit is not None and limit <= n_special:
            raise InputError(f"max_length={limit} leaves no room for text next to {n_special} special tokens")
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        rows = []
        for enc in encodings:
            if limit is not None and len(enc.ids) > limit - n_special:
                enc.truncate(limit - n_special)
            rows.append(self.backend.post_process(enc, add_special_tokens=add_special_tokens).ids)
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_token_id or 0, dtype=np.int64)  # pads are masked out anyway
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            cols = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            ids[i, cols], mask[i, cols] = row, 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def _clean(self, text: str) -> str:
        if not self.clean_up_tokenization_spaces or type(self.backend.model).__name__ == "BPE":
            return text  # transformers skips this cleanup for BPE models
        for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(old, new)
        return text

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Turn ids back into text, as transformers' `decode` does."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._clean(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def batch_decode(self, sequences: list[list[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row of a batch of ids."""
        rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else [list(s) for s in sequences]
        return [self._clean(t) for t in self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)]

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable by `AutoTokenizer`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        token_map = {f"{n}_token": self.special[n] for n in _SPECIAL_NAMES if n in self.special}
        if self.extra_special:
            token_map["additional_special_tokens"] = list(self.extra_special)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **token_map,
                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", token_map)):
            (path / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
