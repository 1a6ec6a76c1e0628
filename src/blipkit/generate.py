"""Greedy, nucleus-sampling and beam-search decoding over any model's cached step function.

A model drives decoding through `make_step(rows) -> step`, where `rows` is how many decoding rows each input gets
(beams or samples; the model repeats its image / prompt context that many times) and
`step(new_ids (R, t), state) -> (logits (R, V) of the last position, state)`. `state` starts as None; its tensors
all have the row on dim 0, so beam search reorders it with `index_select(0, ...)`.

The search follows the reference generation semantics (logits processors, the beam-search stopping heuristic and
length normalisation) so that token sequences are identical to it on the same weights.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

Step = Callable[[Tensor, Any], tuple[Tensor, Any]]
NEG = -1.0e9
MAX_SEQUENCES = 256  # beams or samples decoded per input: each is a row of logits over the vocabulary and a KV cache
# beam scores are divided by length ** length_penalty: within +-10 that stays a finite float for any length a model
# can generate (transformers' Python arithmetic overflows past a few hundred); the useful values lie around 0.5-2
MAX_LENGTH_PENALTY = 10.0


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in [low, high] (bools and floats refused), else InputError naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r:.60}")
    if value < low:
        raise InputError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"{name} must be at most {high}, got {value}")
    return int(value)


def check_count(name: str, value: Any) -> int:
    """`value` as an int >= 1 (bools and floats refused), else InputError naming the option."""
    return check_int(name, value, 1)


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] ((low, high] with `low_open`; bools refused), else InputError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r:.60}")
    if low is not None and (value < low or (low_open and value == low)):
        raise InputError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"{name} must be at most {high}, got {value}")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    """`value` if it is a bool, else InputError naming the option."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {value!r:.60}")
    return bool(value)


@dataclass
class GenerationConfig:
    """Decoding options shared by captioning, answering and instructed generation."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    early_stopping: bool = False

    def check(self, labels: dict[str, str] | None = None) -> None:
        """Check every option's type and range, and their combinations; raise InputError naming the first bad one.

        Values are normalised in place (numpy scalars become Python ones). `labels` renames options in messages
        (`caption` calls `num_return_sequences` `num_captions`).
        """
        label = (labels or {}).get
        self.max_new_tokens = check_int(label("max_new_tokens", "max_new_tokens"), self.max_new_tokens, 1)
        self.min_new_tokens = check_int("min_new_tokens", self.min_new_tokens, 0)
        self.num_beams = check_int("num_beams", self.num_beams, 1, MAX_SEQUENCES)
        self.num_return_sequences = check_int(label("num_return_sequences", "num_return_sequences"),
                                              self.num_return_sequences, 1, MAX_SEQUENCES)
        self.do_sample = check_flag("do_sample", self.do_sample)
        self.early_stopping = check_flag("early_stopping", self.early_stopping)
        self.temperature = check_real("temperature", self.temperature)
        self.top_p = check_real("top_p", self.top_p)
        self.repetition_penalty = check_real("repetition_penalty", self.repetition_penalty)
        self.length_penalty = check_real("length_penalty", self.length_penalty, -MAX_LENGTH_PENALTY,
                                         MAX_LENGTH_PENALTY)
        if self.top_k is not None:
            self.top_k = check_int("top_k", self.top_k, 1)
        if self.min_new_tokens > self.max_new_tokens:
            raise InputError(f"min_new_tokens ({self.min_new_tokens}) cannot exceed max_new_tokens "
                             f"({self.max_new_tokens})")
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        k = self.num_return_sequences
        if k > self.num_beams and not (self.do_sample and self.num_beams == 1):  # k samples: one row each
            # greedy decoding has one result per input, beam search at most one per beam
            name = label("num_return_sequences", "num_return_sequences")
            raise InputError(f"{name}={k} needs do_sample=True or num_beams >= {k} (got num_beams="
                             f"{self.num_beams}): greedy decoding gives one sequence, beam search one per beam")


#: the options `answer` / `generate` take besides their named arguments
SAMPLING_OPTIONS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "length_penalty")


def _sampling_config(labels: dict[str, str] | None, **values: Any) -> GenerationConfig:
    """A checked config where sampling draws one sequence per result: `do_sample=True` sets `num_beams` to 1 (after
    checking the given value)."""
    if check_flag("do_sample", values.get("do_sample", False)):
        check_int("num_beams", values.get("num_beams", 1), 1, MAX_SEQUENCES)
        values["num_beams"] = 1
    cfg = GenerationConfig(**values)
    cfg.check(labels)
    return cfg


def generation_config(method: str, options: dict[str, Any], **named: Any) -> GenerationConfig:
    """The checked `GenerationConfig` of a call (`answer`, `generate`) taking `named` arguments and `options`.

    Unknown options are refused by name; sampling draws one sequence per input (no beams).
    """
    unknown = [k for k in options if k not in SAMPLING_OPTIONS]
    if unknown:
        raise InputError(f"{method}() got an unknown option {unknown[0]!r}; its options are "
                         f"{', '.join(named)}, {', '.join(SAMPLING_OPTIONS)}")
    return _sampling_config(None, **named, **options)


def caption_config(
    num_beams: int, max_new_tokens: int, min_new_tokens: int, repetition_penalty: float, do_sample: bool,
    temperature: float, top_p: float, num_captions: int, length_penalty: float, return_scores: bool,
) -> GenerationConfig:
    """The checked `GenerationConfig` of a `caption(...)` call.

    Sampling draws one sequence per caption (no beams); beam search returns the `num_captions` best beams; greedy
    decoding gives one caption per image, so `num_captions > 1` needs sampling or enough beams.
    """
    check_flag("return_scores", return_scores)
    return _sampling_config(
        {"num_return_sequences": "num_captions"},
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=do_sample,
        temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty, length_penalty=length_penalty,
        num_return_sequences=num_captions,
    )


def with_scores(texts: list[str], gen: Generated, k: int, n: int, return_scores: bool) -> list:
    """What `caption` returns: texts (or (text, log-probability) pairs), grouped per image when k > 1."""
    if len(texts) != k * n:  # generate returns k rows per input, in input order
        raise RuntimeError(f"decoding returned {len(texts)} rows for {n} inputs x {k}")
    items = [(t, float(s)) for t, s in zip(texts, gen.scores, strict=True)] if return_scores else texts
    return items if k == 1 else [items[i * k : (i + 1) * k] for i in range(n)]


@dataclass
class Generated:
    """New tokens per returned row (prompt removed, end token kept) and each row's summed log-probability."""

    tokens: list[list[int]]
    scores: Tensor  # (rows,)


def reorder(state: Any, index: Tensor) -> Any:
    """Select rows `index` of every tensor in a nested state."""
    if isinstance(state, Tensor):
        return state.index_select(0, index)
    if isinstance(state, (list, tuple)):
        return type(state)(reorder(s, index) for s in state)
    if isinstance(state, dict):
        return {k: reorder(v, index) for k, v in state.items()}
    return state


def _process(scores: Tensor, seqs: Tensor, seq_mask: Tensor, new: int, cfg: GenerationConfig, eos: list[int]) -> Tensor:
    """Repetition penalty over the tokens so far, then no end token before `min_new_tokens`."""
    if cfg.repetition_penalty != 1.0:
        picked = scores.gather(1, seqs)
        picked = torch.where(picked < 0, picked * cfg.repetition_penalty, picked / cfg.repetition_penalty)
        # padding (mask 0) must not be penalised: scatter the unchanged score back for those positions
        picked = torch.where(seq_mask.bool(), picked, scores.gather(1, seqs))
        # a penalty near 0 divides a positive score past the float range: the largest float keeps it the favourite
        scores = scores.scatter(1, seqs, picked).clamp(max=torch.finfo(scores.dtype).max)
    if new < cfg.min_new_tokens:
        scores[:, eos] = float("-inf")
    return scores


def _warp(scores: Tensor, cfg: GenerationConfig) -> Tensor:
    """Temperature, top-k and nucleus (top-p) filtering for sampling."""
    if cfg.temperature != 1.0:
        warmed = scores / cfg.temperature
        if bool(warmed.isposinf().any()):  # a temperature near 0 overflowed: the same distribution from each row's top
            warmed = (scores - scores.amax(dim=-1, keepdim=True)) / cfg.temperature
        scores = warmed
    if cfg.top_k:
        kth = scores.topk(min(cfg.top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, idx = scores.sort(dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - cfg.top_p
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return scores


def generate(
    make_step: Callable[[int], Step],
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cfg: GenerationConfig,
    eos_token_id: int | list[int],
    pad_token_id: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> Generated:
    """Decode continuations of `input_ids` (B, T0), left-padded where `attention_mask` is 0.

    Returns `num_return_sequences` rows per input, in input order. Sampling draws from `generator`, or with a list of
    B generators, input i draws from generator i alone (its tokens then do not depend on the other inputs).
    """
    cfg.check()
    if isinstance(generator, (list, tuple)) and len(generator) != input_ids.shape[0]:
        raise InputError(f"got {len(generator)} generators for {input_ids.shape[0]} inputs: give one per input")
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cfg.num_beams > 1:
        return _beam(make_step, input_ids, attention_mask, cfg, eos, pad_token_id, generator)
    return _sample(make_step, input_ids, attention_mask, cfg, eos, pad_token_id, generator)


def _multinomial(probs: Tensor, n: int, generator) -> Tensor:
    """`torch.multinomial` of each row; with a list of generators, each draws the rows of its input (consecutive)."""
    if not isinstance(generator, (list, tuple)):
        return torch.multinomial(probs, n, generator=generator)
    rows = probs.shape[0] // len(generator)
    return torch.cat([torch.multinomial(probs[i * rows : (i + 1) * rows], n, generator=g)
                      for i, g in enumerate(generator)])


def _sample(make_step, input_ids, mask, cfg, eos, pad, generator) -> Generated:
    """Greedy (argmax) or sampled decoding, one row per returned sequence."""
    rows = cfg.num_return_sequences  # 1 unless sampling (`check` refuses several greedy sequences)
    seqs, mask = input_ids.repeat_interleave(rows, 0), mask.repeat_interleave(rows, 0)
    step = make_step(rows)
    logits, state = step(seqs, None)
    R, T0 = seqs.shape
    alive = torch.ones(R, dtype=torch.bool, device=seqs.device)
    total = torch.zeros(R, device=seqs.device)
    lengths = torch.full((R,), cfg.max_new_tokens, device=seqs.device)
    eos_t = torch.tensor(eos, device=seqs.device)
    for t in range(cfg.max_new_tokens):
        scores = _process(logits.float(), seqs, mask, t, cfg, eos)
        if cfg.do_sample:
            probs = _warp(scores, cfg).softmax(dim=-1)
            tok = _multinomial(probs, 1, generator).squeeze(1)
        else:
            tok = scores.argmax(dim=-1)
        logp = scores.log_softmax(dim=-1).gather(1, tok[:, None]).squeeze(1)
        total = total + torch.where(alive, logp, torch.zeros_like(logp))
        tok = torch.where(alive, tok, torch.full_like(tok, pad))
        seqs = torch.cat([seqs, tok[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(tok[:, None])], dim=1)
        ended = alive & torch.isin(tok, eos_t)
        lengths = torch.where(ended, torch.full_like(lengths, t + 1), lengths)
        alive = alive & ~ended
        if not alive.any() or t == cfg.max_new_tokens - 1:
            break
        logits, state = step(tok[:, None], state)
    tokens = [seqs[r, T0 : T0 + int(lengths[r])].tolist() for r in range(R)]
    return Generated(tokens, total)


@dataclass
class _Finished:
    """The `nb` best finished hypotheses per input: sequences (B, nb, T), length-normalised scores, lengths."""

    seqs: Tensor
    scores: Tensor
    lengths: Tensor
    filled: Tensor  # (B, nb) bool: the slot holds a hypothesis that ended

    def add(self, cand: Tensor, norm: Tensor, ended: Tensor, length: int, pad: int) -> None:
        """Merge candidates (B, K, T + 1) scored `norm` (B, K) (NEG where they may not join), `ended` (B, K) marking
        those that finished, and keep the `nb` best."""
        nb, T1 = self.scores.shape[1], cand.shape[2]
        seqs = torch.cat([self.seqs, self.seqs.new_full((*self.seqs.shape[:2], T1 - self.seqs.shape[2]), pad)], 2)
        best = torch.cat([self.scores, norm], dim=1).topk(nb, dim=1).indices
        self.seqs = torch.cat([seqs, cand], dim=1).gather(1, best[..., None].expand(-1, -1, T1))
        self.scores = torch.cat([self.scores, norm], dim=1).gather(1, best)
        self.lengths = torch.cat([self.lengths, torch.full_like(norm, length, dtype=torch.long)], 1).gather(1, best)
        self.filled = torch.cat([self.filled, ended], dim=1).gather(1, best)


def _beam_candidates(logp: Tensor, run_scores: Tensor, keep: int, cfg: GenerationConfig, generator) -> tuple:
    """The `keep` best (or sampled) continuations per input: (log-probabilities, source beam, token), each (B, keep)."""
    B, nb = run_scores.shape
    V = logp.shape[-1]
    acc = (logp.view(B, nb, V) + run_scores[..., None]).view(B, nb * V)
    if cfg.do_sample:
        idx = _multinomial(acc.softmax(dim=-1), keep, generator)
        top_lp = acc.gather(1, idx)
    else:
        top_lp, idx = acc.topk(keep, dim=1)
    return top_lp, idx // V, idx % V


def _beam(make_step, input_ids, mask, cfg, eos, pad, generator) -> Generated:
    """Beam search (optionally sampling the candidates), reference stopping and length normalisation.

    Sequences grow by one column per step, so memory follows the tokens generated, not `max_new_tokens`.
    """
    B, T0 = input_ids.shape
    nb, dev = cfg.num_beams, input_ids.device
    keep = max(2, 1 + len(eos)) * nb
    step = make_step(nb)
    logits, state = step(input_ids.repeat_interleave(nb, 0), None)
    mask = mask.repeat_interleave(nb, 0)
    running = input_ids[:, None].repeat(1, nb, 1)  # (B, nb, T)
    run_scores = torch.zeros(B, nb, device=dev)
    run_scores[:, 1:] = NEG  # all beams start identical: only the first may expand at step one
    lengths, filled = torch.full((B, nb), T0, device=dev), torch.zeros(B, nb, dtype=torch.bool, device=dev)
    done = _Finished(running.clone(), torch.full((B, nb), NEG, device=dev), lengths, filled)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    top_nb = torch.arange(keep, device=dev) < nb
    eos_t = torch.tensor(eos, device=dev)
    batch_offset = torch.arange(B, device=dev)[:, None] * nb
    for t in range(cfg.max_new_tokens):
        cur, last = T0 + t, t == cfg.max_new_tokens - 1
        logp = _process(logits.float().log_softmax(dim=-1), running.view(B * nb, -1), mask, t, cfg, eos)
        if cfg.do_sample:
            logp = _warp(logp, cfg)
        top_lp, src, tok = _beam_candidates(logp, run_scores, keep, cfg, generator)
        cand = torch.cat([running.gather(1, src[..., None].expand(-1, -1, cur)), tok[..., None]], dim=2)
        hits = torch.isin(tok, eos_t) | last
        # the best `nb` candidates that did not end keep running
        run_lp = top_lp + hits.float() * NEG
        nxt = run_lp.topk(nb, dim=1).indices
        running = cand.gather(1, nxt[..., None].expand(-1, -1, cur + 1))
        run_scores, beam_src = run_lp.gather(1, nxt), src.gather(1, nxt)
        # candidates among the top `nb` that ended join the finished pool if they beat its worst member
        norm = top_lp / ((cur + 1 - T0) ** cfg.length_penalty)
        if cfg.early_stopping:
            norm = norm + (done.filled.all(dim=1, keepdim=True)).float() * NEG
        ended = hits & top_nb[None, :]
        norm = norm + (~improvable).float() * NEG + (~ended).float() * NEG
        done.add(cand, norm, ended, cur + 1, pad)
        # stop when no running beam can beat the worst finished one (reference heuristic at the current length)
        best_possible = run_scores[:, :1] / ((cur + 1 - T0) ** cfg.length_penalty)
        worst_done = torch.where(
            done.filled, done.scores.min(dim=1, keepdim=True).values, torch.full_like(done.scores, NEG)
        )
        improvable = improvable & (best_possible > worst_done).any(dim=1, keepdim=True)
        stop = (not improvable.any()) or bool(hits.all()) or (cfg.early_stopping and bool(done.filled.all()))
        if stop or last:
            break
        flat = (beam_src + batch_offset).view(-1)
        state = reorder(state, flat)
        mask = torch.cat([mask.index_select(0, flat), torch.ones(B * nb, 1, dtype=mask.dtype, device=dev)], dim=1)
        logits, state = step(running[:, :, cur].reshape(-1, 1), state)
    R = cfg.num_return_sequences
    tokens = [done.seqs[b, j, T0 : int(done.lengths[b, j])].tolist() for b in range(B) for j in range(R)]
    gen_len = (done.lengths[:, :R] - T0).clamp(min=1).float()
    raw = done.scores[:, :R] * gen_len**cfg.length_penalty  # undo the length normalisation: summed log-prob
    return Generated(tokens, raw.reshape(-1))
