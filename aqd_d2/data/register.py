"""The embedded datasets in detectron2's DatasetCatalog / MetadataCatalog, and user datasets.

Registered names (``import aqd_d2`` registers them; :func:`register_all` is idempotent):

========================================  ======  =====  ================  ===============
names                                     format  kind   images (tr/va/te)  size (HxW)
========================================  ======  =====  ================  ===============
aqd_shapes_{train,val}                    COCO    shapes 600 / 100         128x128
aqd_shapes_tiny_{train,val}               COCO    shapes 16 / 8            128x128
aqd_shapes_voc_{train,val,test}           VOC     shapes 600 / 100 / 100   128x128
aqd_shapes_voc_tiny_{train,val,test}      VOC     shapes 16 / 8 / 8        128x128
aqd_kitti_{train,val}                     COCO    kitti  600 / 100         128x384
aqd_kitti_tiny_{train,val}                COCO    kitti  16 / 8            128x384
========================================  ======  =====  ================  ===============

Each family lives in ``os.path.join($DETECTRON2_DATASETS or "datasets", <family>)``, resolved
when the data is *used* (loading, or reading a path from the metadata), not at import, so
tests can point ``DETECTRON2_DATASETS`` at a temporary directory. The first use generates the
files (deterministically, seed 0) into a temporary sibling directory under a file lock and
moves it in place with ``os.rename``: concurrent processes never see a half-written dataset.
A family written by other generator settings (see ``aqd_synthetic.json``) is regenerated; a
directory without that marker is never touched (an error says so). ``aqd_shapes`` and
``aqd_shapes_voc`` hold the same images (same seed and ids).

Metadata: ``thing_classes``, ``evaluator_type`` (``"coco"`` / ``"pascal_voc"``) and the paths
``json_file`` + ``image_root`` (COCO) or ``dirname`` + ``split`` + ``year=2007`` (VOC, what
``PascalVOCDetectionEvaluator`` reads). detectron2's builtin names (``coco_2017_train``,
``voc_2007_train``, ...) are left as detectron2 registers them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets import load_coco_json, load_voc_instances, register_coco_instances

from .scenes import CLASS_NAMES

# The generator and writers (.synthetic, .formats) are imported where they are used, not
# here: importing aqd_d2 registers the names without loading them, and
# ``python -m aqd_d2.data.synthetic`` then runs a module that is not yet imported.

__all__ = [
    "SyntheticFamily", "FAMILIES", "datasets_root", "ensure_generated", "load_synthetic",
    "register_all", "register_coco_dataset", "register_voc_dataset", "register_datasets_from_config",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticFamily:
    """A generated dataset directory and the parameters that produce it.

    Attributes:
        name: directory name under the datasets root; dataset names are ``<name>_<split>``.
        kind: ``"shapes"`` or ``"kitti"``.
        fmt: ``"coco"`` or ``"voc"``.
        num_train, num_val, num_test: split sizes (0: split not registered).
        height, width: image size.
        seed: base seed.
    """

    name: str
    kind: str
    fmt: str
    num_train: int
    num_val: int
    num_test: int = 0
    height: int = 128
    width: int = 128
    seed: int = 0

    @property
    def splits(self) -> Dict[str, int]:
        """The registered splits.

        Returns:
            split -> number of images, for the non-empty splits.
        """
        sizes = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        return {k: v for k, v in sizes.items() if v > 0}

    @property
    def class_names(self) -> Tuple[str, ...]:
        """The class names.

        Returns:
            the kind's class names (``thing_classes``).
        """
        return CLASS_NAMES[self.kind]

    def directory(self) -> str:
        """Where the family lives.

        Returns:
            the family's directory under :func:`datasets_root`, resolved at this call.
        """
        return os.path.join(datasets_root(), self.name)

    def fingerprint(self) -> dict:
        """What the family's marker file must hold for its files to be reused.

        Returns:
            :func:`aqd_d2.data.formats.dataset_fingerprint` of the family's parameters.
        """
        from .formats import dataset_fingerprint

        return dataset_fingerprint(self.kind, self.fmt, self.num_train, self.num_val, self.num_test,
                                   self.height, self.width, self.seed)

    def write(self, directory: str) -> None:
        """Generate the family's files into ``directory`` (marker file last).

        Args:
            directory: an empty directory.
        """
        from .formats import write_dataset

        write_dataset(directory, self.kind, self.fmt, self.num_train, self.num_val,
                      self.num_test, self.height, self.width, self.seed)


#: The embedded dataset families (see the module docstring for the registered names).
FAMILIES: Tuple[SyntheticFamily, ...] = (
    SyntheticFamily("aqd_shapes", "shapes", "coco", 600, 100),
    SyntheticFamily("aqd_shapes_tiny", "shapes", "coco", 16, 8),
    SyntheticFamily("aqd_shapes_voc", "shapes", "voc", 600, 100, 100),
    SyntheticFamily("aqd_shapes_voc_tiny", "shapes", "voc", 16, 8, 8),
    SyntheticFamily("aqd_kitti", "kitti", "coco", 600, 100, width=384),
    SyntheticFamily("aqd_kitti_tiny", "kitti", "coco", 16, 8, width=384),
)


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (default ``"datasets"``), read at every call.

    Returns:
        the root directory of all datasets (``~`` expanded), as detectron2's builtins use it.
    """
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _read_marker(directory: str) -> Optional[dict]:
    from .formats import MARKER_FILE

    try:
        with open(os.path.join(directory, MARKER_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (POSIX ``flock``; elsewhere only the atomic rename
    protects the dataset, and a concurrent generation is wasted work, not corruption)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_generated(family: SyntheticFamily) -> str:
    """Make sure the family's files exist under the current datasets root; generate them if not.

    Args:
        family: the dataset family (any object with ``name``, ``splits``, ``directory()``,
            ``fingerprint()`` and ``write(directory)``, e.g. the classification families of
            :mod:`aqd_d2.data.classification`).

    Returns:
        the family's directory.

    Raises:
        FileExistsError: the directory exists but was not written by this generator.
    """
    from .formats import MARKER_FILE

    final, expected = family.directory(), family.fingerprint()
    if _read_marker(final) == expected:
        return final
    root = os.path.dirname(os.path.abspath(final))
    os.makedirs(root, exist_ok=True)
    with _file_lock(os.path.join(root, f".{family.name}.lock")):
        found = _read_marker(final)
        if found == expected:  # another process generated it while we waited
            return final
        if os.path.exists(final) and found is None:
            raise FileExistsError(
                f"{final} exists but is not a complete aqd_d2 synthetic dataset (no valid "
                f"{MARKER_FILE}); remove it to let aqd_d2 generate '{family.name}' there, or set "
                "DETECTRON2_DATASETS to another directory")
        logger.info("Generating synthetic dataset %s (%s) in %s", family.name, family.splits, final)
        tmp = tempfile.mkdtemp(prefix=f".{family.name}.tmp-", dir=root)
        try:
            os.chmod(tmp, 0o755)
            family.write(tmp)
            if os.path.exists(final):  # stale: written by other generator settings
                logger.warning("Replacing %s: it was generated with %s, expected %s", final, found, expected)
                trash = tempfile.mkdtemp(prefix=f".{family.name}.old-", dir=root)
                os.replace(final, os.path.join(trash, "old"))
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _paths(family: SyntheticFamily, split: str) -> Dict[str, str]:
    directory = ensure_generated(family)
    if family.fmt == "voc":
        return {"dirname": directory}
    return {"json_file": os.path.join(directory, "annotations", f"instances_{split}.json"),
            "image_root": os.path.join(directory, split)}


def load_synthetic(family: SyntheticFamily, split: str, dataset_name: Optional[str] = None) -> List[dict]:
    """Generate the family if needed, then load one split with detectron2's own loader.

    Args:
        family: the dataset family.
        split: ``"train"``, ``"val"`` or ``"test"``.
        dataset_name: the registered name (COCO: lets ``load_coco_json`` check the metadata).

    Returns:
        the dataset in detectron2's format (list of dicts).
    """
    paths = _paths(family, split)
    if family.fmt == "voc":
        return load_voc_instances(paths["dirname"], split, family.class_names)
    return load_coco_json(paths["json_file"], paths["image_root"], dataset_name)


class GeneratedDatasetMetadata(Metadata):
    """Metadata whose path entries (``json_file``, ``image_root`` or ``dirname``) are resolved
    under the datasets root when read; reading one generates the data if it is missing."""

    def __getattr__(self, key: str):
        family, split = self.__dict__.get("_family"), self.__dict__.get("_split")
        if family is not None and key in (("dirname",) if family.fmt == "voc" else ("json_file", "image_root")):
            return _paths(family, split)[key]
        return super().__getattr__(key)

    def as_dict(self) -> dict:
        """All the metadata (paths resolved now), without the private entries.

        Returns:
            a dict copy.
        """
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        out.update(_paths(self.__dict__["_family"], self.__dict__["_split"]))
        return out


def _register_split(family: SyntheticFamily, split: str) -> str:
    name = f"{family.name}_{split}"
    if name in DatasetCatalog:
        if isinstance(MetadataCatalog.get(name), GeneratedDatasetMetadata):
            return name  # already ours (register_all called again)
        raise KeyError(f"dataset name {name!r} is already registered by someone else")
    DatasetCatalog.register(name, lambda: load_synthetic(family, split, name))
    meta = GeneratedDatasetMetadata(name=name)
    object.__setattr__(meta, "_family", family)
    object.__setattr__(meta, "_split", split)
    classes = list(family.class_names)
    if family.fmt == "voc":
        meta.set(thing_classes=classes, evaluator_type="pascal_voc", split=split, year=2007)
    else:
        meta.set(thing_classes=classes, evaluator_type="coco",
                 thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(classes))})
    MetadataCatalog[name] = meta
    return name


def register_all(families: Sequence[SyntheticFamily] = FAMILIES) -> List[str]:
    """Register every split of the given families (idempotent; nothing is generated here).

    Args:
        families: the families (default: :data:`FAMILIES`).

    Returns:
        the registered dataset names.
    """
    return [_register_split(f, split) for f in families for split in f.splits]


def _require(path: str, what: str, name: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {name!r}: {what} not found: {os.path.abspath(path)}")


def register_coco_dataset(name: str, json_file: str, image_root: str,
                          metadata: Optional[dict] = None) -> str:
    """Register a COCO-format dataset (a thin check over detectron2's ``register_coco_instances``).

    Args:
        name: the dataset name (must not be registered yet).
        json_file: path of the COCO instances json.
        image_root: directory the json's ``file_name`` entries are relative to.
        metadata: extra metadata (e.g. ``thing_classes``); ``evaluator_type`` is ``"coco"``.

    Returns:
        ``name``.

    Raises:
        FileNotFoundError: ``json_file`` or ``image_root`` does not exist; the message names
            the dataset and the missing path.
    """
    _require(json_file, "annotation file (json_file)", name)
    _require(image_root, "image directory (image_root)", name)
    register_coco_instances(name, dict(metadata or {}), json_file, image_root)
    return name


def register_voc_dataset(name: str, dirname: str, split: str, class_names: Sequence[str],
                         year: int = 2007) -> str:
    """Register a Pascal VOC-format dataset, checking its files first.

    Args:
        name: the dataset name (must not be registered yet).
        dirname: directory holding ``Annotations``, ``ImageSets/Main`` and ``JPEGImages``.
        split: the image set (``ImageSets/Main/<split>.txt``).
        class_names: the class names, in contiguous-id order.
        year: 2007 (11-point AP) or 2012, for ``PascalVOCDetectionEvaluator``.

    Returns:
        ``name``.

    Raises:
        FileNotFoundError: a required file or directory is missing; the message names it.
    """
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main", split + ".txt")):
        _require(os.path.join(dirname, sub), f"VOC {sub}", name)
    classes = list(class_names)
    DatasetCatalog.register(name, lambda: load_voc_instances(dirname, split, classes))
    MetadataCatalog.get(name).set(thing_classes=classes, dirname=dirname, split=split, year=year,
                                  evaluator_type="pascal_voc")
    return name


def _same_registration(name: str, **expected) -> bool:
    """Whether ``name`` is registered already with these metadata values (a second call of
    :func:`register_datasets_from_config` in the same process is then a no-op)."""
    if name not in DatasetCatalog.list():
        return False
    meta = MetadataCatalog.get(name)
    same = all(os.path.abspath(str(getattr(meta, k, ""))) == os.path.abspath(v)
               if k != "split" else getattr(meta, k, None) == v for k, v in expected.items())
    if not same:
        from ..config import ConfigError

        raise ConfigError(f"dataset {name!r} is already registered with other files "
                          f"({ {k: getattr(meta, k, None) for k in expected} }); pick another name")
    return True


def register_datasets_from_config(cfg) -> List[str]:
    """Register the datasets named in ``cfg.AQD.DATASETS`` (COCO json / VOC folders).

    ``train_net.py`` and ``aqd-train`` call it (their ``--coco`` / ``--voc`` flags add entries);
    a project's own script calls it after merging its config. Idempotent for the same files.

    Args:
        cfg: a config with aqd_d2's keys.
    Returns:
        the names registered (or found registered with the same files).
    Raises:
        FileNotFoundError: a file or folder is missing (names the dataset and the path);
        ConfigError: a name is registered already with other files.
    """
    from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES

    names = []
    for name, json_file, image_root in cfg.AQD.DATASETS.COCO:
        if not _same_registration(name, json_file=json_file, image_root=image_root):
            register_coco_dataset(name, json_file, image_root)
        names.append(name)
    for entry in cfg.AQD.DATASETS.VOC:
        name, dirname, split = entry[:3]
        classes = ([c.strip() for c in entry[3].split(",") if c.strip()] if len(entry) > 3
                   else list(VOC_CLASS_NAMES))
        if not _same_registration(name, dirname=dirname, split=split):
            register_voc_dataset(name, dirname, split, classes)
        names.append(name)
    return names
