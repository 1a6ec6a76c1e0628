"""The options each endpoint takes besides its images: one pydantic model per endpoint, checked at the edge.

Unknown fields, wrong types and values out of range are 422s naming the field. Numbers bound the work one request
may ask for (beams, tokens, captions); texts are counted and measured against `Limits` by `inputs.check_texts`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    """Base of the endpoints' options: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class TextsOptions(Options):
    """/api/match and /api/similarity: the texts every image is scored against."""

    texts: list[str] = Field(description="texts to score each image against (repeat the form field for several)")


class CaptionOptions(Options):
    """/api/caption: the options of `model.caption`; left out, the model's defaults."""

    prompt: str | None = Field(None, description="text each caption starts with")
    num_beams: int | None = Field(None, ge=1, le=8)
    max_new_tokens: int | None = Field(None, ge=1, le=128)
    min_new_tokens: int | None = Field(None, ge=0, le=128)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    num_captions: int | None = Field(None, ge=1, le=8)
    length_penalty: float | None = Field(None, ge=-10, le=10)
    return_scores: bool = False
    seed: int = Field(0, ge=0, lt=2**63, description="random seed when do_sample is true")

    def model_options(self) -> dict[str, Any]:
        """The given options as `model.caption` keywords (the seed is kept for the sampling job)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class AskOptions(Options):
    """/api/ask: one question asked of every image; with `answers`, the best of them (rank mode)."""

    question: str
    answers: list[str] | None = Field(None, description="candidate answers to rank instead of generating")
    num_beams: int | None = Field(None, ge=1, le=8)


class ClassifyOptions(Options):
    """/api/classify: zero-shot classification over `labels`."""

    labels: list[str]
    templates: list[str] | None = Field(None, description="prompts with {} for the label (default 'a picture of {}')")
    head: Literal["itc", "itm"] = "itc"
    k: int = Field(5, ge=1, le=100, description="labels returned per image")


class GroundOptions(Options):
    """/api/ground: a box per phrase in one image, from GradCAM over the ITM encoder."""

    phrases: list[str]
    layer: int | None = Field(None, ge=-64, le=64, description="cross-attention layer (default: the model's)")
    threshold: float = Field(0.5, gt=0, lt=1, description="fraction of the map's maximum inside the box")
    source: Literal["phrase", "itm"] | None = Field(
        None, description="the map the box comes from: the phrase's words or the position the ITM head reads "
        "(default: the model's)")
    maps: bool = Field(False, description="include the GradCAM maps")
    picture: bool = Field(False, description="include a PNG of the boxes and maps (as a data URL)")


class AttentionOptions(Options):
    """/api/attention: where each token looks in one image (cross-attention of one layer)."""

    text: str | None = Field(None, description="the text the model reads (BLIP needs one)")
    layer: int | None = Field(None, ge=-64, le=64)
    suppress_common: bool = False
    maps: bool = Field(True, description="include each token's map (heads averaged)")
    picture: bool = Field(False, description="include a PNG of the maps (as a data URL)")


class SearchOptions(Options):
    """/api/search: a text or an image against the served index."""

    text: str | None = Field(None, description="search by text (or send one image instead)")
    k: int = Field(12, ge=1, le=200, description="hits returned")
    rerank: int = Field(32, ge=0, le=512, description="text search: ITM re-ranks this many best by ITC (0: ITC only)")
    thumbnails: bool = Field(True, description="include a small JPEG of each hit (as a data URL)")
