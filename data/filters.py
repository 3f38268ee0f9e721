"""Metadata filters of the streaming pipeline (data/pipeline.py) and ``data.inspect``: size, aspect
ratio, caption length and json thresholds (``punsafe``, ``pwatermark``, ...). A filter is a choice, not a
fault: each drop is counted as ``filter_<name>`` and never counts toward ``data.max_bad_fraction``.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_OPS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_THRESHOLD = re.compile(r"^\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.eE+-]+)\s*$")


@dataclass
class Filters:
    """Metadata filters. Each drop is counted as ``filter_<name>``.

    Sizes are the source image's: the json's ``original_width``/``original_height`` (img2dataset's, when
    it resized: its ``width``/``height`` are then the stored size, 256 x 256 by default), else its
    ``width``/``height``, else the image header's (:func:`json_size`). ``fields`` maps a numeric json
    field to a condition that KEEPS the sample, e.g. ``{"punsafe": "< 0.1", "pwatermark": "< 0.8"}``;
    a sample whose json lacks the field is kept
    (LAION subsets often lack them) unless ``drop_missing_fields`` is set.
    """

    min_width: int = 0
    min_height: int = 0
    max_aspect_ratio: float | None = None
    min_caption_chars: int = 1
    max_caption_chars: int | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    drop_missing_fields: bool = False

    def __post_init__(self) -> None:
        self._conditions = {}
        for name, cond in dict(self.fields).items():
            m = _THRESHOLD.match(str(cond))
            if not m:
                raise ValueError(
                    f"data.filters.fields.{name}={cond!r}: expected a comparison like '< 0.1' or '>= 0.3'"
                )
            self._conditions[name] = (_OPS[m.group(1)], float(m.group(2)))
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"data.filters.max_aspect_ratio={self.max_aspect_ratio}: must be >= 1")

    @property
    def reasons(self) -> list[str]:
        names = ["filter_min_size", "filter_aspect_ratio", "filter_caption_length"]
        return names + [f"filter_{name}" for name in self._conditions]

    def check_meta(self, meta: Mapping, caption: str | None) -> str | None:
        """Filters that need no pixels. Returns the failing reason or None."""
        if caption is not None:
            n = len(caption.strip())
            if n < self.min_caption_chars or (
                self.max_caption_chars is not None and n > self.max_caption_chars
            ):
                return "filter_caption_length"
        for name, (op, threshold) in self._conditions.items():
            value = meta.get(name)
            if value is None:
                if self.drop_missing_fields:
                    return f"filter_{name}"
                continue
            try:
                if not op(float(value), threshold):
                    return f"filter_{name}"
            except (TypeError, ValueError):
                return f"filter_{name}"
        return None

    def check_size(self, width: int, height: int) -> str | None:
        if width < self.min_width or height < self.min_height:
            return "filter_min_size"
        if self.max_aspect_ratio is not None and max(width, height) > self.max_aspect_ratio * min(
            width, height
        ):
            return "filter_aspect_ratio"
        return None


def json_size(meta: Mapping) -> tuple[int, int] | None:
    """The source image's (width, height) from a sample's json: ``original_width``/``original_height``
    when present (img2dataset writes the source size there and the resized one in ``width``/``height``:
    filtering on those, every image of its default border resize was 256 x 256, thumbnails and panoramas
    too), else ``width``/``height``, else None (the image header's size applies). Raises ValueError or
    TypeError on values that are not integers."""
    for w, h in (("original_width", "original_height"), ("width", "height")):
        if w in meta and h in meta:
            return int(meta[w]), int(meta[h])
    return None
