"""Bad input data: a mapper wrapper that names the file, or skips it (``AQD.BAD_INPUT.*``).

detectron2's mappers fail on a missing, truncated or corrupt image with an error from PIL or
the file system that often does not say which dataset entry it was, and silently "repair"
inverted boxes (a COCO box with negative width becomes the box with swapped corners after
any transform). :class:`CheckedMapper` wraps any dataset mapper:

* annotations are checked before mapping: a box with a non-finite coordinate or a negative
  width/height (inverted) is bad input; zero-area boxes and boxes (partly) outside the image
  are left to detectron2, which clips them to the image and drops the empty ones;
* an image that cannot be read or used (``OSError`` such as missing / truncated / not an
  image, PIL's errors, detectron2's ``SizeMismatchError``) is bad input.

Bad input raises :class:`BadInputError` naming the file (``AQD.BAD_INPUT.POLICY "raise"``),
or is skipped with a warning (``"skip"``): the wrapper returns None for a training image
(the loaders then use another image) and a :func:`skipped_marker` for a test image (the test
loader drops it; evaluators then count that image as one without detections). After more
than ``AQD.BAD_INPUT.MAX_SKIPS`` skips in one process, skipping raises too. Other exceptions
(bugs, not data) are re-raised with the file name added.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Iterator, List, Optional

from detectron2.structures import BoxMode

__all__ = ["BadInputError", "CheckedMapper", "SkipMarkedLoader", "check_annotations",
           "is_skipped_marker", "skipped_marker"]

logger = logging.getLogger(__name__)

_SKIP_KEY = "aqd_bad_input_skipped"


class BadInputError(ValueError):
    """A dataset entry that cannot be used; the message names the file and the problem."""


def skipped_marker(dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
    """What a test-time mapper returns for a skipped image (never reaches the model)."""
    return {_SKIP_KEY: True, "file_name": dataset_dict.get("file_name"),
            "image_id": dataset_dict.get("image_id")}


def is_skipped_marker(x: Any) -> bool:
    """True for the output of :func:`skipped_marker`."""
    return isinstance(x, dict) and bool(x.get(_SKIP_KEY, False))


def check_annotations(dataset_dict: Dict[str, Any]) -> None:
    """Raise :class:`BadInputError` for a box that is non-finite or inverted.

    Args:
        dataset_dict: a detectron2 dataset dict (``file_name``, ``annotations`` with
            ``bbox`` and ``bbox_mode``).
    Raises:
        BadInputError: naming the file, the annotation index and the box.
    """
    for i, ann in enumerate(dataset_dict.get("annotations", ()) or ()):
        box = ann.get("bbox")
        if box is None:
            continue
        if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
            raise BadInputError(f"{dataset_dict.get('file_name')}: annotation {i} has a bad box "
                                f"{list(box)} (needs 4 finite numbers)")
        mode = ann.get("bbox_mode", BoxMode.XYXY_ABS)
        if mode in (BoxMode.XYXY_ABS, BoxMode.XYXY_REL):
            w, h = box[2] - box[0], box[3] - box[1]
        elif mode in (BoxMode.XYWH_ABS, BoxMode.XYWH_REL):
            w, h = box[2], box[3]
        else:  # rotated boxes: width/height are the 3rd/4th entries of 5, not checked here
            continue
        if w < 0 or h < 0:
            raise BadInputError(
                f"{dataset_dict.get('file_name')}: annotation {i} has an inverted box {list(box)} "
                f"({BoxMode(mode).name}: width {w}, height {h} < 0)")


# errors that mean "this image/annotation is unusable", not "the code is wrong"
_DATA_ERRORS = (OSError, BadInputError, ValueError, SyntaxError)


class CheckedMapper:
    """Wraps a dataset mapper: checks annotations, names the file on failure, or skips it.

    Args:
        mapper: the wrapped mapper (``dict -> dict``).
        is_train: training (skip -> None) or test (skip -> :func:`skipped_marker`).
        policy: ``"raise"`` or ``"skip"`` (``AQD.BAD_INPUT.POLICY``).
        max_skips: skips allowed per process before skipping raises too.
    """

    def __init__(self, mapper: Callable, is_train: bool, policy: str = "raise",
                 max_skips: int = 100):
        if policy not in ("raise", "skip"):
            raise ValueError(f"AQD.BAD_INPUT.POLICY = {policy!r}; choose 'raise' or 'skip'")
        self.mapper = mapper
        self.is_train = is_train
        self.policy = policy
        self.max_skips = int(max_skips)
        self.num_skipped = 0  # per process (each loader worker counts its own)

    @classmethod
    def from_config(cls, cfg, mapper: Callable, is_train: bool) -> "CheckedMapper":
        """``mapper`` wrapped with the ``AQD.BAD_INPUT`` policy of ``cfg``."""
        return cls(mapper, is_train, cfg.AQD.BAD_INPUT.POLICY, cfg.AQD.BAD_INPUT.MAX_SKIPS)

    def __call__(self, dataset_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Map one dataset dict.

        Returns:
            the wrapped mapper's output; for a skipped entry None (training) or a
            :func:`skipped_marker` (test).
        Raises:
            BadInputError: bad input under "raise", or too many skips; names the file.
        """
        name = dataset_dict.get("file_name", "<dataset dict without file_name>")
        try:
            check_annotations(dataset_dict)
            return self.mapper(dataset_dict)
        except _DATA_ERRORS as e:
            msg = str(e) if isinstance(e, BadInputError) else (
                f"{name}: cannot read or use this image ({type(e).__name__}: {e})")
            if self.policy == "raise":
                raise BadInputError(msg + ". Fix or remove it, or set AQD.BAD_INPUT.POLICY "
                                    "'skip' to skip such images.") from e
            self.num_skipped += 1
            if self.num_skipped > self.max_skips:
                raise BadInputError(f"{msg}. {self.num_skipped} images skipped in this process, "
                                    f"more than AQD.BAD_INPUT.MAX_SKIPS = {self.max_skips}") from e
            logger.warning("Skipping bad input (%d so far in this process): %s",
                           self.num_skipped, msg)
            return None if self.is_train else skipped_marker(dataset_dict)
        except Exception as e:  # not a data error: keep the type, add the file name
            e.args = (f"while mapping {name}: {e.args[0] if e.args else ''}",) + tuple(e.args[1:])
            raise


class SkipMarkedLoader:
    """A test loader without the images :class:`CheckedMapper` skipped.

    Args:
        loader: an iterable of batches (lists of mapped dicts), e.g. detectron2's test loader.
    """

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)  # an upper bound (used for progress / ETA logging)

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        for batch in self.loader:
            kept = [x for x in batch if not is_skipped_marker(x)]
            if kept:
                yield kept
