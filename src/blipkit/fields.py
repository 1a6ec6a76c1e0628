"""Reading checkpoint files at the door: JSON that must parse, values that must have the right type and range.

Every config value is checked before anything is built from it, so a malformed or hostile file (a size of 10**9, a
NaN epsilon, a string where a number belongs) is one `CheckpointError` naming the file and the key, never a
traceback from deep inside torch and never minutes spent building a model that cannot exist.
The limits are far above every Salesforce checkpoint (the largest, BLIP-2 with OPT-6.7b or Flan-T5-XXL, has 4096-wide
language models of 32 layers, 16384-wide feed-forwards and a 50272-token vocabulary).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

MAX_LAYERS = 256
MAX_HIDDEN = 32768  # model widths (hidden_size, d_model, projection sizes)
MAX_FFN = 131072  # feed-forward widths
MAX_HEADS = 1024
MAX_VOCAB = 1 << 20
MAX_POSITIONS = 1 << 17  # learned position tables, T5's relative distances
MAX_IMAGE_SIZE = 4096  # pixels per side, in config.json and preprocessor_config.json
MAX_QUERY_TOKENS = 1024
FIX = "correct it or restore the file from the checkpoint"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Rule:
    """What one config value may be: a JSON type (int, float, bool, str), a range or choices, null or not.

    `many` also allows a non-empty list of such values (e.g. `eos_token_id`).
    """

    kind: type
    lo: float | None = None
    hi: float | None = None
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    many: bool = False
    lo_open: bool = False  # lo itself excluded (epsilons, std, rescale factor)

    def problem(self, value: Any) -> str | None:
        """Why `value` breaks the rule (a phrase for an error message), or None when it is fine."""
        if value is None:
            return None if self.nullable else "null"
        if self.many and isinstance(value, list):
            if not value:
                return "an empty list"
            return next((p for p in map(self.problem, value) if p is not None), None)
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{_a(_json_type(value))}, not a number"
            if not math.isfinite(value):
                return "not a finite number"
        elif self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{_a(_json_type(value))}, not an integer"
        elif not isinstance(value, self.kind):
            return f"{_a(_json_type(value))}, not {_a(_json_type(self.kind()))}"
        if self.choices and value not in self.choices:
            return f"not one of {', '.join(map(repr, self.choices))}"
        too_low = self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo))
        if too_low or (self.hi is not None and value > self.hi):
            return f"out of range (it must be {self._range()})"
        return None

    def _range(self) -> str:
        low = f"above {self.lo}" if self.lo_open else f"at least {self.lo}"
        return low if self.hi is None else f"{low} and at most {self.hi}"


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def Int(lo: int = 1, hi: int | None = None, nullable: bool = False, many: bool = False) -> Rule:  # noqa: N802
    """An integer in [lo, hi]."""
    return Rule(int, lo, hi, nullable=nullable, many=many)


def Float(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Rule:  # noqa: N802
    """A finite number (JSON int or float) in [lo, hi] ((lo, hi] with `lo_open`)."""
    return Rule(float, lo, hi, lo_open=lo_open)


BOOL = Rule(bool)
EPS = Float(0.0, 1.0, lo_open=True)  # layer-norm epsilons
PROB = Float(0.0, 1.0)  # dropout rates, label smoothing


def Choice(*choices: str) -> Rule:  # noqa: N802
    """One of the given strings."""
    return Rule(str, choices=choices)


def fail(source: str | Path, key: str, message: str) -> CheckpointError:
    """The one-line error for `key` of file `source`."""
    return CheckpointError(f"{source}: '{key}' {message}; {FIX}")


def check(d: dict[str, Any], rules: dict[str, Rule], source: str | Path, prefix: str = "") -> None:
    """Check the keys of `d` that `rules` names (absent keys keep their defaults); `prefix` locates `d` in the file."""
    for key, rule in rules.items():
        if key in d:
            problem = rule.problem(d[key])
            if problem is not None:
                raise fail(source, prefix + key, "is null" if d[key] is None else f"is {_show(d[key])}, {problem}")


def require(ok: bool, source: str | Path, key: str, message: str) -> None:
    """Raise the error for `key` unless `ok` (for rules that relate several values)."""
    if not ok:
        raise fail(source, key, message)


def check_heads(hidden: int, heads: int, source: str | Path, prefix: str, key: str = "hidden_size") -> None:
    """Attention splits the width evenly over the heads."""
    require(hidden % heads == 0, source, prefix + key, f"is {hidden}, which {heads} attention heads do not divide")


def check_token_ids(
    d: dict[str, Any], config: object, source: str | Path, prefix: str, keys: tuple[str, ...],
    required: tuple[str, ...] = (),
) -> None:
    """The token ids `d` names must exist in the vocabulary of `config` (`eos_token_id` may list several).

    Keys in `required` may not be null (the model uses them), and when `d` omits them, the default `config` took must
    exist too; the others may be null (transformers writes unused ids as null).
    """
    vocab = config.vocab_size
    rules = {k: Int(0, vocab - 1, nullable=k not in required, many=k == "eos_token_id") for k in keys}
    check(d, rules, source, prefix)
    for key in required:
        default = getattr(config, key)
        if key not in d and rules[key].problem(default) is not None:
            raise fail(source, prefix + key, f"is not set, and its default {default} is not below vocab_size {vocab}")


def section(d: dict[str, Any], key: str, source: str | Path, prefix: str = "") -> dict[str, Any]:
    """The nested object `d[key]` (empty when absent or null), refusing anything that is not a JSON object."""
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(source, prefix + key, f"is {_a(_json_type(value))}, not an object")
    return value


def read_json(path: str | Path, kind: type = dict) -> Any:
    """Parse a checkpoint JSON file that must hold a `kind` (object by default); CheckpointError naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}); check the file's permissions") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); restore it from the checkpoint") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); restore the file from the checkpoint") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: holds a JSON {_json_type(value)} where a JSON {_json_type(kind())} belongs; "
                              "restore the file from the checkpoint")
    return value
