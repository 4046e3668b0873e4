"""A training data stream that a resumed run continues exactly where the interrupted one stopped.

D2 0.6's ``TrainingSampler`` yields an infinite shuffled index stream seeded once; its position is not
checkpointed, so after ``--resume`` the run sees the images of iteration 0 again, and the random
augmentations (drawn from the global numpy RNG) differ too. :class:`ResumableTrainingStream` yields
the same index stream as ``TrainingSampler(size, seed=seed)`` (same seed, same order, same
sharding over processes), starting at any global position, and maps the sample at position p with
every RNG seeded from (seed, p). So sample p is the same image with the same augmentation whether
the run was interrupted or not, with any number of DataLoader workers.

A run that consumed ``start_iter`` iterations of ``IMS_PER_BATCH`` images resumes at position
``start_iter * IMS_PER_BATCH``. That is exact when batches are formed in stream order, i.e. with
``DATALOADER.ASPECT_RATIO_GROUPING False`` or when all images fall into one aspect-ratio group
(all landscape or all portrait, as in the synthetic shapes datasets); otherwise the images waiting
in D2's aspect-ratio buckets at the checkpoint are skipped.
"""
import itertools
import random

import torch
import torch.utils.data as torchdata

from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from ..utils.rng import derive_seed, preserved_rngs, seeded_rngs

__all__ = ["ResumableTrainingStream", "RNGNeutralIterator"]

_SAMPLE_DOMAIN = 1  # keeps per-sample seeds apart from per-iteration seeds (mnc_d2.engine.hooks)


class RNGNeutralIterator:
    """Wraps a data loader iterator so that fetching a batch leaves the global RNGs as they were.

    Creating a torch DataLoader iterator draws its base seed from the global torch RNG; D2 creates it
    lazily at the first batch, i.e. at iteration 0 of a fresh run but at iteration k of a run resumed
    at k. Without this the model's random draws at that iteration would differ between the two.
    """

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        with preserved_rngs():
            return next(self._iterator)


class ResumableTrainingStream(torchdata.IterableDataset):
    """Mapped training samples in ``TrainingSampler`` order from global position ``start_position``.

    Global positions p = 0, 1, 2, ... index the infinite stream of shuffled epochs. Process ``rank``
    of ``world_size`` takes p = rank (mod world_size), like D2's sampler; its DataLoader workers split
    those round-robin, which the DataLoader undoes (it reads workers in turn), so the order a process
    sees does not depend on the number of workers.

    When the mapper returns None (an image it skipped), a substitute index is drawn from
    (seed, p, attempt), so every position still yields one sample and later positions do not move.

    ``seed`` and ``start_position`` may be changed until an iterator is created (the trainer sets them
    after loading a checkpoint).
    """

    def __init__(self, dataset_dicts, mapper, seed: int, *, shuffle: bool = True, start_position: int = 0):
        self._dataset = DatasetFromList(dataset_dicts, copy=False, serialize=True)
        self._mapper = mapper
        self._size = len(self._dataset)
        assert self._size > 0, "empty training set"
        self.seed = int(seed)
        self.shuffle = shuffle
        self.start_position = int(start_position)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

    def __len__(self):
        return self._size  # for logging only: the stream is infinite

    def _positions_and_indices(self, start: int):
        """(position, dataset index) from position ``start`` onwards."""
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        epoch, offset = divmod(start, self._size)
        for _ in range(epoch):  # advance the generator past finished epochs, as TrainingSampler did
            if self.shuffle:
                torch.randperm(self._size, generator=generator)
        while True:
            order = torch.randperm(self._size, generator=generator).tolist() if self.shuffle else range(self._size)
            for i in range(offset, self._size):
                yield epoch * self._size + i, order[i]
            epoch, offset = epoch + 1, 0

    def _sample(self, position: int, index: int):
        for attempt in itertools.count():
            with seeded_rngs(derive_seed(self.seed, _SAMPLE_DOMAIN, position, attempt)):
                data = self._mapper(self._dataset[index])
                if data is not None:
                    return data
                index = random.randrange(self._size)  # deterministic substitute for a skipped image

    def __iter__(self):
        worker = torchdata.get_worker_info()
        num_workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        stream = self._positions_and_indices(self.start_position)
        # positions start_position + rank + world_size * (worker_id + num_workers * k), k = 0, 1, ...
        mine = itertools.islice(stream, self._rank + self._world_size * worker_id, None, self._world_size * num_workers)
        for position, index in mine:
            yield self._sample(position, index)
