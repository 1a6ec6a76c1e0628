"""BLIP-2: EVA ViT-g, the Q-Former, and either a language model (OPT / Flan-T5) or the retrieval heads.

Generation checkpoints put the 32 query outputs, projected to the language model's width, in front of the prompt:
OPT continues `[queries, prompt]`; T5 encodes `[queries, prompt]` and decodes the answer. Retrieval checkpoints
embed an image as 32 query vectors and a text as one vector (ITC similarity: the best query), and score pairs
with the ITM head averaged over the query outputs of a joint image-text pass.
Every method checks its capability in the family's table (`Blip2Config.unable`); a refusal says why and names the
checkpoints that can.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BlipBase, ImageFeatures, ImageInput, TextInput, check_prompts, text_list
from .blip2_config import Blip2Config
from .errors import InputError
from .generate import Generated, GenerationConfig, caption_config, generate, generation_config, with_scores
from .lm import OPTForCausalLM, T5ForConditionalGeneration
from .pairs import PairMatching, pair_chunks, pair_kv
from .qformer import QFormer, QFormerEmbeddings
from .vision import VisionModel

QUESTION_PROMPT = "Question: {} Answer:"


class Blip2(PairMatching, BlipBase):
    """A BLIP-2 model; parameter names equal the Hugging Face checkpoints'."""

    family = "BLIP-2"

    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        vc, qc, parts = config.vision_config, config.qformer_config, set(config.parts)
        self.vision_model = VisionModel(vc)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qc.hidden_size))
        if "embeddings" in parts:
            self.embeddings = QFormerEmbeddings(qc)
        self.qformer = QFormer(qc)
        if "language_model" in parts:
            tc = config.text_config
            if config.lm_type == "t5":
                self.language_projection = nn.Linear(qc.hidden_size, tc.d_model)
                self.language_model = T5ForConditionalGeneration(tc)
            else:
                self.language_projection = nn.Linear(qc.hidden_size, tc.hidden_size)
                self.language_model = OPTForCausalLM(tc)
        if "vision_projection" in parts:
            self.vision_projection = nn.Linear(qc.hidden_size, config.image_text_hidden_size)
            self.text_projection = nn.Linear(qc.hidden_size, config.image_text_hidden_size)
        if "itm_head" in parts:
            self.itm_head = nn.Linear(qc.hidden_size, 2)
        self.itm_chunk = 128  # texts per Q-Former pass in `match`

    def keep_float32(self, name: str) -> bool:
        """The query tokens and the Q-Former stay float32 in half-precision models, as in the reference."""
        return name == "query_tokens" or name.startswith("qformer.")

    @property
    def unused_checkpoint_keys(self) -> tuple[str, ...]:
        """Checkpoint tensors the model never uses (an old T5 layout detail); the loader skips them."""
        lm = getattr(self, "language_model", None)
        return tuple(f"language_model.{k}" for k in getattr(lm, "unused_checkpoint_keys", ()))

    # ----------------------------------------------------------------- features
    @torch.inference_mode()
    def image_features(self, images: ImageInput) -> ImageFeatures:
        """Patch features (N, 1 + P, W) after the ViT's final LayerNorm: what the Q-Former attends to.

        The result is an `ImageFeatures` tensor, which every method taking images accepts in their place.
        """
        return self.vision_model(self.pixels(images)).as_subclass(ImageFeatures)

    def _query_outputs(self, feats: Tensor) -> Tensor:
        queries = self.query_tokens.expand(feats.shape[0], -1, -1)  # (N, Q, H)
        return self.qformer(queries, queries.shape[1], image=feats)

    @torch.inference_mode()
    def qformer_features(self, images: ImageInput | Tensor) -> Tensor:
        """The Q-Former's query outputs (N, Q, H), float32 unless the whole model was cast."""
        return self._query_outputs(self._feats(images))

    def prefix_embeds(self, images: ImageInput | Tensor) -> Tensor:
        """Query outputs projected to the language model's input width (N, Q, E), in its dtype.

        Runs with autograd as the caller has it: training the Q-Former differentiates through it.
        """
        self.require("generate", "condition a language model")
        q = self._query_outputs(self._feats(images))
        return self.language_projection(q.to(self.language_projection.weight.dtype))  # (N, Q, E)

    # ----------------------------------------------------------------- retrieval
    def _text_ids(self, texts: TextInput) -> tuple[Tensor, Tensor]:
        return self.tokens(texts, max_length=self.config.qformer_config.max_position_embeddings)

    @torch.inference_mode()
    def encode_images(self, images: ImageInput | Tensor) -> Tensor:
        """L2-normalised ITC image embeddings, one per query (N, Q, D)."""
        self.require("itc")
        q = self._query_outputs(self._feats(images))
        return F.normalize(self.vision_projection(q.to(self.vision_projection.weight.dtype)), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: TextInput) -> Tensor:
        """L2-normalised ITC text embeddings (N, D): the text-only Q-Former's first token, projected."""
        self.require("itc")
        ids, mask = self._text_ids(texts)
        h = self.qformer(self.embeddings(ids), 0, mask)  # (N, T, H)
        return F.normalize(self.text_projection(h[:, 0].to(self.text_projection.weight.dtype)), dim=-1)

    @torch.inference_mode()
    def similarity(self, images: ImageInput | Tensor, texts: TextInput) -> Tensor:
        """ITC similarity (Ni, Nt): the cosine of the text with the image's best-matching query."""
        img, txt = self.encode_images(images), self.encode_texts(texts)
        return torch.einsum("iqd,td->iqt", img, txt).max(dim=1).values

    @torch.inference_mode()
    def itm_logits(self, images: ImageInput | Tensor, texts: TextInput) -> Tensor:
        """ITM head logits (Ni, Nt, 2) for every image-text pair, averaged over the query outputs; 1 is "match"."""
        return self.forward_itm(images, texts)

    def forward_itm(self, images: ImageInput | Tensor, texts: TextInput) -> Tensor:
        """`itm_logits` with autograd as the caller has it (GradCAM differentiates through it).

        Each image's cross-attention keys/values are computed once per layer and shared by all texts; texts go
        through in chunks of similar length, each padded only to its own longest text.
        """
        self.require("itm")
        feats = self._feats(images)
        ids, mask = self._text_ids(texts)
        text = self.embeddings(ids)  # (Nt, T, H)
        Q, Nt = self.config.num_query_tokens, ids.shape[0]
        # the reference casts the queries to the text embeddings' dtype before joining them
        queries = self.query_tokens.to(text.dtype)
        lengths = mask.sum(dim=1)
        order = lengths.sort(descending=True, stable=True).indices
        out = torch.empty(feats.shape[0], Nt, 2, device=self.device, dtype=self.itm_head.weight.dtype)
        for i in range(feats.shape[0]):
            kv = self.qformer.cross_kv(feats[i : i + 1])  # batch 1: broadcast over the texts
            for s in range(0, Nt, self.itm_chunk):
                rows = order[s : s + self.itm_chunk]
                T = int(lengths[rows].max())
                t, m = text[rows, :T], mask[rows, :T]  # (n, T, H), (n, T)
                x = torch.cat([queries.expand(len(rows), -1, -1), t], dim=1)  # (n, Q + T, H)
                m = torch.cat([m.new_ones(len(rows), Q), m], dim=1)  # (n, Q + T)
                h = self.qformer(x, Q, m, image_kv=kv)
                out[i, rows] = self.itm_head(h[:, :Q].to(out.dtype)).mean(dim=1)  # (n, 2)
        return out  # (Ni, Nt, 2)

    @torch.inference_mode()
    def match(self, images: ImageInput | Tensor, texts: TextInput) -> Tensor:
        """ITM match probability (Ni, Nt) for every image-text pair."""
        return self.forward_itm(images, texts).float().softmax(dim=-1)[..., 1]

    def _itm_pairs(self, feats: Tensor, image: Tensor, texts: list[str]) -> Tensor:
        """ITM logits (Npairs, 2) of texts[r] with image image[r] of `feats`, in passes (see `blipkit.pairs`)."""
        ids, mask = self._text_ids(texts)
        text = self.embeddings(ids)  # (Npairs, T, H)
        Q, lengths = self.config.num_query_tokens, mask.sum(dim=1)
        queries = self.query_tokens.to(text.dtype)  # cast as the reference does before joining them
        kv = self.qformer.cross_kv(feats)  # per layer (Ni, nh, P, hs), once per image
        out = torch.empty(len(texts), 2, device=self.device, dtype=self.itm_head.weight.dtype)
        for rows in pair_chunks(lengths, kv, self.itm_chunk):
            T = int(lengths[rows].max())
            x = torch.cat([queries.expand(len(rows), -1, -1), text[rows, :T]], dim=1)  # (n, Q + T, H)
            m = torch.cat([mask.new_ones(len(rows), Q), mask[rows, :T]], dim=1)  # (n, Q + T)
            h = self.qformer(x, Q, m, image_kv=pair_kv(kv, image[rows]))
            out[rows] = self.itm_head(h[:, :Q].to(out.dtype)).mean(dim=1)  # (n, 2)
        return out

    # ----------------------------------------------------------------- generation
    def _prompt_rows(self, prompts: list[str | None], max_new_tokens: int) -> list[list[int]]:
        """Language-model token ids of each prompt (the tokenizer's special tokens included), checked to fit."""
        cfg, rows = self.config, []
        for p in prompts:
            if p is None:
                row = [cfg.prompt_bos_token_id]
            else:  # no truncation: a prompt that does not fit is an error
                row = self.tokens(p, max_length=sys.maxsize)[0][0].tolist()
            used = cfg.num_query_tokens + len(row) + (max_new_tokens if cfg.lm_type == "opt" else 0)
            if used > cfg.context:
                what = f"{cfg.num_query_tokens} query tokens + {len(row)} prompt tokens"
                fix = "shorten the prompt"
                if cfg.lm_type == "opt":  # OPT's learned positions also cover the generated tokens
                    what, fix = what + f" + max_new_tokens={max_new_tokens}", fix + " or lower max_new_tokens"
                raise InputError(
                    f"prompt {(p or '')[:40]!r} is too long: {what} = {used} positions, more than the language "
                    f"model's context of {cfg.context}; {fix}"
                )
            rows.append(row)
        return rows

    def _generate(
        self, images: ImageInput | Tensor, prompt: str | list[str] | None, gen: GenerationConfig, generator=None
    ) -> tuple[Generated, list[list[int]]]:
        """Decode continuations for each image and its prompt; returns them and the prompt ids."""
        self.require("generate", "generate text")
        gen.check()
        prompts = check_prompts(prompt)
        prefix = self.prefix_embeds(images)  # (N, Q, E)
        n = prefix.shape[0]
        prompts = prompts if isinstance(prompt, (list, tuple)) else prompts * n
        if len(prompts) != n:
            raise InputError(f"got {len(prompts)} prompts for {n} images (image i goes with prompt i)")
        rows = self._prompt_rows(prompts, gen.max_new_tokens)
        decode = self._decode_t5 if self.config.lm_type == "t5" else self._decode_opt
        return decode(prefix, rows, gen, generator), rows

    def _decode_opt(self, prefix: Tensor, rows: list[list[int]], gen: GenerationConfig, generator=None) -> Generated:
        """OPT continues `[queries, prompt]`; prompts are left-padded so every row continues at its end."""
        tc, n, Q = self.config.text_config, prefix.shape[0], prefix.shape[1]
        T = max(len(r) for r in rows)
        ids = torch.tensor([[tc.pad_token_id] * (T - len(r)) + r for r in rows], device=self.device)  # (N, T)
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=self.device)  # (N, T)
        skip = 0
        if self.config.image_token_index is not None:
            # The reference keeps Q image placeholders in front of the prompt ids (the queries replace their
            # embeddings); its repetition penalty sees them, so they go into the decoded sequence here too.
            skip = Q
            ids = torch.cat([ids.new_full((n, Q), self.config.image_token_index), ids], dim=1)  # (N, Q + T)
            mask_all = torch.cat([mask.new_ones(n, Q), mask], dim=1)
        else:
            mask_all = mask

        def make_step(r: int):
            inner = self.language_model.make_step(mask, prefix_embeds=prefix, rows=r)

            def step(new: Tensor, state):
                return inner(new[:, skip:] if state is None else new, state)

            return step

        return generate(make_step, ids, mask_all, gen, eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id,
                        generator=generator)

    def _decode_t5(self, prefix: Tensor, rows: list[list[int]], gen: GenerationConfig, generator=None) -> Generated:
        """T5 encodes `[queries, prompt]` (prompts right-padded) and decodes from its start token."""
        lm, tc, n, Q = self.language_model, self.config.text_config, prefix.shape[0], prefix.shape[1]
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [tc.pad_token_id] * (T - len(r)) for r in rows], device=self.device)  # (N, T)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=self.device)  # (N, T)
        embeds = torch.cat([prefix, lm.shared(ids).to(prefix.dtype)], dim=1)  # (N, Q + T, E)
        mask = torch.cat([mask.new_ones(n, Q), mask], dim=1)  # (N, Q + T)
        enc = lm.encode(embeds, mask)  # (N, Q + T, E)
        start = torch.full((n, 1), tc.decoder_start_token_id, device=self.device)
        return generate(
            lambda r: lm.make_step(enc, mask, rows=r),
            start,
            None,
            gen,
            eos_token_id=tc.eos_token_id,
            pad_token_id=tc.pad_token_id,
            generator=generator,
        )

    @torch.inference_mode()
    def caption(
        self,
        images: ImageInput | Tensor,
        prompt: str | list[str] | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 1,
        repetition_penalty: float = 1.0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 0.9,
        num_captions: int = 1,
        length_penalty: float = 1.0,
        return_scores: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> list[str] | list[list[str]] | list[tuple[str, float]]:
        """Captions for each image (OPT continues the prompt, so it starts the caption; T5 answers it).

        With `num_captions > 1` each image gets a list of that many: the best beams (needs `num_beams >=
        num_captions`) or, with `do_sample=True`, independent samples. With `return_scores=True` each caption comes
        as `(text, log_probability)`, the summed log-probability of its generated tokens. Sampling draws from
        `generator` (default: torch's), or from one generator per image: an image's captions then do not depend on
        the batch it is in.
        """
        gen = caption_config(num_beams, max_new_tokens, min_new_tokens, repetition_penalty, do_sample, temperature,
                             top_p, num_captions, length_penalty, return_scores)
        self.require("caption")
        out, rows = self._generate(images, prompt, gen, generator)
        k, continues = num_captions, self.config.lm_type == "opt"
        texts = [
            self.tokenizer.decode((rows[r // k] if continues else []) + toks).strip()
            for r, toks in enumerate(out.tokens)
        ]
        return with_scores(texts, out, k, len(rows), return_scores)

    @torch.inference_mode()
    def generate(
        self,
        images: ImageInput | Tensor,
        instruction: str | list[str],
        max_new_tokens: int = 30,
        num_beams: int = 1,
        min_new_tokens: int = 1,
        **options,
    ) -> list[str]:
        """The language model's reply to an instruction about each image (only the generated text).

        Other keyword options: do_sample, temperature, top_p, top_k, repetition_penalty, length_penalty.
        """
        self.require("generate")
        gen = generation_config("generate", options, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                num_beams=num_beams)
        out, _ = self._generate(images, instruction, gen)
        return [self.tokenizer.decode(t).strip() for t in out.tokens]

    @torch.inference_mode()
    def answer(
        self,
        images: ImageInput | Tensor,
        questions: TextInput,
        num_beams: int = 5,
        max_new_tokens: int = 10,
        min_new_tokens: int = 1,
        template: str = QUESTION_PROMPT,
        **options,
    ) -> list[str]:
        """Answer question i about image i, asked as `template` ("Question: {} Answer:")."""
        self.require("rank_answers" if "answers" in options else "vqa")  # BLIP-2 generates; BLIP VQA ranks
        qs = text_list(questions, "questions", "question")
        if not isinstance(template, str) or template.count("{}") != 1 or any(c in template.replace("{}", "")
                                                                              for c in "{}"):
            raise InputError(f"template {template!r} must be a string with one {{}} where the question goes")
        return self.generate(
            images,
            [template.format(q) for q in qs],
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            min_new_tokens=min_new_tokens,
            **options,
        )
