"""Top-1 / top-5 accuracy of an ONNX classifier in onnxruntime, on a labelled image folder."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx

from ptqc import progress, runtime
from ptqc.data import ImageFolder, Preprocess, read_labels
from ptqc.errors import PtqcError


@dataclasses.dataclass
class Accuracy:
    top1: float
    top5: float
    n: int

    def as_dict(self) -> dict:
        return {"top1": round(self.top1, 2), "top5": round(self.top5, 2), "n": self.n}


def session(model: str | os.PathLike | onnx.ModelProto, threads: int | None = None):
    return runtime.make_session(model, threads=threads)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """Numbers of top-1 and top-5 hits."""
    top5 = np.argsort(-logits, axis=1)[:, :5]
    return int((top5[:, 0] == labels).sum()), int((top5 == labels[:, None]).any(axis=1).sum())


def evaluate_batches(sess, batches) -> Accuracy:
    name = sess.get_inputs()[0].name
    hit1 = hit5 = n = 0
    for x, y in batches:
        logits = runtime.run(sess, {name: x})[0]
        logits = logits.reshape(len(x), -1)
        h1, h5 = accuracy(logits, y)
        hit1, hit5, n = hit1 + h1, hit5 + h5, n + len(y)
    if n == 0:
        raise PtqcError("no labelled samples to evaluate")
    return Accuracy(100.0 * hit1 / n, 100.0 * hit5 / n, n)


def evaluate_folder(
    model, images: str, labels: str, pre: Preprocess, batch_size: int = 32, limit: int | None = None,
    threads: int | None = None,
) -> Accuracy:
    sess = session(model, threads)
    data = ImageFolder(images, pre, limit)
    batches = progress.batches(data.labelled_batches(batch_size, read_labels(labels)), "evaluate", len(data))
    return evaluate_batches(sess, batches)


def evaluate_arrays(model, x: np.ndarray, y: np.ndarray, batch_size: int = 64, threads: int | None = None) -> Accuracy:
    sess = session(model, threads)
    chunks = ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size))
    return evaluate_batches(sess, progress.batches(chunks, "evaluate", len(x)))


def load_labelled(images: str, labels: str, pre: Preprocess, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole labelled folder in memory (for benchmarks that evaluate many models on the same images)."""
    data = ImageFolder(images, pre, limit)
    xs, ys = zip(*data.labelled_batches(64, read_labels(labels)))
    return np.concatenate(xs), np.concatenate(ys)


