"""``ptqc sensitivity``: which layers lose the most when quantized to the low bit width, one at a time.

Each weighted layer in turn is compiled at the low bit width (its weights and its input activation), with
every other layer at 8 bits, the near-lossless baseline that per-layer analyses in AIMET and Quark also use.
Each result is scored against FP32 on held-out samples: logit SNR in dB, and top-1 when labels are given.
The ranking puts the most sensitive layer first. Run ``--bits NAME=8`` on those layers to keep them at 8 bits.
The compiles leave AdaRound off unless it was asked for (:meth:`QuantConfig.for_trials`): one per layer at
minutes each would turn a run of minutes into hours.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx

from ptqc import progress, runtime
from ptqc.config import QuantConfig
from ptqc.data import Dataset

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerScore:
    name: str
    op: str
    #: logit SNR (dB) of the model with only this layer at the low bit width
    snr_db: float
    #: top-1 agreement with FP32 (%), and top-1 accuracy when labels were given
    agreement: float
    top1: float | None = None


@dataclasses.dataclass
class Sensitivity:
    baseline_snr_db: float  # all layers 8-bit
    low_snr_db: float  # all layers at the low bit width
    layers: list[LayerScore]  # most sensitive first

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def logit_snr(fp: np.ndarray, q: np.ndarray) -> float:
    """10 log10(sum fp^2 / sum (fp - q)^2); infinite when equal."""
    fp64, q64 = fp.astype(np.float64), q.astype(np.float64)
    noise = float(np.sum((fp64 - q64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(float(np.sum(fp64**2)) / noise)


def layer_names(model: str | onnx.ModelProto) -> list[tuple[str, str]]:
    """(name, op) of every layer ptqc quantizes, in graph order, as the compiler names them."""
    import onnx_ir as ir

    from ptqc import loader
    from ptqc.passes.fold_batchnorm import FoldBatchNormPass
    from ptqc.passes.gap_to_sum import GapToSumPass
    from ptqc.passes.plan_quantization import weight_axis

    irm = loader.load(model)
    ir.passes.PassManager([FoldBatchNormPass(), GapToSumPass()])(irm)
    return [(n.name, n.op_type) for n in irm.graph if weight_axis(n) is not None]


def analyse(model: str, calib, config: QuantConfig, held_out: np.ndarray, labels: np.ndarray | None = None,
            preprocess=None) -> Sensitivity:
    """Score every layer of ``model`` at ``config``'s bit widths, alone, against FP32 on ``held_out``."""
    import ptqc

    def logits(m) -> np.ndarray:
        return runtime.outputs_in_batches(m, held_out)

    fp = logits(model)
    config = config.for_trials()

    def score(cfg: QuantConfig) -> tuple[float, float, float | None]:
        q = logits(ptqc.compile(model, calib, cfg, preprocess).model)
        top1 = None if labels is None else 100.0 * float(np.mean(q.argmax(1) == labels))
        return logit_snr(fp, q), 100.0 * float(np.mean(q.argmax(1) == fp.argmax(1))), top1

    base = dataclasses.replace(config, weight_bits=8, act_bits=8, layer_bits={})
    baseline = score(base)[0]
    low = score(dataclasses.replace(config, layer_bits={}))[0]
    scores = []
    for name, op in progress.steps(layer_names(model), "sensitivity", unit="layer"):
        snr, agree, top1 = score(dataclasses.replace(base, layer_bits={name: f"w{config.weight_bits}a{config.act_bits}"}))
        scores.append(LayerScore(name, op, snr, agree, top1))
    scores.sort(key=lambda s: s.snr_db)
    return Sensitivity(baseline, low, scores)


def held_out_from(data: Dataset, count: int) -> np.ndarray:
    """The first ``count`` samples of ``data`` as one array."""
    out, seen = [], 0
    for batch in data.batches(32):
        out.append(batch[: count - seen])
        seen += len(out[-1])
        if seen >= count:
            break
    return np.concatenate(out)
