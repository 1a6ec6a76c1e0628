"""BLIP: a ViT, the text stack as encoder and/or decoder, and the heads for matching, captioning and VQA.

Which heads exist is decided by the checkpoint (`config.parts`): the retrieval checkpoints have ITC projections
and the ITM head, captioning ones a decoder, VQA ones an image-grounded question encoder and an answer decoder.
Every method checks its capability in the family's table (`BlipConfig.unable`); a refusal says why and names the
checkpoints that can.

Token 0 of ITM and VQA inputs: the reference Hugging Face port keeps `[CLS]` there; the original BLIP code puts
`[ENC]`. `enc_token = False` (default) gives the former, which is what the Hub checkpoints are evaluated with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BlipBase, ImageFeatures, ImageInput, TextInput, check_prompts, text_list
from .config import BlipConfig
from .errors import InputError
from .generate import GenerationConfig, caption_config, check_count, generate, generation_config, with_scores
from .pairs import PairMatching, pair_chunks, pair_kv
from .text import TextLMHeadModel, TextModel
from .vision import VisionModel


class Blip(PairMatching, BlipBase):
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
            # The captioner's decoder attends to image patches, the VQA answer decoder to the question encoder's
            # states (`BlipConfig.decoder_reads_image`); both are built as the reference builds them.
            self.text_decoder = TextLMHeadModel(tc)
        if "vision_proj" in parts:
            self.vision_proj = nn.Linear(vc.hidden_size, config.image_text_hidden_size)
            self.text_proj = nn.Linear(tc.hidden_size, config.image_text_hidden_size)
        if "itm_head" in parts:
            self.itm_head = nn.Linear(tc.hidden_size, 2)
        self.enc_token = False
        self.itm_chunk = 256  # texts per forward pass in `match`

    # ----------------------------------------------------------------- features
    @torch.inference_mode()
    def image_features(self, images: ImageInput) -> ImageFeatures:
        """Patch features (N, 1 + P, H) after the ViT's final LayerNorm: what the text stack attends to.

        The result is an `ImageFeatures` tensor, which every method taking images accepts in their place.
        """
        return self.vision_model(self.pixels(images)).as_subclass(ImageFeatures)

    def _text_ids(self, texts: TextInput, grounded: bool) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokens(texts, max_length=self.config.text_config.max_position_embeddings)
        if grounded and self.enc_token:
            ids = ids.clone()
            ids[:, 0] = self.tokenizer.enc_token_id
        return ids, mask

    @torch.inference_mode()
    def encode_images(self, images: ImageInput) -> Tensor:
        """L2-normalised ITC image embeddings (N, D)."""
        self.require("itc")
        return F.normalize(self.vision_proj(self._feats(images)[:, 0]), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: TextInput) -> Tensor:
        """L2-normalised ITC text embeddings (N, D) from the unimodal text encoder."""
        self.require("itc")
        ids, mask = self._text_ids(texts, grounded=False)
        h, _ = self.text_encoder(ids, mask, first_only=True)  # the projection reads the first position alone
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    @torch.inference_mode()
    def similarity(self, images: ImageInput, texts: TextInput) -> Tensor:
        """ITC cosine similarity (Ni, Nt)."""
        return self.encode_images(images) @ self.encode_texts(texts).t()

    # ----------------------------------------------------------------- matching
    @torch.inference_mode()
    def itm_logits(self, images: ImageInput | Tensor, texts: TextInput) -> Tensor:
        """ITM head logits (Ni, Nt, 2) for every image-text pair; index 1 is "match"."""
        return self.forward_itm(images, texts, first_only=True)

    def forward_itm(self, images: ImageInput | Tensor, texts: TextInput, first_only: bool = False) -> Tensor:
        """`itm_logits` with autograd as the caller has it (GradCAM differentiates through it).

        Each image's cross-attention keys/values are computed once per layer and shared by all texts. `first_only`:
        the last layer computes only the position the ITM head reads (the same logits, less work); off by default,
        as GradCAM and attention maps read every position's attention.
        """
        self.require("itm")
        feats = self._feats(images)
        ids, mask = self._text_ids(texts, grounded=True)
        rows = []
        for i in range(feats.shape[0]):
            kv = self.text_encoder.cross_kv(feats[i : i + 1])  # batch 1: broadcast over the texts
            out = []
            for s in range(0, ids.shape[0], self.itm_chunk):
                h, _ = self.text_encoder(ids[s : s + self.itm_chunk], mask[s : s + self.itm_chunk], encoder_kv=kv,
                                         first_only=first_only)
                out.append(self.itm_head(h[:, 0]))
            rows.append(torch.cat(out))
        return torch.stack(rows)

    @torch.inference_mode()
    def match(self, images: ImageInput | Tensor, texts: TextInput) -> Tensor:
        """ITM match probability (Ni, Nt) for every image-text pair."""
        return self.forward_itm(images, texts, first_only=True).float().softmax(dim=-1)[..., 1]

    def _itm_pairs(self, feats: Tensor, image: Tensor, texts: list[str]) -> Tensor:
        """ITM logits (Npairs, 2) of texts[r] with image image[r] of `feats`, in passes (see `blipkit.pairs`)."""
        ids, mask = self._text_ids(texts, grounded=True)
        lengths = mask.sum(dim=1)
        kv = self.text_encoder.cross_kv(feats)  # per layer (Ni, nh, P, hs), once per image
        out = torch.empty(len(ids), 2, device=self.device, dtype=self.itm_head.weight.dtype)
        for rows in pair_chunks(lengths, kv, self.itm_chunk):
            T = int(lengths[rows].max())
            h, _ = self.text_encoder(ids[rows, :T], mask[rows, :T], encoder_kv=pair_kv(kv, image[rows]),
                                     first_only=True)
            out[rows] = self.itm_head(h[:, 0])
        return out

    # ----------------------------------------------------------------- generation
    def _decode(self, context: Tensor, context_mask: Tensor | None, prompt: Tensor, prompt_mask: Tensor, gen,
                generator=None):
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
        return generate(make_step, prompt, prompt_mask, gen, eos_token_id=tc.sep_token_id, pad_token_id=tc.pad_token_id,
                        generator=generator)

    @torch.inference_mode()
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
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> list[str] | list[list[str]] | list[tuple[str, float]]:
        """Captions for each image (the prompt, if any, starts each caption).

        With `num_captions > 1` each image gets a list of that many: the best beams (needs `num_beams >=
        num_captions`) or, with `do_sample=True`, independent samples. With `return_scores=True` each caption comes
        as `(text, log_probability)`, the summed log-probability of its generated tokens. Sampling draws from
        `generator` (default: torch's), or from one generator per image: an image's captions then do not depend on
        the batch it is in.
        """
        self.require("caption")
        gen = caption_config(num_beams, max_new_tokens, min_new_tokens, repetition_penalty, do_sample, temperature,
                             top_p, num_captions, length_penalty, return_scores)
        prompts = check_prompts(prompt)
        feats = self._feats(images)
        n = feats.shape[0]
        prompts = prompts if isinstance(prompt, (list, tuple)) else prompts * n
        if len(prompts) != n:
            raise InputError(f"got {len(prompts)} prompts for {n} images")
        ids, mask = self._prompt_ids(prompts)
        self._check_room(int(mask.sum(-1).max()), gen)
        out = self._decode(feats, None, ids, mask, gen, generator)
        k = num_captions
        texts = []
        for r, toks in enumerate(out.tokens):
            i = r // k
            full = ids[i][mask[i].bool()].tolist() + toks
            texts.append(self.tokenizer.decode(full))
        return with_scores(texts, out, k, n, return_scores)

    def _check_room(self, used: int, gen: GenerationConfig) -> None:
        """Refuse decoding past the text decoder's position table: `used` prompt positions + max_new_tokens."""
        room, m = self.config.text_config.max_position_embeddings, gen.max_new_tokens
        if used + m > room:
            fix = f"lower max_new_tokens to at most {room - used}" if room > used else ""
            fix += (" or " if fix else "") + "shorten the prompt" if used > 1 else ""
            raise InputError(f"max_new_tokens={m} does not fit: {used} prompt tokens (with the start token) + {m} = "
                             f"{used + m} positions, more than the text decoder's {room}; {fix}")

    def _prompt_ids(self, prompts: list[str | None]) -> tuple[Tensor, Tensor]:
        """Decoder prompts: `[DEC]` + prompt tokens (no `[SEP]`), left-padded so every row continues at its end."""
        bos = self.config.text_config.bos_token_id
        rows = []
        for p in prompts:
            if p is not None:
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
        self.require("vqa")
        qs = text_list(questions, "questions", "question")
        feats = self._feats(images)
        if len(qs) != feats.shape[0]:
            raise InputError(f"got {len(qs)} questions for {feats.shape[0]} images (image i goes with question i)")
        ids, mask = self._text_ids(qs, grounded=True)
        h, _ = self.text_encoder(ids, mask, context=feats)
        return h, mask

    @torch.inference_mode()
    def answer(
        self,
        images: ImageInput,
        questions: TextInput,
        answers: str | list[str] | None = None,
        num_beams: int = 3,
        max_new_tokens: int = 10,
        min_new_tokens: int = 1,
        num_candidates: int = 128,
        **options,
    ) -> list[str]:
        """Answer question i about image i: generated, or the best of `answers` (rank mode).

        Rank mode scores candidates by their log-likelihood under the answer decoder; with more than
        `num_candidates` answers only the ones whose first token is most likely are scored in full.
        Other keyword options: do_sample, temperature, top_p, top_k, repetition_penalty, length_penalty.
        """
        self.require("vqa" if answers is None else "rank_answers")
        gen = generation_config("answer", options, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                num_beams=num_beams)
        num_candidates = check_count("num_candidates", num_candidates)
        candidates = None if answers is None else text_list(answers, "answers", "answer")
        if candidates is None:
            self._check_room(1, gen)  # the answer decoder starts from one [DEC] token
        states, qmask = self._question_states(images, questions)
        if candidates is not None:
            return self._rank_answers(states, qmask, candidates, num_candidates)
        n = states.shape[0]
        bos = self.config.text_config.bos_token_id
        prompt = torch.full((n, 1), bos, device=self.device)
        out = self._decode(states, qmask, prompt, torch.ones_like(prompt), gen)
        return [self.tokenizer.decode(t) for t in out.tokens]

    @torch.inference_mode()
    def answer_logprobs(self, states: Tensor, qmask: Tensor, answers: str | list[str]) -> Tensor:
        """Log-likelihood (Nq, Na) of every answer (with its end token) given each question's states."""
        ids, amask = self.tokens(text_list(answers, "answers", "answer"))
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
