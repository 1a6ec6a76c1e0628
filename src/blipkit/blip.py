"""BLIP: a ViT, the text stack as encoder and/or decoder, and the heads for matching, captioning and VQA.

Which heads exist is decided by the checkpoint (`config.parts`): the retrieval checkpoints have ITC projections
and the ITM head, captioning ones a decoder, VQA ones an image-grounded question encoder and an answer decoder.
Every method checks the parts it needs and names the checkpoints that have them.

Token 0 of ITM and VQA inputs: the reference Hugging Face port keeps `[CLS]` there; the original BLIP code puts
`[ENC]`. `enc_token = False` (default) gives the former, which is what the Hub checkpoints are evaluated with.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BlipBase, ImageInput, TextInput, as_list
from .config import BlipConfig, checkpoints_with
from .errors import InputError
from .generate import GenerationConfig, caption_config, generate, with_scores
from .text import TextLMHeadModel, TextModel
from .vision import VisionModel


class Blip(BlipBase):
    """A BLIP model; parameter names equal the Hugging Face checkpoints'."""

    family = "BLIP"

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        vc, tc, parts = config.vision_config, config.text_config, set(config.parts)
        self.vision_model = VisionModel(vc)
        if "text_encoder" in parts:
            self.text_encoder = TextModel(tc)
        if "text_decoder" in parts:
            # The VQA answer decoder attends to the question encoder's states, the captioner to image patches.
            width = tc.hidden_size if "text_encoder" in parts and "vision_proj" not in parts else tc.encoder_hidden_size
            self.text_decoder = TextLMHeadModel(dataclasses.replace(tc, encoder_hidden_size=width))
        if "vision_proj" in parts:
            self.vision_proj = nn.Linear(vc.hidden_size, config.image_text_hidden_size)
            self.text_proj = nn.Linear(tc.hidden_size, config.image_text_hidden_size)
        if "itm_head" in parts:
            self.itm_head = nn.Linear(tc.hidden_size, 2)
        self.enc_token = False
        self.itm_chunk = 256  # texts per forward pass in `match`

    def checkpoints_with(self, part: str) -> list[str]:
        return checkpoints_with(part)

    # ----------------------------------------------------------------- features
    def image_features(self, images: ImageInput) -> Tensor:
        """Patch features (N, 1 + P, H) after the ViT's final LayerNorm: what the text stack attends to."""
        return self.vision_model(self.pixels(images))

    def _text_ids(self, texts: TextInput, grounded: bool) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokens(texts, max_length=self.config.text_config.max_position_embeddings)
        if grounded and self.enc_token:
            ids = ids.clone()
            ids[:, 0] = self.tokenizer.enc_token_id
        return ids, mask

    def _feats(self, images: ImageInput | Tensor) -> Tensor:
        """Images, or already computed features (N, 1 + P, H), -> features."""
        if (
            isinstance(images, Tensor)
            and images.dim() == 3
            and images.shape[-1] == self.config.vision_config.hidden_size
        ):
            return images.to(self.device, self.dtype)
        return self.image_features(images)

    def encode_images(self, images: ImageInput) -> Tensor:
        """L2-normalised ITC image embeddings (N, D)."""
        self.require("encode images", "vision_proj")
        return F.normalize(self.vision_proj(self._feats(images)[:, 0]), dim=-1)

    def encode_texts(self, texts: TextInput) -> Tensor:
        """L2-normalised ITC text embeddings (N, D) from the unimodal text encoder."""
        self.require("encode texts", "text_proj")
        ids, mask = self._text_ids(texts, grounded=False)
        h, _ = self.text_encoder(ids, mask)
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def similarity(self, images: ImageInput, texts: TextInput) -> Tensor:
        """ITC cosine similarity (Ni, Nt)."""
        return self.encode_images(images) @ self.encode_texts(texts).t()

    # ----------------------------------------------------------------- matching
    def itm_logits(self, images: ImageInput | Tensor, texts: TextInput) -> Tensor:
        """ITM head logits (Ni, Nt, 2) for every image-text pair; index 1 is "match".

        Each image's cross-attention keys/values are computed once per layer and shared by all texts.
        """
        self.require("match images and texts", "itm_head")
        feats = self._feats(images)
        ids, mask = self._text_ids(texts, grounded=True)
        rows = []
        for i in range(feats.shape[0]):
            kv = self.text_encoder.cross_kv(feats[i : i + 1])  # batch 1: broadcast over the texts
            out = []
            for s in range(0, ids.shape[0], self.itm_chunk):
                h, _ = self.text_encoder(ids[s : s + self.itm_chunk], mask[s : s + self.itm_chunk], encoder_kv=kv)
                out.append(self.itm_head(h[:, 0]))
            rows.append(torch.cat(out))
        return torch.stack(rows)

    def match(self, images: ImageInput | Tensor, texts: TextInput) -> Tensor:
        """ITM match probability (Ni, Nt) for every image-text pair."""
        return self.itm_logits(images, texts).float().softmax(dim=-1)[..., 1]

    # ----------------------------------------------------------------- generation
    def _decode(self, context: Tensor, context_mask: Tensor | None, prompt: Tensor, prompt_mask: Tensor, gen):
        """Run `generate` with the text decoder attending to `context`; returns `Generated`."""

        def make_step(rows: int):
            ctx = context.repeat_interleave(rows, 0)
            cmask = context_mask.repeat_interleave(rows, 0) if context_mask is not None else None

            def step(ids: Tensor, state):
                if state is None:
                    mask = prompt_mask.repeat_interleave(rows, 0)
                    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
                    logits, cache = self.text_decoder(
                        ids, attention_mask=mask, context=ctx, context_mask=cmask, positions=pos
                    )
                    return logits[:, -1], (cache, mask, cmask)
                cache, mask, cm = state
                mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
                pos = mask.sum(-1, keepdim=True) - 1
                logits, cache = self.text_decoder(ids, attention_mask=mask, context_mask=cm, cache=cache, positions=pos)
                return logits[:, -1], (cache, mask, cm)

            return step

        tc = self.config.text_config
        return generate(make_step, prompt, prompt_mask, gen, eos_token_id=tc.sep_token_id, pad_token_id=tc.pad_token_id)

    @torch.no_grad()
    def caption(
        self,
        images: ImageInput,
        prompt: str | list[str] | None = None,
        num_beams: int = 3,
        max_new_tokens: int = 30,
        min_new_tokens: int = 5,
        repetition_penalty: float = 1.0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        num_captions: int = 1,
        length_penalty: float = 1.0,
        return_scores: bool = False,
    ) -> list[str] | list[list[str]] | list[tuple[str, float]]:
        """Captions for each image (the prompt, if any, starts each caption).

        With `num_captions > 1` each image gets a list. With `return_scores=True` each caption comes as
        `(text, log_probability)`, the summed log-probability of its generated tokens.
        """
        self.require("caption", "text_decoder")
        feats = self.image_features(images)
        n = feats.shape[0]
        prompts = [prompt or ""] * n if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise InputError(f"got {len(prompts)} prompts for {n} images")
        ids, mask = self._prompt_ids(prompts)
        gen = caption_config(num_beams, max_new_tokens, min_new_tokens, repetition_penalty, do_sample, temperature,
                             top_p, num_captions, length_penalty)
        out = self._decode(feats, None, ids, mask, gen)
        k = num_captions
        texts = []
        for r, toks in enumerate(out.tokens):
            i = r // k
            full = ids[i][mask[i].bool()].tolist() + toks
            texts.append(self.tokenizer.decode(full))
        return with_scores(texts, out, k, n, return_scores)

    def _prompt_ids(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Decoder prompts: `[DEC]` + prompt tokens (no `[SEP]`), left-padded so every row continues at its end."""
        bos = self.config.text_config.bos_token_id
        rows = []
        for p in prompts:
            if p.strip():
                ids, mask = self.tokens(p, max_length=self.config.text_config.max_position_embeddings)
                rows.append([bos] + ids[0][mask[0].bool()].tolist()[1:-1])
            else:
                rows.append([bos])
        T = max(len(r) for r in rows)
        pad = self.config.text_config.pad_token_id
        ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return ids, mask

    def _question_states(self, images: ImageInput, questions: TextInput) -> tuple[Tensor, Tensor]:
        self.require("answer questions", "text_encoder", "text_decoder")
        feats = self.image_features(images)
        qs = as_list(questions)
        if len(qs) != feats.shape[0]:
            raise InputError(f"got {len(qs)} questions for {feats.shape[0]} images (image i goes with question i)")
        ids, mask = self._text_ids(qs, grounded=True)
        h, _ = self.text_encoder(ids, mask, context=feats)
        return h, mask

    @torch.no_grad()
    def answer(
        self,
        images: ImageInput,
        questions: TextInput,
        answers: list[str] | None = None,
        num_beams: int = 3,
        max_new_tokens: int = 10,
        min_new_tokens: int = 1,
        num_candidates: int = 128,
        **options,
    ) -> list[str]:
        """Answer question i about image i: generated, or the best of `answers` (rank mode).

        Rank mode scores candidates by their log-likelihood under the answer decoder; with more than
        `num_candidates` answers only the ones whose first token is most likely are scored in full.
        Other keyword options are those of `caption` (do_sample, temperature, top_p, repetition_penalty, ...).
        """
        states, qmask = self._question_states(images, questions)
        if answers is not None:
            return self._rank_answers(states, qmask, answers, num_candidates)
        n = states.shape[0]
        bos = self.config.text_config.bos_token_id
        prompt = torch.full((n, 1), bos, device=self.device)
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            num_beams=1 if options.get("do_sample") else num_beams,
            **options,
        )
        out = self._decode(states, qmask, prompt, torch.ones_like(prompt), gen)
        return [self.tokenizer.decode(t) for t in out.tokens]

    def answer_logprobs(self, states: Tensor, qmask: Tensor, answers: list[str]) -> Tensor:
        """Log-likelihood (Nq, Na) of every answer (with its end token) given each question's states."""
        if not answers:
            raise InputError("the answer list is empty")
        ids, amask = self.tokens(answers)
        ids = ids.clone()
        ids[:, 0] = self.config.text_config.bos_token_id
        targets = ids[:, 1:].masked_fill(amask[:, 1:] == 0, -100)
        out = []
        for q in range(states.shape[0]):
            kv = self.text_decoder.bert.cross_kv(states[q : q + 1])
            cm = qmask[q : q + 1]  # one question for every answer row: shared, not copied
            logits, _ = self.text_decoder(ids, attention_mask=amask, encoder_kv=kv, context_mask=cm)
            lp = logits[:, :-1].float().log_softmax(-1)
            tok = lp.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
            out.append((tok * (targets != -100)).sum(-1))
        return torch.stack(out)

    def _rank_answers(self, states: Tensor, qmask: Tensor, answers: list[str], k: int) -> list[str]:
        scores = (
            self.answer_logprobs(states, qmask, answers)
            if len(answers) <= k
            else self._topk_rank(states, qmask, answers, k)
        )
        return [answers[int(i)] for i in scores.argmax(-1)]

    def _topk_rank(self, states: Tensor, qmask: Tensor, answers: list[str], k: int) -> Tensor:
        """First-token pre-selection of `k` candidates per question, then full scoring (-inf elsewhere)."""
        ids, _ = self.tokens(answers)
        bos = torch.full((states.shape[0], 1), self.config.text_config.bos_token_id, device=self.device)
        logits, _ = self.text_decoder(bos, context=states, context_mask=qmask)
        first = logits[:, 0].float().log_softmax(-1)[:, ids[:, 1]]  # (Nq, Na)
        top = first.topk(k, dim=-1).indices
        scores = torch.full(first.shape, float("-inf"), device=self.device)
        for q in range(states.shape[0]):
            sub = [answers[int(j)] for j in top[q]]
            scores[q, top[q]] = self.answer_logprobs(states[q : q + 1], qmask[q : q + 1], sub)[0]
        return scores
