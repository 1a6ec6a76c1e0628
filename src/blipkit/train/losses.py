"""BLIP's training objectives: ITC, ITM with hard negatives, captioning LM, and VQA answer generation.

The loss functions are small and pure (tensors in, scalar out) so each can be checked by hand; `Objectives` wraps a
`Blip` model, owns the learnable ITC temperature (not part of the Hub checkpoint), and computes the enabled losses
of one batch from a single pass of the image encoder.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..blip import Blip

OBJECTIVES = ("itc", "itm", "lm", "vqa")


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits)); each row of `targets` sums to one."""
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def itc_targets(positives: Tensor, label_smoothing: float) -> Tensor:
    """Row-normalised positives, smoothed towards uniform: (1 - ls) * pos / #pos + ls / N."""
    pos = positives.float()
    return (1 - label_smoothing) * pos / pos.sum(dim=1, keepdim=True) + label_smoothing / pos.shape[1]


def itc_loss(image_emb: Tensor, text_emb: Tensor, temp: Tensor | float, positives: Tensor | None = None,
             label_smoothing: float = 0.0) -> Tensor:
    """Image-text contrastive loss: the mean of the image->text and text->image cross-entropies.

    Args:
        image_emb: (Ni, D) L2-normalised image embeddings.
        text_emb: (Nt, D) L2-normalised text embeddings; with `positives` None, Ni == Nt and pair i is positive.
        temp: softmax temperature (logits are cosine similarities divided by it).
        positives: (Ni, Nt) bool, True where image i and text j match (several per row allowed).
        label_smoothing: share of each row's target mass spread uniformly.
    """
    if positives is None:
        positives = torch.eye(image_emb.shape[0], dtype=torch.bool, device=image_emb.device)
    sim = image_emb @ text_emb.t() / temp  # (Ni, Nt)
    i2t = soft_cross_entropy(sim, itc_targets(positives, label_smoothing))
    t2i = soft_cross_entropy(sim.t(), itc_targets(positives.t(), label_smoothing))
    return (i2t + t2i) / 2


def sample_hard_negatives(sim: Tensor, positives: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """For each row, one column drawn with probability softmax(sim) among the non-positive columns.

    Rows whose every column is positive get -1 (no negative exists). (N, M) -> (N,) column indices.
    """
    weights = sim.detach().float().softmax(dim=1).masked_fill(positives, 0.0)
    has = weights.sum(dim=1) > 0
    weights[~has] = 1.0  # any valid distribution; the result is replaced by -1 below
    picks = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.where(has, picks, torch.full_like(picks, -1))


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary match classification: cross-entropy of (N, 2) ITM logits against labels (1 = match)."""
    return F.cross_entropy(logits.float(), labels)


def lm_loss(logits: Tensor, input_ids: Tensor, mask: Tensor, label_smoothing: float = 0.0,
            prompt_length: int = 1) -> Tensor:
    """Next-token cross-entropy of decoder logits (B, T, V) over the tokens after the prompt (pads ignored)."""
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    if prompt_length > 1:
        targets[:, : prompt_length - 1] = -100
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every process's gradient and keeps this process's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather(x: Tensor) -> Tensor:
    """Concatenate `x` from every process (gradients flow back to each); `x` itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)
    return _AllGather.apply(x)


def gather_padded(x: Tensor, value: int = 0) -> Tensor:
    """Concatenate (B, T) rows from every process without gradient, right-padding each to the longest T with
    `value` (token ids and masks differ in length between processes); `x` itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    width = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    return gather(F.pad(x.detach(), (0, int(width.item()) - x.shape[1]), value=value))


class Objectives(nn.Module):
    """A `Blip` model plus the learnable ITC temperature; `forward(batch)` returns each enabled loss."""

    def __init__(self, model: Blip, objectives: tuple[str, ...] = OBJECTIVES, temp: float = 0.07,
                 itc_label_smoothing: float = 0.1, lm_label_smoothing: float = 0.1):
        super().__init__()
        unknown = set(objectives) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)} (known: {', '.join(OBJECTIVES)})")
        needs = {"itc": "itc", "itm": "itm", "lm": "caption", "vqa": "vqa"}  # objective -> capability it trains
        for name in objectives:
            model.require(needs[name], f"train {name.upper()}")
        self.model = model
        self.objectives = tuple(objectives)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.itc_label_smoothing, self.lm_label_smoothing = itc_label_smoothing, lm_label_smoothing

    # ------------------------------------------------------------------ pieces
    def _grounded(self, ids: Tensor) -> Tensor:
        """Token 0 of image-grounded inputs: `[ENC]` when the model uses it, else unchanged (`[CLS]`)."""
        if not self.model.enc_token:
            return ids
        ids = ids.clone()
        ids[:, 0] = self.model.tokenizer.enc_token_id
        return ids

    def itc_itm(self, feats: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """ITC over the batch (gathered across processes) and ITM with negatives mined from its similarities."""
        m = self.model
        rows, ids, mask = batch["caption_rows"], batch["caption_ids"], batch["caption_mask"]
        img = feats[rows]  # (B, 1 + P, H)
        same = batch["image_keys"][rows]
        # pairs with the same image or the very same caption are both true: never negatives
        positives = (same[:, None] == same[None, :]) | (batch["caption_keys"][:, None] == batch["caption_keys"][None])
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        if "itc" in self.objectives:
            image_emb = F.normalize(m.vision_proj(img[:, 0]), dim=-1)
            text_h, _ = m.text_encoder(ids, mask)
            text_emb = F.normalize(m.text_proj(text_h[:, 0]), dim=-1)
            all_text, all_image = gather(text_emb), gather(image_emb)
            all_img_keys, all_cap_keys = gather(same), gather(batch["caption_keys"])
            pos_i2t = (same[:, None] == all_img_keys[None]) | (batch["caption_keys"][:, None] == all_cap_keys[None])
            sim_i2t = image_emb @ all_text.t() / self.temp  # (B, B_all)
            sim_t2i = text_emb @ all_image.t() / self.temp
            loss_i2t = soft_cross_entropy(sim_i2t, itc_targets(pos_i2t, self.itc_label_smoothing))
            loss_t2i = soft_cross_entropy(sim_t2i, itc_targets(pos_i2t, self.itc_label_smoothing))
            out["itc"] = (loss_i2t + loss_t2i) / 2
            local = image_emb @ text_emb.t() / self.temp
        else:
            local = torch.zeros(len(rows), len(rows), device=feats.device)
        if "itm" in self.objectives:
            false = None
            if "false_rows" in batch:  # texts known false of their images (the collate's): negatives too
                false = (feats[batch["false_rows"]], batch["false_ids"], batch["false_mask"])
            out["itm"] = self._itm(img, ids, mask, local, positives, false)
        return out

    def _itm(self, img: Tensor, ids: Tensor, mask: Tensor, sim: Tensor, positives: Tensor,
             false: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        m = self.model
        neg_text = sample_hard_negatives(sim, positives)  # a hard negative text for each image
        neg_image = sample_hard_negatives(sim.t(), positives.t())  # a hard negative image for each text
        ti, tt = neg_text >= 0, neg_image >= 0
        all_ids, all_mask = [ids, ids[neg_text[ti]], ids[tt]], [mask, mask[neg_text[ti]], mask[tt]]
        g_img = [img, img[ti], img[neg_image[tt]]]
        if false is not None:
            f_img, f_ids, f_mask = false
            width = max(ids.shape[1], f_ids.shape[1])
            all_ids = [F.pad(t, (0, width - t.shape[1])) for t in (*all_ids, f_ids)]
            all_mask = [F.pad(t, (0, width - t.shape[1])) for t in (*all_mask, f_mask)]
            g_img.append(f_img)
        g_ids, g_mask = self._grounded(torch.cat(all_ids)), torch.cat(all_mask)
        h, _ = m.text_encoder(g_ids, g_mask, context=torch.cat(g_img))
        labels = torch.cat([torch.ones(len(ids)), torch.zeros(len(g_ids) - len(ids))]).long()
        return itm_loss(m.itm_head(h[:, 0]), labels.to(h.device))

    def lm(self, feats: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Captioning: the decoder predicts each caption token from the image patches and the tokens before it."""
        key = "lm" if "lm_ids" in batch else "caption"  # a separate captioning target when the data has one
        ids, mask = batch[f"{key}_ids"].clone(), batch[f"{key}_mask"]
        ids[:, 0] = self.model.config.text_config.bos_token_id
        logits, _ = self.model.text_decoder(ids, attention_mask=mask, context=feats[batch[f"{key}_rows"]])
        return lm_loss(logits, ids, mask, self.lm_label_smoothing)

    def vqa(self, feats: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """VQA: the image-grounded question encoder, then the decoder generates the answer from its states."""
        m = self.model
        q_ids, q_mask = self._grounded(batch["question_ids"]), batch["question_mask"]
        states, _ = m.text_encoder(q_ids, q_mask, context=feats[batch["qa_rows"]])
        a_ids, a_mask = batch["answer_ids"].clone(), batch["answer_mask"]
        a_ids[:, 0] = m.config.text_config.bos_token_id
        logits, _ = m.text_decoder(a_ids, attention_mask=a_mask, context=states, context_mask=q_mask)
        return lm_loss(logits, a_ids, a_mask, self.lm_label_smoothing)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The enabled losses of one batch (objectives whose inputs the batch lacks are left out)."""
        return self.from_features(self.model.vision_model(batch["pixels"]), batch)

    def from_features(self, feats: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`forward` over image features already computed: (B, 1 + P, H)."""
        out: dict[str, Tensor] = {}
        if "caption_ids" in batch:
            if {"itc", "itm"} & set(self.objectives):
                out.update(self.itc_itm(feats, batch))
            if "lm" in self.objectives:
                out["lm"] = self.lm(feats, batch)
        if "vqa" in self.objectives and "question_ids" in batch:
            out["vqa"] = self.vqa(feats, batch)
        return out
