"""Calibration and evaluation data: image folders with a preprocessing preset, or ready ``.npy``/``.npz`` tensors.

Data is produced batch by batch, so memory does not grow with the number of images.  An image folder is read
in a fixed order spread over its sorted file names (:func:`spread_order`), so every run with the same input
gives the same output and any first N images cover the folder evenly: calibration folders are usually named
by class (``n01440764_tench.JPEG``, ...), and the first N in sorted order would be the first N classes.

A corrupt or unreadable image among good ones is skipped with a warning (and counted); a folder in which no
image can be read is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

from ptqc.errors import PtqcError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``round(size / crop)``, centre-crop ``size``, then ``(pixel - mean) / std``.

    ``mean`` and ``std`` are per RGB channel in pixel units (0-255).
    """

    size: int = 224
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    crop: float = 0.875


PRESETS: dict[str, Preprocess] = {
    # TF / Keras MobileNets: pixel / 127.5 - 1
    "tf": Preprocess(mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)),
    # EfficientNet-Lite: (pixel - 127) / 128
    "lite": Preprocess(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
    # torchvision: ImageNet mean / std on [0, 1] pixels
    "torch": Preprocess(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)),
}


def make_preprocess(
    preset: str = "tf", size: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Preprocess:
    if preset not in PRESETS:
        raise PtqcError(f"unknown preprocessing preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    kw = {}
    if size is not None:
        kw["size"] = int(size)
    for name, val in (("mean", mean), ("std", std)):
        if val is not None:
            val = tuple(float(v) for v in val)
            if len(val) == 1:
                val = val * 3
            if len(val) != 3:
                raise PtqcError(f"--{name} takes 1 or 3 values, got {len(val)}")
            kw[name] = val
    if "std" in kw and any(v == 0 for v in kw["std"]):
        raise PtqcError("--std values must be non-zero")
    return dataclasses.replace(base, **kw)


def load_image(path: str, pre: Preprocess) -> np.ndarray:
    """One image as a float32 CHW array."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        short = round(pre.size / pre.crop)
        scale = short / min(w, h)
        nw, nh = max(pre.size, round(w * scale)), max(pre.size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - pre.size) // 2, (nh - pre.size) // 2
        img = img.crop((left, top, left + pre.size, top + pre.size))
        arr = np.asarray(img, dtype=np.float32)
    arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def spread_order(count: int) -> list[int]:
    """The indices ``0..count-1`` in bit-reversed (van der Corput) order: 0, count/2, count/4, 3count/4, ...
    Any prefix of length n holds indices about ``count / n`` apart, so the first n files of a folder sorted by
    class come from n classes spread over all of them, not from its first n classes."""
    if count <= 1:
        return list(range(count))
    bits = (count - 1).bit_length()
    order = (int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits))
    return [i for i in order if i < count]


def list_images(folder: str) -> list[str]:
    if not os.path.exists(folder):
        raise PtqcError(f"image folder not found: {folder}")
    if not os.path.isdir(folder):
        raise PtqcError(f"not a folder: {folder}")
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise PtqcError(f"cannot read folder {folder}: {exc.strerror}") from None
    files = [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise PtqcError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


class Dataset:
    """A source of input tensors, read lazily in batches."""

    def __len__(self) -> int:
        raise NotImplementedError

    def sample_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def after(self, skip: int) -> Dataset:
        """The same source without its first ``skip`` samples (an empty source if it has no more)."""
        raise NotImplementedError

    def head(self, samples: int, batch_size: int) -> Iterator[np.ndarray]:
        """The first ``samples`` samples (or all, if fewer), in batches of ``batch_size``."""
        seen = 0
        if samples < 1:
            return
        for batch in self.batches(batch_size):
            batch = batch[: samples - seen]
            seen += len(batch)
            yield batch
            if seen >= samples:
                return  # before the next batch is decoded


class ImageFolder(Dataset):
    """The first ``limit`` images of a folder in :func:`spread_order` over its sorted names, preprocessed.
    ``after(limit)`` on the whole folder gives exactly the images the first ``limit`` left out."""

    def __init__(self, folder: str, pre: Preprocess, limit: int | None = None):
        names = list_images(folder)
        self.files = [names[i] for i in spread_order(len(names))]
        if limit is not None:
            self.files = self.files[:limit]
        self.pre = pre
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.files)

    def after(self, skip: int) -> ImageFolder:
        rest = copy.copy(self)
        rest.files = self.files[skip:]
        return rest

    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.pre.size, self.pre.size)

    def _read(self, path: str) -> np.ndarray | None:
        try:
            return load_image(path, self.pre)
        except Exception as exc:
            logger.warning("skipping unreadable image %s (%s)", path, type(exc).__name__)
            self.skipped.append(path)
            return None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        self.skipped = []
        good = 0
        for start in range(0, len(self.files), batch_size):
            arrays = [a for a in (self._read(p) for p in self.files[start : start + batch_size]) if a is not None]
            if arrays:
                good += len(arrays)
                yield np.stack(arrays)
        if good == 0:
            raise PtqcError(f"none of the {len(self.files)} images could be read")

    def labelled_batches(self, batch_size: int, labels: dict[str, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches with their integer labels (images without a label are an error)."""
        missing = [os.path.basename(f) for f in self.files if os.path.basename(f) not in labels]
        if missing:
            raise PtqcError(f"{len(missing)} images have no label, e.g. {missing[0]}")
        for start in range(0, len(self.files), batch_size):
            chunk = self.files[start : start + batch_size]
            pairs = [(self._read(p), labels[os.path.basename(p)]) for p in chunk]
            pairs = [(a, y) for a, y in pairs if a is not None]
            if pairs:
                yield np.stack([a for a, _ in pairs]), np.array([y for _, y in pairs])


class ArrayData(Dataset):
    """Ready input tensors from memory, a ``.npy`` file, or a ``.npz`` file."""

    def __init__(self, array: np.ndarray, limit: int | None = None):
        if array.ndim < 2:
            raise PtqcError(f"calibration array must be batched (N, ...), got shape {array.shape}")
        if array.shape[0] == 0:
            raise PtqcError("calibration array is empty")
        if not np.issubdtype(array.dtype, np.floating):
            raise PtqcError(f"calibration array must be floating point, got {array.dtype}")
        self.array = array[:limit] if limit is not None else array

    @classmethod
    def from_file(cls, path: str, input_name: str | None = None, limit: int | None = None) -> ArrayData:
        if not os.path.exists(path):
            raise PtqcError(f"calibration file not found: {path}")
        try:
            loaded = np.load(path, mmap_mode="r" if path.endswith(".npy") else None)
        except Exception as exc:
            raise PtqcError(f"cannot read {path}: {type(exc).__name__}") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            keys = list(loaded.keys())
            if not keys:
                raise PtqcError(f"{path} holds no arrays")
            key = input_name if input_name in keys else keys[0]
            loaded = loaded[key]
        return cls(np.asarray(loaded), limit)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def after(self, skip: int) -> ArrayData:
        rest = copy.copy(self)
        rest.array = self.array[skip:]
        return rest

    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self), batch_size):
            yield np.ascontiguousarray(self.array[start : start + batch_size], dtype=np.float32)


def open_dataset(
    source: str | np.ndarray | Dataset,
    pre: Preprocess | None = None,
    limit: int | None = None,
    input_name: str | None = None,
) -> Dataset:
    """A folder of images, a ``.npy``/``.npz`` file, an array, or an existing :class:`Dataset`."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, np.ndarray):
        return ArrayData(source, limit)
    source = os.fspath(source)
    if source.endswith((".npy", ".npz")):
        return ArrayData.from_file(source, input_name, limit)
    return ImageFolder(source, pre or PRESETS["tf"], limit)


def check_shape(data: Dataset, model_shape: tuple[int | None, ...]) -> None:
    """Refuse data whose per-sample shape does not fit the model input."""
    sample = data.sample_shape()
    want = tuple(model_shape[1:])
    if len(sample) != len(want) or any(w is not None and w != s for w, s in zip(want, sample)):
        shown = ", ".join("?" if w is None else str(w) for w in want)
        raise PtqcError(f"data sample shape {tuple(sample)} does not match the model input (N, {shown})")


def read_labels(path: str) -> dict[str, int]:
    """``file index`` per line."""
    if not os.path.exists(path):
        raise PtqcError(f"labels file not found: {path}")
    labels = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise PtqcError(f"{path}:{lineno}: expected 'file index', got {line.strip()!r}")
            labels[parts[0]] = int(parts[1])
    if not labels:
        raise PtqcError(f"labels file is empty: {path}")
    return labels
