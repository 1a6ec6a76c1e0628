"""Models that run their towers on onnxruntime (an exported directory) or as torch towers, with the torch models'
own code for everything around the towers: input checks, prompts, decoding (`generate.generate`), detokenizing.

`OnnxBlip` / `OnnxBlip2` subclass `Blip` / `Blip2` and replace only the methods that touch weights; each tower call
goes through a `Runner`, which is either onnxruntime sessions (`Runner.onnx(directory)`) or the torch towers of a
loaded model (`Runner.torch(model)`: the same graphs in torch, for parity checks and torch.compile).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..blip import Blip
from ..blip2 import Blip2
from ..errors import CapabilityError, CheckpointError, InputError
from ..generate import generate
from .onnx import FORMAT, MANIFEST


class Runner:
    """Calls a tower by name with tensors and returns its outputs as a tuple of CPU tensors."""

    def __init__(self, calls: dict[str, Callable[..., tuple[Tensor, ...]]], where: str) -> None:
        self.calls, self.where = calls, where

    def has(self, name: str) -> bool:
        """Whether the tower `name` is present."""
        return name in self.calls

    def __call__(self, name: str, *inputs: Tensor) -> tuple[Tensor, ...]:
        if name not in self.calls:
            raise CapabilityError(f"{self.where} has no {name} tower: export the model again with that part "
                                  f"(blipkit export MODEL --format onnx --parts {name})")
        return self.calls[name](*inputs)

    @classmethod
    def torch(cls, model: nn.Module, parts: list[str] | None = None) -> Runner:
        """The torch towers of a loaded model."""
        from .towers import towers

        def call(module: nn.Module) -> Callable[..., tuple[Tensor, ...]]:
            def run(*inputs: Tensor) -> tuple[Tensor, ...]:
                with torch.inference_mode():
                    out = module(*inputs)
                return out if isinstance(out, tuple) else (out,)

            return run

        return cls({n: call(t.module) for n, t in towers(model, parts).items()}, f"{model.name_or_path} (torch)")

    @classmethod
    def onnx(cls, directory: Path, manifest: dict) -> Runner:
        """onnxruntime sessions for every tower listed in the manifest (CPU execution provider)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError(f"{directory} is an ONNX export: running it needs onnxruntime "
                             "(pip install 'blipkit[onnx]')") from None

        def call(session, names: list[str]) -> Callable[..., tuple[Tensor, ...]]:
            def run(*inputs: Tensor) -> tuple[Tensor, ...]:
                feeds = {n: np.ascontiguousarray(x.detach().cpu().numpy()) for n, x in zip(names, inputs, strict=True)}
                return tuple(torch.from_numpy(o) for o in session.run(None, feeds))

            return run

        calls = {}
        for name, entry in manifest["towers"].items():
            options = ort.SessionOptions()
            options.log_severity_level = 3  # warnings about unused initializers are noise here
            # no busy-waiting between calls: decoding runs Python (and torch) between steps on the same cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch uses
            session = ort.InferenceSession(str(directory / entry["file"]), options, providers=["CPUExecutionProvider"])
            calls[name] = call(session, entry["inputs"])
        return cls(calls, str(directory))


def read_manifest(directory: Path) -> dict:
    """The checked `onnx.json` of an exported directory; every listed file must exist."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the ONNX manifest ({e}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("towers"),
                                                                                              dict):
        raise CheckpointError(f"{path} is not a blipkit ONNX manifest (format {FORMAT!r}); export the model again")
    for name, entry in manifest["towers"].items():
        if name == "text_decoder" and "cross_kv" in entry.get("inputs", []):
            raise CheckpointError(f"{directory} was exported by an earlier blipkit (one stacked cross_kv input to the "
                                  "text_decoder tower, now one per layer); export the model again")
        file = directory / str(entry.get("file", ""))
        if not file.is_file():
            raise CheckpointError(f"{directory}: the {name} tower's file {file.name} is missing; export the model "
                                  "again (blipkit export MODEL --format onnx --out DIR)")
    return manifest


class _OnnxMixin:
    """What both families share: CPU float32 inputs, the vision tower as `vision_model`, no parameters."""

    runner: Runner

    def _setup(self, runner: Runner) -> None:
        self.runner = runner
        self.vision_model = lambda pixels: runner("vision_encoder", pixels)[0]

    @property
    def device(self) -> torch.device:
        """Inputs are prepared on the CPU (onnxruntime takes numpy arrays)."""
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Inputs are float32."""
        return torch.float32

    def _kv_empty(self, rows: int, layers: int, heads: int, head_dim: int) -> Tensor:
        return torch.zeros(rows, layers, 2, heads, 0, head_dim)


class OnnxBlip(_OnnxMixin, Blip):
    """A BLIP model whose towers run on a `Runner`; every public method of `Blip` works as on the torch model."""

    def __init__(self, config, runner: Runner) -> None:
        nn.Module.__init__(self)
        self.config, self.tokenizer, self.processor, self.name_or_path = config, None, None, runner.where
        self.enc_token, self.itm_chunk = False, 256
        self._setup(runner)

    @torch.inference_mode()
    def encode_images(self, images) -> Tensor:
        self.require("itc")
        from ..base import ImageFeatures

        if isinstance(images, Tensor) and (isinstance(images, ImageFeatures) or self._is_feature_shape(images)):
            if not self.runner.has("vision_projection"):  # exports written before the tower existed
                raise InputError(f"{self.runner.where} has no vision_projection tower, so encode_images takes images "
                                 "here, not image features: export the model again")
            return self.runner("vision_projection", self._feats(images))[0]
        return self.runner("vision_encoder", self.pixels(images))[1]

    @torch.inference_mode()
    def encode_texts(self, texts) -> Tensor:
        self.require("itc")
        ids, mask = self._text_ids(texts, grounded=False)
        return self.runner("text_encoder", ids, mask)[0]

    def forward_itm(self, images, texts, first_only: bool = False) -> Tensor:
        """`Blip.forward_itm` on the exported grounded text tower, which computes every position (the VQA question
        encoding reads them all): `first_only` changes nothing here."""
        self.require("itm")
        feats = self._feats(images)
        ids, mask = self._text_ids(texts, grounded=True)
        rows = []
        for i in range(feats.shape[0]):
            out = []
            for s in range(0, ids.shape[0], self.itm_chunk):
                chunk_ids, chunk_mask = ids[s : s + self.itm_chunk], mask[s : s + self.itm_chunk]
                f = feats[i : i + 1].expand(chunk_ids.shape[0], -1, -1)
                out.append(self.runner("image_text_encoder", chunk_ids, chunk_mask, f)[1])
            rows.append(torch.cat(out))
        return torch.stack(rows)

    def _itm_pairs(self, feats: Tensor, image: Tensor, texts: list[str]) -> Tensor:
        """`Blip._itm_pairs` on the runner: each row of a chunk gets its own image's features."""
        ids, mask = self._text_ids(texts, grounded=True)
        step = self.itm_chunk
        return torch.cat([self.runner("image_text_encoder", ids[s : s + step], mask[s : s + step],
                                      feats.index_select(0, image[s : s + step]))[1] for s in range(0, len(ids), step)])

    def _question_states(self, images, questions) -> tuple[Tensor, Tensor]:
        from ..base import text_list

        self.require("vqa")
        qs = text_list(questions, "questions", "question")
        feats = self._feats(images)
        if len(qs) != feats.shape[0]:
            raise InputError(f"got {len(qs)} questions for {feats.shape[0]} images (image i goes with question i)")
        ids, mask = self._text_ids(qs, grounded=True)
        return self.runner("image_text_encoder", ids, mask, feats)[0], mask

    def _decoder_kv(self, rows: int) -> Tensor:
        tc = self.config.text_config
        return self._kv_empty(rows, tc.num_hidden_layers, tc.num_attention_heads,
                              tc.hidden_size // tc.num_attention_heads)

    def _decode(self, context: Tensor, context_mask: Tensor | None, prompt: Tensor, prompt_mask: Tensor, gen,
                generator=None):
        """`Blip._decode` with the decoder step on the runner: the same `generate` drives it."""
        run = self.runner

        def make_step(rows: int):
            ctx = context.repeat_interleave(rows, 0)
            cmask = (context_mask.repeat_interleave(rows, 0) if context_mask is not None
                     else torch.ones(ctx.shape[:2], dtype=torch.long))
            cross = run("text_decoder_cross", ctx)  # 2 L tensors: each layer's keys and values

            def step(ids: Tensor, state):
                if state is None:
                    mask = prompt_mask.repeat_interleave(rows, 0)
                    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
                    past, cm, cr = self._decoder_kv(ids.shape[0]), cmask, cross
                else:
                    past, mask, cm, cr = state
                    mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
                    pos = mask.sum(-1, keepdim=True) - 1
                logits, present = run("text_decoder", ids, pos, mask, cm, past, *cr)
                return logits[:, -1], (present, mask, cm, cr)

            return step

        tc = self.config.text_config
        return generate(make_step, prompt, prompt_mask, gen, eos_token_id=tc.sep_token_id, pad_token_id=tc.pad_token_id,
                        generator=generator)

    @torch.inference_mode()
    def answer_logprobs(self, states: Tensor, qmask: Tensor, answers) -> Tensor:
        from ..base import text_list

        ids, amask = self.tokens(text_list(answers, "answers", "answer"))
        ids = ids.clone()
        ids[:, 0] = self.config.text_config.bos_token_id
        targets = ids[:, 1:].masked_fill(amask[:, 1:] == 0, -100)
        n, T = ids.shape
        pos = torch.arange(T).expand(n, T)
        out = []
        for q in range(states.shape[0]):
            cross = self.runner("text_decoder_cross", states[q : q + 1].expand(n, -1, -1))
            cm = qmask[q : q + 1].expand(n, -1)
            logits, _ = self.runner("text_decoder", ids, pos, amask, cm, self._decoder_kv(n), *cross)
            lp = logits[:, :-1].float().log_softmax(-1)
            tok = lp.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
            out.append((tok * (targets != -100)).sum(-1))
        return torch.stack(out)

    def _topk_rank(self, states: Tensor, qmask: Tensor, answers: list[str], k: int) -> Tensor:
        """First-token pre-selection of `k` candidates per question, then full scoring (-inf elsewhere)."""
        ids, _ = self.tokens(answers)
        n = states.shape[0]
        bos = torch.full((n, 1), self.config.text_config.bos_token_id)
        cross = self.runner("text_decoder_cross", states)
        logits, _ = self.runner("text_decoder", bos, torch.zeros_like(bos), torch.ones_like(bos), qmask,
                                self._decoder_kv(n), *cross)
        first = logits[:, 0].float().log_softmax(-1)[:, ids[:, 1]]  # (Nq, Na)
        top = first.topk(k, dim=-1).indices
        scores = torch.full(first.shape, float("-inf"))
        for q in range(n):
            sub = [answers[int(j)] for j in top[q]]
            scores[q, top[q]] = self.answer_logprobs(states[q : q + 1], qmask[q : q + 1], sub)[0]
        return scores


class OnnxBlip2(_OnnxMixin, Blip2):
    """A BLIP-2 model whose towers run on a `Runner`: vision encoder, Q-Former and the OPT language model step."""

    def __init__(self, config, runner: Runner) -> None:
        nn.Module.__init__(self)
        self.config, self.tokenizer, self.processor, self.name_or_path = config, None, None, runner.where
        self.itm_chunk = 128
        self._setup(runner)

    def prefix_embeds(self, images) -> Tensor:
        self.require("generate")
        return self.runner("qformer", self._feats(images))[0]

    @torch.inference_mode()
    def encode_images(self, images) -> Tensor:
        self.require("itc")
        return self.runner("qformer", self._feats(images))[0]

    def encode_texts(self, texts) -> Tensor:
        raise CapabilityError(f"{self.name_or_path}: the ONNX back end has no BLIP-2 text tower (image-text matching "
                              "and text embeddings of BLIP-2 run on the torch model)")

    def forward_itm(self, images, texts) -> Tensor:
        return self.encode_texts(texts)

    def forward_itm_pairs(self, images, texts) -> tuple[Tensor, list[int]]:
        return self.encode_texts(texts)

    def _decode_opt(self, prefix: Tensor, rows: list[list[int]], gen, generator=None):
        """`Blip2._decode_opt` with the language model step on the runner."""
        tc, n, Q = self.config.text_config, prefix.shape[0], prefix.shape[1]
        T = max(len(r) for r in rows)
        ids = torch.tensor([[tc.pad_token_id] * (T - len(r)) + r for r in rows])  # (N, T)
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])  # (N, T)
        skip = 0
        if self.config.image_token_index is not None:
            skip = Q  # the image placeholders stay in the decoded sequence, as in `Blip2._decode_opt`
            ids = torch.cat([ids.new_full((n, Q), self.config.image_token_index), ids], dim=1)
            mask_all = torch.cat([mask.new_ones(n, Q), mask], dim=1)
        else:
            mask_all = mask
        nh = tc.num_attention_heads
        run = self.runner

        def make_step(r: int):
            prefix_r, prompt_mask = prefix.repeat_interleave(r, 0), mask.repeat_interleave(r, 0)

            def step(new: Tensor, state):
                if state is None:
                    new = new[:, skip:]
                    m = torch.cat([prompt_mask.new_ones(prefix_r.shape[:2]), prompt_mask], dim=1)
                    past, pre = self._kv_empty(new.shape[0], tc.num_hidden_layers, nh, tc.hidden_size // nh), prefix_r
                else:
                    past, m = state
                    m = torch.cat([m, m.new_ones(new.shape)], dim=1)
                    pre = prefix_r.new_zeros(new.shape[0], 0, prefix_r.shape[2])
                logits, present = run("language_model", pre, new, m, past)
                return logits, (present, m)

            return step

        return generate(make_step, ids, mask_all, gen, eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id,
                        generator=generator)

    def _decode_t5(self, prefix, rows, gen, generator=None):
        raise CapabilityError(f"{self.name_or_path}: the ONNX back end runs OPT language models, not T5")


def load_onnx(directory: Path, runner: Runner | None = None):
    """The model of an exported directory (see `export_onnx`), its towers on onnxruntime."""
    from .. import _family, processing
    from ..checkpoint import read_config

    manifest = read_manifest(directory)
    raw = read_config(directory)
    _, config_cls = _family(raw, str(directory / "config.json"))
    config = config_cls.from_hf(raw, source=str(directory / "config.json"))
    runner = runner or Runner.onnx(directory, manifest)
    model = (OnnxBlip if manifest.get("family") == "BLIP" else OnnxBlip2)(config, runner)
    model.tokenizer = processing.Tokenizer.from_dir(directory)
    pre = directory / "preprocessor_config.json"
    model.processor = (processing.ImageProcessor.from_hf(json.loads(pre.read_text())) if pre.is_file()
                       else model.default_processor())
    model.name_or_path = str(directory)
    return model


def torch_tower_model(model: nn.Module, parts: list[str] | None = None):
    """A model running `model`'s torch towers through the same code as the onnxruntime back end (parity checks)."""
    runner = Runner.torch(model, parts)
    cls = OnnxBlip if model.family == "BLIP" else OnnxBlip2
    out = cls(model.config, runner)
    out.tokenizer, out.processor, out.name_or_path = model.tokenizer, model.processor, model.name_or_path
    return out
