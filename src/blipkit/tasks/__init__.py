"""Tasks built on the models' public methods: zero-shot classification, ranking, score matrices, grounding,
cross-attention maps, feature-space plots and model facts. They work for BLIP and BLIP-2 where the model has the
parts a task needs, and raise CapabilityError (naming the checkpoints that have them) where it does not.

    import blipkit
    from blipkit import tasks
    model = blipkit.load("scenes-blip")
    tasks.classify(model, "scene.png", ["red circle", "blue square"], templates=["a picture of a {}"])
    tasks.rank_texts(model, "scene.png", ["a red circle", "a blue square"])
    tasks.ground(model, "scene.png", "the red circle").box        # [x1, y1, x2, y2] in [0, 1]
    tasks.render_attention(tasks.cross_attention_maps(model, "scene.png", "a red circle"), "scene.png", "att.png")

Pictures need matplotlib, projections scikit-learn: `pip install 'blipkit[plot]'`; both are imported only when used.
"""

from .attention import AttentionMaps, cross_attention_maps, default_layer, find_stack, render_attention
from .common import encode_images, encode_texts, itc_scores, itm_logits
from .facts import format_facts, model_facts
from .grounding import GradCAM, Grounding, box_from_map, gradcam, ground, render_grounding
from .inputs import image_paths, read_texts
from .matrix import render_matrix, score_matrix
from .ranking import Collection, Hit, rank_images, rank_texts
from .space import Space, embedding_space, project, render_space
from .zeroshot import DEFAULT_TEMPLATES, classify, label_scores

__all__ = [
    "AttentionMaps",
    "Collection",
    "DEFAULT_TEMPLATES",
    "GradCAM",
    "Grounding",
    "Hit",
    "Space",
    "box_from_map",
    "classify",
    "cross_attention_maps",
    "default_layer",
    "embedding_space",
    "encode_images",
    "encode_texts",
    "find_stack",
    "format_facts",
    "gradcam",
    "ground",
    "image_paths",
    "itc_scores",
    "itm_logits",
    "label_scores",
    "model_facts",
    "project",
    "rank_images",
    "rank_texts",
    "read_texts",
    "render_attention",
    "render_grounding",
    "render_matrix",
    "render_space",
    "score_matrix",
]
