"""Which members of a webdataset sample hold its image and its label.

A webdataset sample is the group of tar members sharing a key (``n0144_10026.jpg``,
``n0144_10026.cls``, ``n0144_10026.json``...). Shards written by other tools differ in both:

- the image is under ``jpg``, ``jpeg``, ``png``, ``webp``... (``image_keys``: tried in order; the
  index's most common extension first);
- the label is an integer or a class name in a ``cls`` member, a field of the ``json`` member
  (``json:label``, ``json:meta.class``), or absent: unlabelled images, the normal case for
  self-supervised pretraining (``label_key=None``; such samples get the label ``-1``).

A label that is a name is mapped to its position in the index's ``classes``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# Image member extensions tried after the index's own image_key, in this order.
DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
# The label of a sample of an unlabelled shard set (torch's cross-entropy ignore_index default
# is -100; -1 is not a class either, and the label-needing evaluations refuse it by name).
NO_LABEL = -1
AUTO = "auto"


class MissingLabelsError(ValueError):
    """Something that needs labels met a shard set without them."""


def check_label_key(label_key: str | None, what: str = "label_key") -> str | None:
    """``label_key`` as given, after checking its form: ``None``, ``"auto"``, ``"cls"`` (or any
    member extension) or ``"json:<field>[.<field>...]"``."""
    if label_key is None or label_key == AUTO:
        return label_key
    if not isinstance(label_key, str) or not label_key.strip():
        raise ValueError(f"{what} must be 'auto', null, 'cls' or 'json:<field>', got {label_key!r}")
    if label_key.startswith("json:"):
        if not label_key[len("json:"):] or any(not part for part in label_key[len("json:"):].split(".")):
            raise ValueError(f"{what}={label_key!r}: name the field after 'json:', e.g. 'json:label'")
    elif ":" in label_key or "." in label_key or "/" in label_key:
        raise ValueError(
            f"{what}={label_key!r} is not a member extension: use e.g. 'cls', or 'json:<field>' for a "
            f"field of the .json member"
        )
    return label_key


def resolve_label_key(requested: str | None, index_label_key: str | None) -> str | None:
    """The label key a reader uses: ``"auto"`` takes the index's (None when it has none)."""
    return index_label_key if requested == AUTO else requested


def require_labels(label_key: str | None, location: str, what: str) -> None:
    """Raise ``MissingLabelsError`` naming ``what`` (e.g. "kNN evaluation") when there are no labels."""
    if label_key is None:
        raise MissingLabelsError(
            f"{what} needs labelled shards, but {location} has no labels (its index says "
            f"label_key: null, or data.label_key is null). Point it at labelled shards, or re-index "
            f"them with `scale-ssl index-shards LOCATION --label-key cls` (or json:<field>) if the "
            f"labels are there under another member"
        )


class SampleFields:
    """Reads the image bytes and the label out of a sample's ``{extension: bytes}`` members."""

    def __init__(self, image_keys: Sequence[str], label_key: str | None, classes: Sequence[str] = ()):
        if isinstance(image_keys, str) or not image_keys or not all(isinstance(k, str) and k for k in image_keys):
            raise ValueError(f"image_keys must be a non-empty list of member extensions, got {image_keys!r}")
        self.image_keys = tuple(dict.fromkeys(key.lower() for key in image_keys))
        self.label_key = check_label_key(label_key)
        if self.label_key == AUTO:
            raise ValueError("SampleFields needs a resolved label_key (resolve_label_key), not 'auto'")
        self.classes = list(classes)
        self._class_ids = {name: position for position, name in enumerate(self.classes)}

    @classmethod
    def for_index(cls, index, image_keys: Sequence[str] | None = None, label_key: str | None = AUTO) -> SampleFields:
        """Fields of the shard set ``index``. Images: the members ``image_keys`` names, in that
        order; by default the index's ``image_key``, then jpg, jpeg, png, webp, ... Labels:
        ``label_key="auto"`` takes the index's."""
        keys = list(image_keys) if image_keys else [index.image_key, *DEFAULT_IMAGE_KEYS]
        return cls(keys, resolve_label_key(check_label_key(label_key), index.label_key), index.classes)

    @property
    def labelled(self) -> bool:
        return self.label_key is not None

    def image_bytes(self, members: dict[str, bytes]) -> bytes:
        for key in self.image_keys:
            data = members.get(key)
            if data is not None:
                return data
        raise ValueError(f"no image member (looked for {', '.join(self.image_keys)}); members are {sorted(members)}")

    def label(self, members: dict[str, bytes]) -> int:
        """The sample's class index, or ``NO_LABEL`` when reading without labels. Raises
        ``ValueError`` saying what is missing or wrong."""
        if self.label_key is None:
            return NO_LABEL
        value = self.raw_label(members)
        return self.class_index(value)

    def raw_label(self, members: dict[str, bytes]) -> Any:
        """The label as stored (text of a ``cls`` member, a JSON value), before mapping to an index."""
        if self.label_key.startswith("json:"):
            encoded = members.get("json")
            if encoded is None:
                raise ValueError(f"no 'json' member for label_key {self.label_key!r}; members are {sorted(members)}")
            try:
                value = json.loads(encoded)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"the 'json' member is not valid JSON ({error})") from None
            for part in self.label_key[len("json:"):].split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ValueError(f"the 'json' member has no field {self.label_key[len('json:'):]!r}")
                value = value[part]
            return value
        encoded = members.get(self.label_key)
        if encoded is None:
            raise ValueError(f"no {self.label_key!r} label member; members are {sorted(members)}")
        try:
            return encoded.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"the {self.label_key!r} member is not text") from None

    def class_index(self, value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"label {value!r} is not a class")
        if isinstance(value, int):
            label = value
        elif isinstance(value, str) and _is_integer(value):
            label = int(value)
        elif isinstance(value, str) and value in self._class_ids:
            return self._class_ids[value]
        else:
            raise ValueError(
                f"label {value!r} is neither an integer nor one of the index's {len(self.classes)} class names"
            )
        if label < 0:
            raise ValueError(f"label {label} is negative")
        return label


def _is_integer(text: str) -> bool:
    return text.lstrip("-").isdigit()
