"""``ptqc demo``: compile the small ResNet-style model that ships in models/ and compare it with FP32.

The model (models/shapes_resnet.onnx, trained by models/train_shapes.py) classifies 32x32 RGB images of ten
procedurally drawn shapes.  Its data is generated here from a seed, so the demo needs no download:
training used seed 0, calibration uses seed 1 and the held-out evaluation set seed 2.
"""

from __future__ import annotations

import os
import tempfile
import time
from importlib import resources

import numpy as np

CLASSES = ("disc", "square", "triangle", "plus", "h-stripes", "v-stripes", "ring", "checker", "x-cross", "diamond")
SIZE = 32
CALIB_SEED, EVAL_SEED = 1, 2


def demo_model_path() -> str:
    return str(resources.files("ptqc.models").joinpath("shapes_resnet.onnx"))


def make_shapes(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (N, 3, size, size) in [-1, 1] (pixel/127.5 - 1) and their labels 0..9."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = np.empty((n, 3, size, size), np.float32)
    labels = rng.integers(0, len(CLASSES), n)
    for i, label in enumerate(labels):
        cx, cy = rng.uniform(0.35, 0.65, 2) * size
        r = rng.uniform(0.16, 0.34) * size
        angle = rng.uniform(-0.3, 0.3)
        dx, dy = xx - cx, yy - cy
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        dist = np.sqrt(dx * dx + dy * dy)
        period = rng.uniform(4.0, 7.0)
        w = r * rng.uniform(0.25, 0.4)
        if label == 0:
            mask = dist < r
        elif label == 1:
            mask = (np.abs(u) < r * 0.85) & (np.abs(v) < r * 0.85)
        elif label == 2:
            mask = (v < r * 0.7) & (v > -r * 0.9 + 1.8 * np.abs(u))
        elif label == 3:
            mask = ((np.abs(u) < w / 2) & (np.abs(v) < r)) | ((np.abs(v) < w / 2) & (np.abs(u) < r))
        elif label == 4:
            mask = (np.sin(v * 2 * np.pi / period) > 0) & (dist < r * 1.2)
        elif label == 5:
            mask = (np.sin(u * 2 * np.pi / period) > 0) & (dist < r * 1.2)
        elif label == 6:
            mask = (dist < r) & (dist > r * 0.6)
        elif label == 7:
            mask = ((np.floor(u / period * 1.5) + np.floor(v / period * 1.5)) % 2 == 0) & (np.abs(u) < r) & (np.abs(v) < r)
        elif label == 8:
            d1, d2 = np.abs(u - v) / np.sqrt(2), np.abs(u + v) / np.sqrt(2)
            mask = ((d1 < w / 2) | (d2 < w / 2)) & (np.abs(u) < r * 0.8) & (np.abs(v) < r * 0.8)
        else:
            mask = np.abs(u) + np.abs(v) < r
        fg = rng.uniform(0, 255, 3)
        bg = rng.uniform(0, 255, 3)
        while np.abs(fg - bg).sum() < 70:
            bg = rng.uniform(0, 255, 3)
        img = np.where(mask[None], fg[:, None, None], bg[:, None, None])
        img = img + rng.normal(0, 45, img.shape)
        images[i] = np.clip(img, 0, 255) / 127.5 - 1.0
    return images, labels.astype(np.int64)


def run_demo(bits: str = "w4a4", output: str | None = None, echo=print) -> dict:
    """Compile the demo model at ``bits`` and print FP32 vs quantized accuracy on the held-out set."""
    import ptqc
    from ptqc.config import QuantConfig, parse_shorthand
    from ptqc.evaluate import evaluate_arrays
    from ptqc.inspect import inspect_model
    from ptqc.writer import save_atomic

    wb, ab = parse_shorthand(bits)
    model = demo_model_path()
    calib, _ = make_shapes(256, CALIB_SEED)
    x, y = make_shapes(2000, EVAL_SEED)
    echo(f"ptqc demo: {os.path.basename(model)}, 10 shape classes, 256 calibration / 2000 held-out images")
    start = time.perf_counter()
    result = ptqc.compile(model, calib, QuantConfig(weight_bits=wb, act_bits=ab, calib_size=256))
    seconds = time.perf_counter() - start
    if output is None:
        output = os.path.join(tempfile.mkdtemp(prefix="ptqc-demo-"), f"shapes_resnet.{bits}.ptqc.onnx")
    save_atomic(result.model, output)
    fp = evaluate_arrays(model, x, y)
    q = evaluate_arrays(output, x, y)
    report = inspect_model(result.model)
    echo(f"compiled {bits} in {seconds:.1f} s -> {output}")
    echo(f"{'model':<22}{'top-1':>8}{'top-5':>8}")
    echo(f"{'FP32':<22}{fp.top1:>7.2f}%{fp.top5:>7.2f}%")
    echo(f"{'ptqc ' + bits + ' (PoT)':<22}{q.top1:>7.2f}%{q.top5:>7.2f}%")
    verdict = "all scales 2^e, all requantizations shifts" if report.ok else "inspect found problems"
    echo(f"inspect: {verdict}")
    return {"fp32": fp.as_dict(), "quantized": q.as_dict(), "seconds": seconds, "inspect_ok": report.ok}
