"""BLIP-2 training objectives: Q-Former stage 1 (ITC + ITM + ITG) and stage 2 (captioning through a frozen LM).

Stage 1 trains the query tokens and the Q-Former (with its text embeddings and heads) against a frozen image
encoder. ITC compares a text's `[CLS]` embedding with the best of the image's query embeddings; ITM classifies
queries and text read together bidirectionally (hard negatives drawn from the ITC similarity); ITG decodes the
text causally while it sees every query output and no query sees the text. ITG's LM head is not part of the Hub
retrieval checkpoint: it lives here, tied to the Q-Former word embeddings, and is saved to its own file.

Stage 2 starts from a stage-1 Q-Former, projects the query outputs into a frozen language model and trains the
Q-Former, the query tokens and the projection on captioning: OPT predicts the caption after `[queries, prompt]`;
Flan-T5 is a prefix LM that encodes `[queries, first part]` and decodes the rest.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blip2 import Blip2
from ..checkpoint import write_safetensors
from ..errors import CheckpointError, InputError
from ..processing import Tokenizer
from ..text import LMHead
from .data import Sample
from .losses import gather, gather_padded, itc_targets, lm_loss, sample_hard_negatives, soft_cross_entropy
from .model import init_weights

STAGE1_OBJECTIVES = ("itc", "itm", "itg")
ITG_HEAD_FILE = "itg_head.safetensors"


# --------------------------------------------------------------------------------------------------- pure pieces


def max_query_similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """(Ni, Q, D) image query embeddings and (Nt, D) text embeddings -> (Ni, Nt): the best query's cosine."""
    return torch.einsum("iqd,td->iqt", image_emb, text_emb).max(dim=1).values


def qformer_itc_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    temp: Tensor | float,
    positives: Tensor | None = None,
    label_smoothing: float = 0.0,
    all_image: Tensor | None = None,
    all_text: Tensor | None = None,
) -> Tensor:
    """Stage-1 ITC: mean of image->text and text->image cross-entropies over max-over-queries similarities.

    Args:
        image_emb: (B, Q, D) this process's L2-normalised query embeddings.
        text_emb: (B, D) this process's L2-normalised text embeddings; pair i is (image i, text i).
        temp: softmax temperature.
        positives: (B, N) bool, True where local row i matches column j of the gathered batch (default: diagonal).
        label_smoothing: share of each row's target mass spread uniformly.
        all_image: (N, Q, D) query embeddings of every process (default: `image_emb`).
        all_text: (N, D) text embeddings of every process (default: `text_emb`).
    """
    all_image = image_emb if all_image is None else all_image
    all_text = text_emb if all_text is None else all_text
    if positives is None:
        positives = torch.eye(image_emb.shape[0], all_text.shape[0], dtype=torch.bool, device=image_emb.device)
    sim_i2t = max_query_similarity(image_emb, all_text) / temp  # (B, N)
    sim_t2i = max_query_similarity(all_image, text_emb).t() / temp  # (B, N)
    targets = itc_targets(positives, label_smoothing)
    return (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets)) / 2


def itg_mask(text_mask: Tensor, num_queries: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive (B, 1, Q + T, Q + T) ITG mask: queries see only queries; text sees every query and earlier text."""
    B, T = text_mask.shape
    Q, L = num_queries, num_queries + text_mask.shape[1]
    allowed = torch.zeros(B, L, L, dtype=torch.bool, device=text_mask.device)
    allowed[:, :, :Q] = True  # everyone sees the queries
    causal = torch.ones(T, T, dtype=torch.bool, device=text_mask.device).tril()
    allowed[:, Q:, Q:] = causal[None] & text_mask[:, None, :].bool()  # (B, T, T)
    out = torch.zeros(B, 1, L, L, dtype=dtype, device=text_mask.device)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def itm_mask(text_mask: Tensor, num_queries: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive (B, 1, 1, Q + T) ITM mask: queries and text attend to each other, padding is hidden."""
    full = torch.cat([text_mask.new_ones(text_mask.shape[0], num_queries), text_mask], dim=1)  # (B, Q + T)
    return (1.0 - full[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def caption_labels(ids: Tensor, mask: Tensor, prompt_lengths: Tensor | int, num_queries: int) -> Tensor:
    """Labels (B, Q + T) for `[queries, prompt + caption]`: -100 at the queries, the prompt tokens and padding."""
    B, T = ids.shape
    lengths = torch.as_tensor(prompt_lengths, device=ids.device).expand(B)
    in_prompt = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]  # (B, T)
    labels = ids.masked_fill(in_prompt | (mask == 0), -100)
    return torch.cat([labels.new_full((B, num_queries), -100), labels], dim=1)


def split_prefix(text: str, rng: random.Random) -> tuple[str, str]:
    """Prefix-LM split of a caption at a random word boundary: (text input, text output), both non-empty.

    A one-word caption has no split: its text input is "" (the encoder then reads the queries and `</s>`).
    """
    words = text.split()
    if not words:
        raise InputError("empty caption: prefix-LM training needs at least one word")
    cut = rng.randrange(1, len(words)) if len(words) > 1 else 0
    return " ".join(words[:cut]), " ".join(words[cut:])


# --------------------------------------------------------------------------------------------------- stage 1


class _Frozen(nn.Module):
    """Objectives whose `frozen` modules get no gradients and stay in eval mode (no dropout) while training."""

    frozen: tuple[str, ...] = ()

    def freeze(self) -> None:
        """Stop gradients into the frozen parts of the model."""
        for name in self.frozen:
            getattr(self.model, name).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> _Frozen:
        """Switch to training mode, keeping the frozen parts in eval mode."""
        super().train(mode)
        for name in self.frozen:
            getattr(self.model, name).eval()
        return self


class QFormerObjectives(_Frozen):
    """Stage 1 on a retrieval `Blip2`: the ITC temperature and the ITG head; `forward(batch)` returns each loss.

    The batch is what `train.data.Collate` produces with the Q-Former tokenizer: `pixels`, `image_keys`, and
    `caption_rows`, `caption_ids`, `caption_mask`, `caption_keys` (pairs sharing an image or caption are positives).
    """

    def __init__(
        self,
        model: Blip2,
        objectives: tuple[str, ...] = STAGE1_OBJECTIVES,
        temp: float = 0.07,
        itc_label_smoothing: float = 0.1,
        itg_label_smoothing: float = 0.1,
    ):
        super().__init__()
        self.frozen = ("vision_model",)
        unknown = set(objectives) - set(STAGE1_OBJECTIVES)
        if unknown:
            raise InputError(f"unknown objectives {sorted(unknown)} (known: {', '.join(STAGE1_OBJECTIVES)})")
        model.require("itc", "train the Q-Former (stage 1)")
        model.require("itm", "train the Q-Former (stage 1)")
        self.model = model
        self.objectives = tuple(objectives)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.itc_label_smoothing, self.itg_label_smoothing = itc_label_smoothing, itg_label_smoothing
        self.freeze()
        self.itg_head = LMHead(model.config.qformer_config)
        init_weights(self.itg_head)
        self.itg_head.decoder.weight = model.embeddings.word_embeddings.weight  # tied, as in BERT

    # ------------------------------------------------------------------ passes
    def _stack(self, x: Tensor, mask: Tensor | None, query_length: int, image: Tensor | None = None) -> Tensor:
        """The Q-Former stack on (B, L, H) inputs with an additive (B, 1, Lq, L) mask (what `QFormer` runs)."""
        qf = self.model.qformer
        h = qf.dropout(qf.layernorm(x.to(qf.dtype)))
        out, _ = qf.encoder(h, mask, context=image, query_length=query_length)
        return out

    def query_outputs(self, feats: Tensor) -> Tensor:
        """Query outputs (B, Q, H) of image features: the queries read the image, no text."""
        queries = self.model.query_tokens.expand(feats.shape[0], -1, -1)
        return self._stack(queries, None, queries.shape[1], feats)

    def text_embeddings(self, ids: Tensor, mask: Tensor) -> Tensor:
        """L2-normalised ITC text embeddings (B, D): `[CLS]` of the text-only (unimodal) pass."""
        m = self.model
        h = self._stack(m.embeddings(ids), itm_mask(mask, 0, m.qformer.dtype), 0)
        return F.normalize(m.text_projection(h[:, 0]), dim=-1)

    def itm_logits(self, feats: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """ITM logits (B, 2) of image i with text i: one bidirectional pass, the head averaged over the queries."""
        m, Q = self.model, self.model.config.num_query_tokens
        x = torch.cat([m.query_tokens.expand(len(ids), -1, -1), m.embeddings(ids)], dim=1)  # (B, Q + T, H)
        h = self._stack(x, itm_mask(mask, Q, m.qformer.dtype), Q, feats)
        return m.itm_head(h[:, :Q]).mean(dim=1)

    def itg_logits(self, feats: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """ITG logits (B, T, V) over the text positions of `[queries, text]` under `itg_mask`."""
        m, Q = self.model, self.model.config.num_query_tokens
        x = torch.cat([m.query_tokens.expand(len(ids), -1, -1), m.embeddings(ids)], dim=1)  # (B, Q + T, H)
        h = self._stack(x, itg_mask(mask, Q, m.qformer.dtype), Q, feats)
        return self.itg_head(h[:, Q:])

    # ------------------------------------------------------------------ losses
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The enabled stage-1 losses of one batch ("itc", "itm", "itg"); the training total is their sum."""
        m = self.model
        with torch.no_grad():
            feats = m.vision_model(batch["pixels"])  # (Bi, 1 + P, W), frozen
            self.temp.clamp_(0.001, 0.5)
        rows, ids, mask = batch["caption_rows"], batch["caption_ids"], batch["caption_mask"]
        img = feats[rows]  # (B, 1 + P, W): the image of each caption
        keys, cap_keys = batch["image_keys"][rows], batch["caption_keys"]
        out: dict[str, Tensor] = {}
        if {"itc", "itm"} & set(self.objectives):
            itc = "itc" in self.objectives
            image_emb = F.normalize(m.vision_projection(self.query_outputs(img)), dim=-1)  # (B, Q, D)
            text_emb = self.text_embeddings(ids, mask)  # (B, D)
            # every process's pairs (N = B x processes); gradients flow back through the gather for ITC only
            all_image = gather(image_emb if itc else image_emb.detach())  # (N, Q, D)
            all_text = gather(text_emb if itc else text_emb.detach())  # (N, D)
            # pairs sharing an image or the very same caption are both true: never negatives
            positives = (keys[:, None] == gather(keys)[None]) | (cap_keys[:, None] == gather(cap_keys)[None])  # (B, N)
            if itc:
                out["itc"] = qformer_itc_loss(image_emb, text_emb, self.temp, positives, self.itc_label_smoothing,
                                              all_image, all_text)
            if "itm" in self.objectives:
                with torch.no_grad():
                    sim_i2t = max_query_similarity(image_emb, all_text) / self.temp  # (B, N)
                    sim_t2i = max_query_similarity(all_image, text_emb).t() / self.temp  # (B, N)
                out["itm"] = self._itm(img, ids, mask, sim_i2t, sim_t2i, positives)
        if "itg" in self.objectives:
            dec = ids.clone()
            bos = m.tokenizer.bos_token_id if m.tokenizer is not None else None
            if bos is not None:
                dec[:, 0] = bos  # `[DEC]` starts the generated text, as in the reference
            out["itg"] = lm_loss(self.itg_logits(img, dec, mask), dec, mask, self.itg_label_smoothing)
        return out

    def _itm(self, img: Tensor, ids: Tensor, mask: Tensor, sim_i2t: Tensor, sim_t2i: Tensor,
             positives: Tensor) -> Tensor:
        """ITM over this process's pairs, one hard negative text per image and one hard negative image per text.

        Negatives are drawn from every process's batch (`sim_*` and `positives` are (B, N) against the gathered
        pairs), so an image's negative text may come from another process; the image features and tokens are
        gathered without gradient (the image encoder is frozen; token ids have none).
        """
        pad = self.model.config.qformer_config.pad_token_id
        all_img = gather(img)  # (N, 1 + P, W)
        all_ids, all_mask = gather_padded(ids, pad), gather_padded(mask, 0)  # (N, T')
        T = all_ids.shape[1]
        ids, mask = F.pad(ids, (0, T - ids.shape[1]), value=pad), F.pad(mask, (0, T - mask.shape[1]))
        neg_text = sample_hard_negatives(sim_i2t, positives)  # (B,) a text for each image, -1 when none exists
        neg_image = sample_hard_negatives(sim_t2i, positives)  # (B,) an image for each text
        ti, tt = neg_text >= 0, neg_image >= 0
        g_img = torch.cat([img, img[ti], all_img[neg_image[tt]]])
        g_ids = torch.cat([ids, all_ids[neg_text[ti]], ids[tt]])
        g_mask = torch.cat([mask, all_mask[neg_text[ti]], mask[tt]])
        width = int(g_mask.sum(dim=1).max())  # drop the columns that are padding in every row
        g_ids, g_mask = g_ids[:, :width], g_mask[:, :width]
        labels = torch.zeros(len(g_ids), dtype=torch.long, device=ids.device)
        labels[: len(ids)] = 1
        return F.cross_entropy(self.itm_logits(g_img, g_ids, g_mask).float(), labels)

    # ------------------------------------------------------------------ files
    def save_itg_head(self, directory: str | Path) -> Path:
        """Write the ITG head (its own weights; the vocabulary projection is the word embedding) next to a model."""
        tensors = {k: v for k, v in self.itg_head.state_dict().items() if not k.startswith("decoder.")}
        return write_safetensors(tensors, Path(directory) / ITG_HEAD_FILE)

    def load_itg_head(self, directory: str | Path) -> None:
        """Read a head written by `save_itg_head` (strict: every tensor present, none unexpected)."""
        from safetensors.torch import load_file

        path = Path(directory) / ITG_HEAD_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: no ITG head; it is written by stage-1 training next to the model")
        tensors = load_file(str(path))
        want = {k for k in self.itg_head.state_dict() if k not in ("decoder.weight", "decoder.bias")}
        if set(tensors) != want:
            raise CheckpointError(f"{path}: expected tensors {sorted(want)}, found {sorted(tensors)}")
        with torch.no_grad():
            for k, v in tensors.items():
                self.itg_head.get_parameter(k).copy_(v)


# --------------------------------------------------------------------------------------------------- stage 2


def init_from_stage1(model: Blip2, stage1: Blip2 | str | Path | None) -> None:
    """Copy the query tokens and the Q-Former of a stage-1 (retrieval) model into a generation model, checked."""
    if stage1 is None:
        raise InputError(
            "stage 2 starts from a stage-1 Q-Former: pass stage1= a model or checkpoint directory written by "
            "stage-1 training (a Blip2ForImageTextRetrieval checkpoint)"
        )
    if not isinstance(stage1, Blip2):
        import blipkit

        name = str(stage1)
        stage1 = blipkit.load(stage1)
        if not isinstance(stage1, Blip2):
            raise CheckpointError(f"{name}: a {stage1.family} model, not a BLIP-2 stage-1 checkpoint")
    else:
        name = stage1.name_or_path or "stage1"
    if not stage1.has("embeddings"):
        raise CheckpointError(
            f"{name}: has no Q-Former text side; stage 2 starts from a stage-1 (Blip2ForImageTextRetrieval) checkpoint"
        )
    src = {"query_tokens": stage1.query_tokens, **{f"qformer.{k}": v for k, v in stage1.qformer.state_dict().items()}}
    dst = {"query_tokens": model.query_tokens, **{f"qformer.{k}": v for k, v in model.qformer.state_dict().items()}}
    for k, v in dst.items():  # the stage-1 text feed-forward has no place in the generation Q-Former: ignored
        if k not in src or src[k].shape != v.shape:
            found = "missing" if k not in src else f"shaped {tuple(src[k].shape)}"
            raise CheckpointError(
                f"{name}: '{k}' is {found}, the generation model needs {tuple(v.shape)}; train stage 1 with the same "
                "Q-Former architecture (hidden size, layers, queries)"
            )
    with torch.no_grad():
        for k, v in dst.items():
            v.copy_(src[k])


def check_language_model(model: Blip2) -> None:
    """Raise `InputError` unless the projection maps the Q-Former width onto the language model's input width."""
    model.require("generate", "train stage 2")
    proj, lm = model.language_projection, model.language_model.get_input_embeddings()
    q = model.config.qformer_config.hidden_size
    if proj.in_features != q or proj.out_features != lm.embedding_dim:
        raise InputError(
            f"language_projection maps {proj.in_features} -> {proj.out_features}, but the Q-Former is {q} wide and "
            f"the language model's embeddings are {lm.embedding_dim} wide; build the model with a language model "
            "whose hidden size the projection targets"
        )


class GenerativeObjectives(_Frozen):
    """Stage 2 on a generation `Blip2`; vision and language model frozen. `forward(batch)` returns {"lm": loss}.

    OPT batches: `pixels`, `caption_ids`, `caption_mask` (language-model tokens of prompt + caption), optional
    `caption_rows` and `prompt_length` (B,) (tokens not predicted; default 1, the bos). T5 batches: `pixels`,
    `input_ids`, `input_mask` (text input), `output_ids`, `output_mask` (text output); see `opt_batch`, `t5_batch`.
    """

    def __init__(self, model: Blip2, stage1: Blip2 | str | Path | None):
        super().__init__()
        self.frozen = ("vision_model", "language_model")
        check_language_model(model)
        init_from_stage1(model, stage1)
        self.model = model
        self.freeze()

    def prefix(self, pixels: Tensor) -> Tensor:
        """Projected query outputs (B, Q, E) for pixels (B, 3, H, W); only the image encoder runs without grad."""
        m = self.model
        with torch.no_grad():
            feats = m.vision_model(pixels)
        return m.prefix_embeds(feats)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The captioning loss of one batch."""
        m = self.model
        prefix = self.prefix(batch["pixels"])  # (Bi, Q, E)
        lm, Q = m.language_model, prefix.shape[1]
        if m.config.lm_type == "t5":
            ids, mask = batch["input_ids"], batch["input_mask"]
            embeds = torch.cat([prefix, lm.get_input_embeddings()(ids).to(prefix.dtype)], dim=1)  # (B, Q + T, E)
            enc_mask = torch.cat([mask.new_ones(len(ids), Q), mask], dim=1)
            labels = batch["output_ids"].masked_fill(batch["output_mask"] == 0, -100)
            _, loss = lm(inputs_embeds=embeds, attention_mask=enc_mask, labels=labels,
                         decoder_attention_mask=batch["output_mask"])
            return {"lm": loss}
        ids, mask = batch["caption_ids"], batch["caption_mask"]
        if "caption_rows" in batch:
            prefix = prefix[batch["caption_rows"]]
        embeds = torch.cat([prefix, lm.get_input_embeddings()(ids).to(prefix.dtype)], dim=1)  # (B, Q + T, E)
        full_mask = torch.cat([mask.new_ones(len(ids), Q), mask], dim=1)
        labels = caption_labels(ids, mask, batch.get("prompt_length", 1), Q)
        _, loss = lm(inputs_embeds=embeds, attention_mask=full_mask, labels=labels)
        return {"lm": loss}


Tokenize = Callable[..., tuple[Tensor, Tensor]]  # (texts, max_length=) -> (ids, mask): a Tokenizer or `model.tokens`


def opt_tensors(tokenize: Tokenize, captions: list[str], prompt: str = "", end: str = "\n", max_length: int = 64,
                sep: str = "") -> dict[str, Tensor]:
    """`prompt + sep + caption + end` tokenised for OPT, with each row's prompt length (bos included)."""
    ids, mask = tokenize([prompt + sep + c + end for c in captions], max_length=max_length)
    plen = int(tokenize(prompt, max_length=max_length)[1].sum()) if prompt else 1
    return {"caption_ids": ids, "caption_mask": mask,
            "prompt_length": torch.full((len(captions),), plen, device=ids.device)}


def t5_tensors(tokenize: Tokenize, captions: list[str], rng: random.Random, pad_id: int, eos_id: int,
               max_length: int = 64) -> dict[str, Tensor]:
    """Each caption split at a random word into T5 text input and text output, tokenised."""
    inputs, outputs = zip(*(split_prefix(c, rng) for c in captions), strict=True)
    in_ids, in_mask = tokenize([t or "x" for t in inputs], max_length=max_length)
    empty = torch.tensor([not t for t in inputs], device=in_ids.device)
    if empty.any():  # no text input: the row holds only `</s>`
        in_ids[empty] = pad_id
        in_mask[empty] = 0
        in_ids[empty, 0], in_mask[empty, 0] = eos_id, 1
    out_ids, out_mask = tokenize(list(outputs), max_length=max_length)
    return {"input_ids": in_ids, "input_mask": in_mask, "output_ids": out_ids, "output_mask": out_mask}


def _check_pairs(captions: list[str], pixels: Tensor) -> None:
    if len(captions) != len(pixels):
        raise InputError(f"got {len(captions)} captions for {len(pixels)} images (image i goes with caption i)")


def opt_batch(model: Blip2, pixels: Tensor, captions: list[str], prompt: str = "", end: str = "\n",
              max_length: int = 64) -> dict[str, Tensor]:
    """An OPT stage-2 batch: `prompt + caption + end` tokenised, with each row's prompt length (bos included)."""
    _check_pairs(captions, pixels)
    return {"pixels": pixels, **opt_tensors(model.tokens, captions, prompt, end, max_length)}


def t5_batch(model: Blip2, pixels: Tensor, captions: list[str], rng: random.Random,
             max_length: int = 64) -> dict[str, Tensor]:
    """A Flan-T5 stage-2 batch: each caption split at a random word into text input and text output."""
    _check_pairs(captions, pixels)
    cfg = model.config
    return {"pixels": pixels, **t5_tensors(model.tokens, captions, rng, cfg.text_config.pad_token_id,
                                           cfg.prompt_bos_token_id, max_length)}


class CaptionCollate:
    """Samples -> a captioning batch in a language model's tokens (with `pixels` when the samples have images).

    OPT (and the language model trained alone) reads `bos [prompt ]caption eos` and predicts what follows the
    prompt; T5 gets each caption split at a random word (drawn from the samples' seeds, so batches repeat exactly).
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, lm_type: str = "opt", prompt: str = "",
                 pad_id: int = 0, eos_id: int = 1):
        if tokenizer.special.get("eos") is None:
            raise InputError("the language model's tokenizer has no eos token; captions need an end marker")
        self.tokenizer, self.max_length, self.lm_type, self.prompt = tokenizer, max_length, lm_type, prompt.strip()
        self.pad_id, self.eos_id = pad_id, eos_id

    def __call__(self, samples: list[Sample]) -> dict[str, Tensor]:
        samples = [s for s in samples if s.caption]
        if not samples:
            raise InputError("a batch without captions: language-model training learns from captions")
        captions = [s.caption for s in samples]
        batch = {} if samples[0].pixels is None else {"pixels": torch.stack([s.pixels for s in samples])}
        if self.lm_type == "t5":
            rng = random.Random(" ".join(str(s.seed) for s in samples))
            return {**batch, **t5_tensors(self.tokenizer, captions, rng, self.pad_id, self.eos_id, self.max_length)}
        end, sep = self.tokenizer.special["eos"], " " if self.prompt else ""
        return {**batch, **opt_tensors(self.tokenizer, captions, self.prompt, end, self.max_length, sep)}


# --------------------------------------------------------------------------------------------------- steps


def train_steps(objectives: nn.Module, batches, steps: int, lr: float = 1e-4, weight_decay: float = 0.05,
                clip: float = 1.0) -> list[dict[str, float]]:
    """Run `steps` AdamW steps of `objectives` on `batches` (an iterable of batch dicts); returns each step's losses."""
    from .loop import make_optimizer

    objectives.train()
    opt = make_optimizer(objectives, lr, weight_decay)
    history, it = [], iter(batches)
    for _ in range(steps):
        losses = objectives(next(it))
        total: Tensor = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        if clip > 0:
            nn.utils.clip_grad_norm_([p for p in objectives.parameters() if p.requires_grad], clip)
        opt.step()
        history.append({**{k: v.item() for k, v in losses.items()}, "loss": total.item()})
    return history
