"""A training loader that continues exactly where a checkpoint left it (``AQD.EXACT_RESUME``).

Why: detectron2's ``TrainingSampler`` is seeded but restarts its stream on every start, so a
run resumed at iteration k sees the batches of iterations 0, 1, ... again instead of those of
k, k+1, ...; and augmentation randomness (random flip, crops) comes from each process'
global NumPy RNG (or from loader-worker seeds drawn from the global torch RNG), which a
restart resets. So a resumed run trains on different data than an uninterrupted one.

What this loader changes (everything else is detectron2's: its dataset dicts, its samplers
by ``DATALOADER.SAMPLER_TRAIN``, the configured mapper, a torch DataLoader with workers):

* batches are *planned* from integers only: the sampler's index stream of this rank, grouped
  by orientation (``width > height`` of the dataset dict) when
  ``DATALOADER.ASPECT_RATIO_GROUPING``; on resume the plan skips the consumed batches
  without loading any image;
* the i-th sample of a rank's stream is mapped with NumPy / Python / torch-CPU RNGs seeded
  from ``(seed, rank, i)`` and restored afterwards, so augmentation is a function of the
  position, in the main process or any worker;
* ``state_dict()`` = batches consumed + seeds; the Trainer saves it with the checkpoint and
  ``load_state_dict`` continues from there (with the saved seeds, so ``SEED -1`` runs also
  resume exactly).

Difference from detectron2's grouping: detectron2 groups *mapped* images by their shape; here
the orientation comes from the dataset dict, which is the same for resize/flip mappers; a
mapper that crops may then batch mixed orientations (only padding differs, not the result).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset

__all__ = ["ResumableTrainLoader", "build_sampler", "position_seed", "scoped_rng"]

logger = logging.getLogger(__name__)


def position_seed(seed: int, rank: int, position: int, attempt: int = 0) -> int:
    """A 32-bit seed for sample ``position`` of ``rank``'s stream (``attempt``: fallbacks)."""
    return int(np.random.SeedSequence([seed, rank, position, attempt]).generate_state(1)[0])


@contextlib.contextmanager
def scoped_rng(seed: int):
    """Seed NumPy's, Python's and torch's CPU global RNGs; restore their states on exit."""
    np_state, py_state = np.random.get_state(), random.getstate()
    torch_state = torch.get_rng_state()
    np.random.seed(seed)
    random.seed(seed)
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators are untouched
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


def build_sampler(name: str, dataset_dicts: Sequence[dict], seed: int, cfg=None):
    """detectron2's training sampler ``name`` (``DATALOADER.SAMPLER_TRAIN``) with ``seed``.

    Raises:
        ValueError: naming the key and the known samplers.
    """
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset_dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD)
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        return RandomSubsetTrainingSampler(len(dataset_dicts), cfg.DATALOADER.RANDOM_SUBSET_RATIO,
                                           seed_shuffle=seed, seed_subset=seed)
    raise ValueError(f"DATALOADER.SAMPLER_TRAIN = {name!r}: the exact-resume loader knows "
                     "'TrainingSampler', 'RepeatFactorTrainingSampler', "
                     "'RandomSubsetTrainingSampler' (or set AQD.EXACT_RESUME False)")


class _PositionMapped(Dataset):
    """Map-style dataset keyed by ``(position, index)``: maps with position-seeded RNGs."""

    def __init__(self, dataset: DatasetFromList, mapper: Callable, seed: int, rank: int):
        self.dataset, self.mapper, self.seed, self.rank = dataset, mapper, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        position, index = key
        n = len(self.dataset)
        for attempt in range(n):  # None = skipped bad input: use the next image instead
            with scoped_rng(position_seed(self.seed, self.rank, position, attempt)):
                out = self.mapper(self.dataset[(index + attempt) % n])
            if out is not None:
                return out
        raise RuntimeError(f"the mapper skipped all {n} training images")


class _Plan:
    """Iterable batch plan of a :class:`ResumableTrainLoader` from batch ``start`` on."""

    def __init__(self, loader: "ResumableTrainLoader", start: int):
        self.loader, self.start = loader, start

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        return itertools.islice(self.loader.batch_plan(), self.start, None)


class ResumableTrainLoader:
    """Infinite training loader with an exact position (see the module doc).

    Args:
        dataset_dicts: detectron2 dataset dicts.
        mapper: dataset mapper (may return None to skip an entry).
        sampler_name: ``DATALOADER.SAMPLER_TRAIN``.
        batch_size: images per batch on this rank.
        seed: shared by all ranks; seeds the sampler and the per-sample RNGs.
        aspect_ratio_grouping, num_workers: as in detectron2's train loader.
        cfg: the config (for the sampler's options).
    Yields:
        lists of ``batch_size`` mapped dicts.
    """

    def __init__(self, dataset_dicts: List[dict], mapper: Callable, sampler_name: str,
                 batch_size: int, seed: int, aspect_ratio_grouping: bool = True,
                 num_workers: int = 0, cfg=None):
        self.sampler_name, self.batch_size, self.cfg = sampler_name, int(batch_size), cfg
        self.grouping, self.num_workers = bool(aspect_ratio_grouping), int(num_workers)
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self._dicts = dataset_dicts  # kept for rebuilding the sampler with a loaded seed
        self._wide = [int(d.get("width", 0) > d.get("height", 0)) for d in dataset_dicts]
        self.dataset = DatasetFromList(dataset_dicts, copy=False, serialize=True)
        self.mapper = mapper
        self._set_seed(int(seed))
        self._start = 0
        self._consumed = 0

    def _set_seed(self, seed: int) -> None:
        self.seed = seed
        self.sampler = build_sampler(self.sampler_name, self._dicts, seed, self.cfg)

    def batch_plan(self) -> Iterator[List[Tuple[int, int]]]:
        """This rank's batches as ``(position, dataset index)`` lists; integers only."""
        buckets: List[List[Tuple[int, int]]] = [[], []]
        for position, index in enumerate(self.sampler):  # this rank's share of the stream
            bucket = buckets[self._wide[index] if self.grouping else 0]
            bucket.append((position, int(index)))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self) -> Iterator[List[Any]]:
        # a generator: nothing runs before the first next(), so a checkpoint loaded after
        # iter() was called (detectron2 starts the iterator when building the trainer)
        # still decides where the stream starts.
        start = self._start
        if start:
            logger.info("Training loader resumes after %d consumed batches (seed %d)",
                        start, self.seed)
        loader = DataLoader(
            _PositionMapped(self.dataset, self.mapper, self.seed, self.rank),
            batch_sampler=_Plan(self, start), num_workers=self.num_workers,
            collate_fn=_list_collate,
            # the workers' base seed then never draws from the global torch RNG
            generator=torch.Generator().manual_seed(self.seed),
        )
        self._consumed = start
        for batch in loader:
            self._consumed += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        """Batches consumed on this rank, seed and geometry (saved with checkpoints)."""
        return {"batches": self._consumed, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue after ``state["batches"]`` batches (call before the first batch)."""
        if state.get("seed", self.seed) != self.seed:
            self._set_seed(int(state["seed"]))
        geometry = (state.get("batch_size"), state.get("world_size"))
        if geometry != (self.batch_size, self.world_size):
            logger.warning(
                "Checkpoint's loader had batch size %s on %s ranks, now %d on %d: the data "
                "stream continues at batch %d of the new layout, not at the same samples",
                *geometry, self.batch_size, self.world_size, state["batches"])
        self._start = int(state["batches"])


def _list_collate(batch: List[Any]) -> List[Any]:
    return batch


def resumable_loader_from_config(cfg, mapper: Callable, seed: Optional[int] = None
                                 ) -> ResumableTrainLoader:
    """:class:`ResumableTrainLoader` for ``cfg.DATASETS.TRAIN`` (detectron2's dataset dicts,
    filtering and sampler choice); ``seed`` defaults to ``cfg.SEED`` or, if negative, a seed
    shared by all ranks."""
    from detectron2.data import get_detection_dataset_dicts

    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                       if cfg.MODEL.KEYPOINT_ON else 0),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH} is not divisible "
                         f"by the number of processes ({world})")
    return ResumableTrainLoader(
        dicts, mapper, cfg.DATALOADER.SAMPLER_TRAIN, cfg.SOLVER.IMS_PER_BATCH // world, seed,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS, cfg=cfg)
