"""Greedy, nucleus-sampling and beam-search decoding over any model's cached step function.

A model drives decoding through `make_step(rows) -> step`, where `rows` is how many decoding rows each input gets
(beams or samples; the model repeats its image / prompt context that many times) and
`step(new_ids (R, t), state) -> (logits (R, V) of the last position, state)`. `state` starts as None; its tensors
all have the row on dim 0, so beam search reorders it with `index_select(0, ...)`.

The search follows the reference generation semantics (logits processors, the beam-search stopping heuristic and
length normalisation) so that token sequences are identical to it on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import InputError

Step = Callable[[Tensor, Any], tuple[Tensor, Any]]
NEG = -1.0e9


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

    def check(self) -> None:
        """Raise InputError naming the first option out of range."""
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InputError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.num_beams < 1:
            raise InputError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise InputError(
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})"
            )


def caption_config(
    num_beams: int, max_new_tokens: int, min_new_tokens: int, repetition_penalty: float, do_sample: bool,
    temperature: float, top_p: float, num_captions: int, length_penalty: float,
) -> GenerationConfig:
    """The `GenerationConfig` of a `caption(...)` call: sampling draws one sequence per caption (no beams) and
    `top_p` applies only when sampling."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_beams=1 if do_sample else num_beams,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p if do_sample else 1.0,
        repetition_penalty=repetition_penalty,
        length_penalty=length_penalty,
        num_return_sequences=num_captions,
    )


def with_scores(texts: list[str], gen: Generated, k: int, n: int, return_scores: bool) -> list:
    """What `caption` returns: texts (or (text, log-probability) pairs), grouped per image when k > 1."""
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
        scores = scores.scatter(1, seqs, picked)
    if new < cfg.min_new_tokens:
        scores[:, eos] = float("-inf")
    return scores


def _warp(scores: Tensor, cfg: GenerationConfig) -> Tensor:
    """Temperature, top-k and nucleus (top-p) filtering for sampling."""
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
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
    generator: torch.Generator | None = None,
) -> Generated:
    """Decode continuations of `input_ids` (B, T0), left-padded where `attention_mask` is 0.

    Returns `num_return_sequences` rows per input, in input order.
    """
    cfg.check()
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cfg.num_beams > 1:
        return _beam(make_step, input_ids, attention_mask, cfg, eos, pad_token_id, generator)
    return _sample(make_step, input_ids, attention_mask, cfg, eos, pad_token_id, generator)


def _sample(make_step, input_ids, mask, cfg, eos, pad, generator) -> Generated:
    """Greedy (argmax) or sampled decoding, one row per returned sequence."""
    rows = cfg.num_return_sequences if cfg.do_sample else 1
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
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
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


def _beam(make_step, input_ids, mask, cfg, eos, pad, generator) -> Generated:
    """Beam search (optionally sampling the candidates), reference stopping and length normalisation."""
    B, T0 = input_ids.shape
    nb, dev = cfg.num_beams, input_ids.device
    max_len = T0 + cfg.max_new_tokens
    keep = max(2, 1 + len(eos)) * nb
    step = make_step(nb)
    logits, state = step(input_ids.repeat_interleave(nb, 0), None)
    mask = mask.repeat_interleave(nb, 0)
    running = torch.full((B, nb, max_len), pad, dtype=torch.long, device=dev)
    running[:, :, :T0] = input_ids[:, None]
    run_scores = torch.zeros(B, nb, device=dev)
    run_scores[:, 1:] = NEG  # all beams start identical: only the first may expand at step one
    done_seqs, done_scores = running.clone(), torch.full((B, nb), NEG, device=dev)
    done_len = torch.full((B, nb), T0, dtype=torch.long, device=dev)
    finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    top_nb = torch.arange(keep, device=dev) < nb
    eos_t = torch.tensor(eos, device=dev)
    batch_offset = torch.arange(B, device=dev)[:, None] * nb
    for t in range(cfg.max_new_tokens):
        cur = T0 + t
        logp = logits.float().log_softmax(dim=-1)
        logp = _process(logp, running.view(B * nb, -1)[:, :cur], mask, t, cfg, eos)
        if cfg.do_sample:
            logp = _warp(logp, cfg)
        V = logp.shape[-1]
        acc = (logp.view(B, nb, V) + run_scores[..., None]).view(B, nb * V)
        if cfg.do_sample:
            idx = torch.multinomial(acc.softmax(dim=-1), keep, generator=generator)
            top_lp = acc.gather(1, idx)
        else:
            top_lp, idx = acc.topk(keep, dim=1)
        src, tok = idx // V, idx % V  # (B, keep) source beam and new token
        cand = running.gather(1, src[..., None].expand(-1, -1, max_len)).clone()
        cand[:, :, cur] = tok
        hits = torch.isin(tok, eos_t) | (cur + 1 >= max_len)
        # the best `nb` candidates that did not end keep running
        run_lp = top_lp + hits.float() * NEG
        nxt = run_lp.topk(nb, dim=1).indices
        running = cand.gather(1, nxt[..., None].expand(-1, -1, max_len))
        run_scores = run_lp.gather(1, nxt)
        beam_src = src.gather(1, nxt)
        # candidates among the top `nb` that ended join the finished pool if they beat its worst member
        norm = top_lp / ((cur + 1 - T0) ** cfg.length_penalty)
        if cfg.early_stopping:
            norm = norm + (finished.all(dim=1, keepdim=True)).float() * NEG
        norm = norm + (~improvable).float() * NEG
        just = hits & top_nb[None, :]
        norm = norm + (~just).float() * NEG
        m_seqs = torch.cat([done_seqs, cand], dim=1)
        m_scores = torch.cat([done_scores, norm], dim=1)
        m_len = torch.cat([done_len, torch.full_like(tok, cur + 1)], dim=1)
        m_fin = torch.cat([finished, just], dim=1)
        best = m_scores.topk(nb, dim=1).indices
        done_seqs = m_seqs.gather(1, best[..., None].expand(-1, -1, max_len))
        done_scores, done_len, finished = m_scores.gather(1, best), m_len.gather(1, best), m_fin.gather(1, best)
        # stop when no running beam can beat the worst finished one (reference heuristic at the current length)
        best_possible = run_scores[:, :1] / ((cur + 1 - T0) ** cfg.length_penalty)
        worst_done = torch.where(
            finished, done_scores.min(dim=1, keepdim=True).values, torch.full_like(done_scores, NEG)
        )
        improvable = improvable & (best_possible > worst_done).any(dim=1, keepdim=True)
        stop = (not improvable.any()) or bool(hits.all()) or (cfg.early_stopping and bool(finished.all()))
        if stop or t == cfg.max_new_tokens - 1:
            break
        flat = (beam_src + batch_offset).view(-1)
        state = reorder(state, flat)
        mask = torch.cat([mask.index_select(0, flat), torch.ones(B * nb, 1, dtype=mask.dtype, device=dev)], dim=1)
        logits, state = step(running[:, :, cur].reshape(-1, 1), state)
    R = cfg.num_return_sequences
    tokens = [done_seqs[b, j, T0 : int(done_len[b, j])].tolist() for b in range(B) for j in range(R)]
    gen_len = (done_len[:, :R] - T0).clamp(min=1).float()
    raw = done_scores[:, :R] * gen_len**cfg.length_penalty  # undo the length normalisation: summed log-prob
    return Generated(tokens, raw.reshape(-1))
