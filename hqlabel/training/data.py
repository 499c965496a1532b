"""Training data for the HQ-token recipe: an index of the images, read lazily, and background loaders.

An instance dataset (``hqlabel/platform/instances.py``) is never read whole: ``open_images`` builds an index
of ``(part file, row)`` from each part's ``image_id`` and instance-id columns only (no image bytes, no RLE),
about 8 bytes an image, and ``ImageIndex[k]`` reads one image when asked, through a per-thread reader that
keeps one row group (``ROW_GROUP_SIZE`` images) and a few open part files. Each worker reads only the rows
of its share of an epoch. COCO JSON and mask-folder inputs are converted in memory (``ImageList``); convert
them once with ``hqlabel import-gt`` to stream them.

``ExampleLoader`` turns a worker's share into augmented batches in background threads (decode, flip,
large-scale jitter, instance sampling), ``prefetch`` batches ahead of the training step: a worker holds at
most ``(prefetch + 1) * batch_size`` examples and one row group per thread, whatever the dataset's size.
Every example draws its randomness from ``(seed, epoch, slot)`` (its place in the epoch), so the batches are
the same whatever the threads' timing, and a resumed epoch replays exactly.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hqlabel.platform import storage
from hqlabel.platform.images import decode_image
from hqlabel.platform.instances import (
    ImageInstances,
    is_instance_dataset,
    open_instances,
    part_uris,
)
from hqlabel.platform.storage import StorageOptions
from hqlabel.training.augment import large_scale_jitter, random_hflip
from hqlabel.training.config import TrainConfig

_OPEN_PARTS = 8  # part files a reader thread keeps open


@dataclass
class Example:
    """One augmented training image: S x S x 3 uint8 (content at the top-left), N x S x S bool masks."""

    image: np.ndarray
    masks: np.ndarray
    valid: tuple[int, int]


class ImageList(Sequence[ImageInstances]):
    """Images held in memory (COCO JSON and mask-folder inputs)."""

    def __init__(self, images: list[ImageInstances]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @overload
    def __getitem__(self, k: int) -> ImageInstances: ...
    @overload
    def __getitem__(self, k: slice) -> ImageList: ...
    def __getitem__(self, k: int | slice) -> ImageInstances | ImageList:
        return ImageList(self.images[k]) if isinstance(k, slice) else self.images[k]


class _PartReader:
    """One thread's access to the parts: a few open ``ParquetFile``s and the last row group read."""

    def __init__(self, options: StorageOptions) -> None:
        self.options = options
        self.files: OrderedDict[str, pq.ParquetFile] = OrderedDict()
        self.cached: tuple[str, int, pa.Table] | None = None

    def _file(self, uri: str) -> pq.ParquetFile:
        if uri in self.files:
            self.files.move_to_end(uri)
        else:
            fs, path = storage.resolve(uri, self.options)
            opened = storage.with_retries(lambda: pq.ParquetFile(fs.open_input_file(path)), f"opening {uri}")
            self.files[uri] = opened
            if len(self.files) > _OPEN_PARTS:
                self.files.popitem(last=False)
        return self.files[uri]

    def row(self, uri: str, row: int) -> dict[str, Any]:
        file = self._file(uri)
        group, start = 0, 0
        while start + file.metadata.row_group(group).num_rows <= row:
            start += file.metadata.row_group(group).num_rows
            group += 1
        if self.cached is None or self.cached[:2] != (uri, group):
            self.cached = None  # release the previous group before reading the next
            table = storage.with_retries(lambda: file.read_row_group(group), f"reading {uri}")
            self.cached = (uri, group, table)
        return self.cached[2].slice(row - start, 1).to_pylist()[0]


class ImageIndex(Sequence[ImageInstances]):
    """Images of an instance dataset by ``(part, row)``, read one at a time when indexed.

    Thread-safe: each thread reads through its own ``_PartReader``.
    """

    def __init__(self, parts: list[str], part: np.ndarray, row: np.ndarray, options: StorageOptions) -> None:
        self.parts, self.part, self.row, self.options = parts, part, row, options
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self.part)

    @overload
    def __getitem__(self, k: int) -> ImageInstances: ...
    @overload
    def __getitem__(self, k: slice) -> ImageIndex: ...
    def __getitem__(self, k: int | slice) -> ImageInstances | ImageIndex:
        if isinstance(k, slice):
            return ImageIndex(self.parts, self.part[k], self.row[k], self.options)
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = _PartReader(self.options)
        return ImageInstances.from_row(reader.row(self.parts[int(self.part[k])], int(self.row[k])))

    def select(self, keep: np.ndarray) -> ImageIndex:
        """The images where the bool array ``keep`` is true."""
        return ImageIndex(self.parts, self.part[keep], self.row[keep], self.options)


def id_keys(image_ids: list[str]) -> np.ndarray:
    """uint64 keys of image ids (the first 8 bytes of their SHA-1): what the validation split hashes."""
    keys = [int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "big") for i in image_ids]
    return np.array(keys, dtype=np.uint64)


def _key_columns(uri: str, options: StorageOptions) -> pa.Table:
    """A part's ``image_id`` and ``instances`` (their ``instance_id`` alone): no image bytes, no masks."""
    fs, path = storage.resolve(uri, options)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read(columns=["image_id", "instances.list.element.instance_id"])


def index_instances(uri: str, options: StorageOptions = StorageOptions()) -> tuple[ImageIndex, np.ndarray]:
    """The images of the instance dataset at ``uri`` that have at least one instance, and their ``id_keys``.

    Reads each part's ``image_id`` and ``instances.instance_id`` columns only; holds 16 bytes an image.
    """
    parts = part_uris(uri, options)
    part_of, row_of, keys = [], [], []
    for k, part in enumerate(parts):
        table = storage.with_retries(lambda part=part: _key_columns(part, options), f"indexing {part}")
        rows = np.flatnonzero(pc.list_value_length(table["instances"]).to_numpy(zero_copy_only=False) > 0)
        part_of.append(np.full(len(rows), k, dtype=np.int32))
        row_of.append(rows.astype(np.int32))
        keys.append(id_keys(table["image_id"].take(rows).to_pylist()))
    part, row = (np.concatenate(a) if a else np.zeros(0, dtype=np.int32) for a in (part_of, row_of))
    return ImageIndex(parts, part, row, options), np.concatenate(keys) if keys else np.zeros(0, np.uint64)


def open_images(
    uri: str, options: StorageOptions = StorageOptions(), *, images_root: str | None = None
) -> tuple[ImageIndex | ImageList, np.ndarray]:
    """The images with at least one mask at ``uri`` (any ``open_instances`` input) and their ``id_keys``:
    an ``ImageIndex`` for an instance dataset, an ``ImageList`` for COCO JSON and mask folders."""
    if is_instance_dataset(uri, options):
        return index_instances(uri, options)
    images = [i for i in open_instances(uri, options, images_root=images_root) if i.instances]
    return ImageList(images), id_keys([i.image_id for i in images])


def _select(images: ImageIndex | ImageList, keep: np.ndarray) -> ImageIndex | ImageList:
    if isinstance(images, ImageIndex):
        return images.select(keep)
    return ImageList([image for image, k in zip(images.images, keep, strict=True) if k])


def data_revision(config: TrainConfig) -> str:
    """``files:`` + a digest of the names, sizes and versions (local: modification time; S3: ETag, or
    modification time for a single object) of the files of ``config.data`` and ``config.val_data`` (a COCO
    JSON's images too: ``images_root``, else the JSON's folder): what a run records to tell the data it
    trained on from what those paths hold later. Names and folders starting with ``.`` or ``_`` are left out,
    as a listing leaves them out."""
    options = config.storage
    digest = hashlib.sha256()
    roots = [(role, uri) for role, uri in (("data", config.data), ("val_data", config.val_data)) if uri]
    for role, uri in list(roots):  # a COCO JSON's images: images_root, else the JSON's folder
        if uri.lower().endswith(".json"):
            roots.append((f"{role} images", config.images_root or uri.rsplit("/", 1)[0]))
    for role, uri in roots:
        if storage.is_dir(uri, options):
            entries = ((e.uri, e.size, e.version) for e in storage.walk(uri, ("",), options))
        else:
            fs, path = storage.resolve(uri, options)
            info = fs.get_file_info(path)
            entries = [(uri, info.size, str(info.mtime_ns))]
        for name, size, version in entries:
            digest.update(f"{role}\t{name}\t{size}\t{version}\n".encode())
    return "files:" + digest.hexdigest()[:32]


def load_splits(config: TrainConfig) -> tuple[ImageIndex | ImageList, ImageIndex | ImageList]:
    """The training and validation images (those with at least one mask), as lazy sequences.

    Without ``val_data``, ``val_fraction`` of the images (by a hash of their id: stable across runs and
    workers) are held out.
    """
    options = config.storage
    images, keys = open_images(config.data, options, images_root=config.images_root)
    if config.val_data is not None:
        train = images
        val, _ = open_images(config.val_data, options, images_root=config.images_root)
    else:
        held_out = keys / float(2**64) < config.val_fraction  # by a hash of the id: the same on every worker
        train, val = _select(images, ~held_out), _select(images, held_out)
    if not len(train):
        raise ValueError(
            f"{config.data} has no training images with masks"
            + (f" after holding out {config.val_fraction:.0%} for validation" if len(val) else "")
        )
    return train, val


def sample_instances(count: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of at most ``cap`` of an image's ``count`` instances, drawn without replacement."""
    if count <= cap:
        return np.arange(count)
    return np.sort(rng.choice(count, cap, replace=False))


def make_example(item: ImageInstances, size: int, config: TrainConfig, rng: np.random.Generator) -> Example:
    """Sample at most ``instances_per_image`` of the image's objects, decode them and the image, flip,
    jitter to ``size`` square; drop the objects the crop removed."""
    chosen = sample_instances(len(item.instances), config.instances_per_image, rng)
    image, masks = decode_image(item.image), item.masks(chosen)
    if config.flip:
        image, masks = random_hflip(image, masks, rng)
    image, masks, valid = large_scale_jitter(image, masks, size, config.jitter, rng)
    return Example(image, masks[masks.reshape(len(masks), -1).any(1)], valid)


def example_rng(seed: int, epoch: int, slot: int) -> np.random.Generator:
    """The randomness of the example in ``slot`` of ``epoch``'s order (instances, flip, jitter)."""
    return np.random.default_rng([seed, epoch, 1, slot])


class ExampleLoader:
    """Batches of examples of one worker's share of an epoch, made in background threads.

    Args:
        images: the training images.
        order: the epoch's image order over all workers (``order[slot]`` = image of ``slot``).
        batches: this worker's batches, each a list of slots.
        size: side of the square examples (the encoder's input).
        threads: background threads; 0 makes each batch in the calling thread when it is asked for.
        prefetch: batches made ahead of the one being trained on.
    """

    def __init__(
        self,
        images: Sequence[ImageInstances],
        order: np.ndarray,
        batches: list[np.ndarray],
        size: int,
        config: TrainConfig,
        epoch: int,
        *,
        threads: int,
        prefetch: int,
    ) -> None:
        self.images, self.order, self.batches = images, order, batches
        self.size, self.config, self.epoch = size, config, epoch
        self.threads, self.prefetch = threads, max(prefetch, 1)

    def example(self, slot: int) -> Example:
        item = self.images[int(self.order[slot])]
        return make_example(item, self.size, self.config, example_rng(self.config.seed, self.epoch, slot))

    def __iter__(self) -> Iterator[list[Example]]:
        if self.threads == 0:
            for batch in self.batches:
                yield [self.example(slot) for slot in batch]
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="hqlabel-loader") as pool:
            pending: deque[list[Future[Example]]] = deque()
            upcoming = iter(self.batches)

            def submit() -> None:
                batch = next(upcoming, None)
                if batch is not None:
                    pending.append([pool.submit(self.example, int(slot)) for slot in batch])

            for _ in range(self.prefetch):
                submit()
            try:
                while pending:
                    futures = pending.popleft()
                    examples = [f.result() for f in futures]
                    submit()
                    yield examples
            finally:
                for futures in pending:
                    for f in futures:
                        f.cancel()
