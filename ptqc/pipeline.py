"""The compile pipeline: load, run the passes in order over one IR model, return the QDQ model.

``compile`` is the Python API; the ``ptqc compile`` command is a thin layer over it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np
import onnx
import onnx_ir as ir

import ptqc
from ptqc import loader, writer
from ptqc.config import QuantConfig
from ptqc.errors import PtqcError
from ptqc.data import Dataset, Preprocess, check_shape, open_dataset
from ptqc.passes.absorb_clip_range import AbsorbClipRangePass
from ptqc.passes.bias_correction import BiasCorrectionPass
from ptqc.passes.calibrate import CalibratePass
from ptqc.passes.emit_qdq import EmitQdqPass
from ptqc.passes.fold_batchnorm import FoldBatchNormPass
from ptqc.passes.gap_to_sum import GapToSumPass
from ptqc.passes.gptq_rounding import GptqRoundingPass
from ptqc.passes.legalize_scales import LegalizeScalesPass
from ptqc.passes.plan_quantization import PlanQuantizationPass
from ptqc.passes.pot_scales import PotScalesPass
from ptqc.passes.reconstruct_layers import ReconstructLayersPass
from ptqc.passes.search_act_exponents import SearchActExponentsPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CompileResult:
    model: onnx.ModelProto
    #: seconds spent in each pass
    timings: dict[str, float]
    calib_samples: int


class _Timed(ir.passes.InPlacePass):
    """Wraps a pass and records how long it took."""

    def __init__(self, inner: ir.passes.PassBase, timings: dict[str, float]):
        super().__init__()
        self.inner = inner
        self.timings = timings

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = time.perf_counter()
        result = self.inner(model)
        self.timings[type(self.inner).__name__] = time.perf_counter() - start
        return result


def _unwrap(exc: BaseException) -> BaseException:
    """The error inside the pass framework's PassError wrapping: a PtqcError if there is one, else the
    innermost exception (a bug, whose traceback should reach the user's report intact)."""
    cause: BaseException | None = exc
    innermost = exc
    while cause is not None:
        if isinstance(cause, PtqcError):
            return cause
        if not isinstance(cause, ir.passes.PassError):
            innermost = cause
        cause = cause.__cause__ or cause.__context__
    return innermost


def build_passes(config: QuantConfig, data: Dataset) -> list[ir.passes.PassBase]:
    """The pass list, in pipeline order."""
    float_gptq = config.use_gptq and config.gptq_target == "float"
    # sequential reconstruction sets each layer's bias itself, so it replaces the bias correction pass
    sequential = config.use_gptq and config.gptq_target != "float"
    return [
        FoldBatchNormPass(),
        GapToSumPass(),
        PlanQuantizationPass(config),
        CalibratePass(data, config.batch_size, config.moment_samples if float_gptq else 0, config.act_method),
        *([AbsorbClipRangePass(config.act_method, config.continuous_clip)] if config.absorb_clip else []),
        PotScalesPass(config.act_method),
        *([GptqRoundingPass()] if float_gptq else []),
        *([ReconstructLayersPass(data, config.batch_size, config.moment_samples, config.gptq_target)] if sequential else []),
        *([BiasCorrectionPass()] if config.bias_correction and not sequential else []),
        *([SearchActExponentsPass(data, config.batch_size, config.search_samples)] if config.use_search else []),
        LegalizeScalesPass(),
        EmitQdqPass(config.rounding),
    ]


def compile(
    model: str | os.PathLike | onnx.ModelProto,
    calib: str | np.ndarray | Dataset,
    config: QuantConfig | None = None,
    preprocess: Preprocess | None = None,
) -> CompileResult:
    """Quantize ``model`` with power-of-two scales, calibrating on ``calib``; returns the QDQ model."""
    config = config or QuantConfig()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    irm = loader.load(model)
    timings["load"] = time.perf_counter() - start
    input_name, input_shape = loader.input_spec(irm)
    data = open_dataset(calib, preprocess, limit=config.calib_size, input_name=input_name)
    check_shape(data, input_shape)
    manager = ir.passes.PassManager([_Timed(p, timings) for p in build_passes(config, data)])
    try:
        manager(irm)
    except ir.passes.PassError as exc:
        inner = _unwrap(exc)
        if isinstance(inner, PtqcError):
            raise inner from None
        raise inner
    samples = int(irm.graph.meta.get("ptqc.calib_samples", 0))
    irm.metadata_props.update(config.as_metadata())
    irm.metadata_props["ptqc.version"] = ptqc.__version__
    irm.metadata_props["ptqc.calib_samples"] = str(samples)
    if preprocess is not None:
        irm.metadata_props["ptqc.preprocess"] = repr(preprocess)
    proto = writer.to_proto(irm)
    proto.producer_name = "ptqc"
    proto.producer_version = ptqc.__version__
    timings["total"] = time.perf_counter() - start
    return CompileResult(proto, timings, samples)
