"""Public prompt templates for textual inversion (docs/privacy.md §3.1).

The lists are the ones of the original textual-inversion work (Gal et al. 2022, the
``imagenet_style_templates_small`` and ``imagenet_templates_small`` sets also used by the
diffusers example). They are public: they carry no information about the private images.
"""

from __future__ import annotations

from enum import Enum

PLACEHOLDER = "{}"


class TemplateSet(str, Enum):
    STYLE = "style"
    OBJECT = "object"


STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


def templates_for(template_set: TemplateSet | str) -> tuple[str, ...]:
    template_set = TemplateSet(template_set)
    return STYLE_TEMPLATES if template_set is TemplateSet.STYLE else OBJECT_TEMPLATES


def split_template(template: str) -> tuple[str, str]:
    """The text before and after the placeholder of ``template``."""
    before, _, after = template.partition(PLACEHOLDER)
    return before.strip(), after.strip()
