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
from ptqc.quant import WEIGHT_OFFSETS
from ptqc.data import Dataset, Preprocess, check_shape, open_dataset
from ptqc.passes.absorb_clip_range import AbsorbClipRangePass
from ptqc.passes.adaround_layers import AdaRoundLayersPass
from ptqc.passes.bias_correction import BiasCorrectionPass
from ptqc.passes.calibrate import CalibratePass
from ptqc.passes.calibrate_from_bn import CalibrateFromBnPass
from ptqc.passes.compensate_remainders import CompensateRemaindersPass
from ptqc.passes.emit_qdq import EmitQdqPass
from ptqc.passes.equalize_channels import EqualizeChannelsPass
from ptqc.passes.equalize_residual_stream import EqualizeResidualStreamPass
from ptqc.passes.fold_batchnorm import FoldBatchNormPass
from ptqc.passes.gap_to_sum import GapToSumPass
from ptqc.passes.learn_act_borders import LearnActBordersPass
from ptqc.passes.learn_clip_ranges import LearnClipRangesPass
from ptqc.passes.gptq_rounding import GptqRoundingPass
from ptqc.passes.legalize_scales import LegalizeScalesPass
from ptqc.passes.plan_quantization import PlanQuantizationPass
from ptqc.passes.pot_scales import PotScalesPass
from ptqc.passes.reconstruct_blocks import ReconstructBlocksPass
from ptqc.passes.reconstruct_layers import ReconstructLayersPass
from ptqc.passes.refit_head import RefitHeadPass
from ptqc.passes.search_act_exponents import SearchActExponentsPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CompileResult:
    model: onnx.ModelProto
    #: seconds spent in each pass
    timings: dict[str, float]
    #: calibration samples used (0: data-free, from BatchNorm statistics)
    calib_samples: int
    #: the per-layer error report (``ptqc.report.Report``), when ``report_samples`` was given
    report: object | None = None


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


def build_passes(config: QuantConfig, data: Dataset | None, preprocess: Preprocess | None = None) -> list[ir.passes.PassBase]:
    """The pass list, in pipeline order; ``data=None`` calibrates from BatchNorm statistics instead."""
    if data is None:
        config = data_free_config(config)
    float_gptq = config.use_gptq and config.gptq_target == "float"
    # sequential reconstruction sets each layer's bias itself, so it replaces the bias correction pass
    sequential = config.use_gptq and config.gptq_target != "float"
    calibrate = (CalibrateFromBnPass(preprocess or Preprocess()) if data is None else
                 CalibratePass(data, config.batch_size, config.moment_samples if float_gptq else 0, config.act_method))
    return [
        FoldBatchNormPass(),
        GapToSumPass(),
        PlanQuantizationPass(config),
        *([EqualizeResidualStreamPass(data, config.batch_size)]
          if config.use_equalize_residual and data is not None else []),
        calibrate,
        *([EqualizeChannelsPass(data, config.batch_size)] if config.use_equalize_channels and data is not None else []),
        *([LearnClipRangesPass(data, config.batch_size)]
          if config.use_learn_clip and config.absorb_clip and config.continuous_clip and data is not None else []),
        *([AbsorbClipRangePass(config.act_method, config.continuous_clip)] if config.absorb_clip else []),
        PotScalesPass(config.act_method, WEIGHT_OFFSETS, config.weight_offset_bits),
        *([GptqRoundingPass()] if float_gptq else []),
        *([ReconstructLayersPass(data, config.batch_size, config.moment_samples, config.gptq_target)] if sequential else []),
        *([BiasCorrectionPass()] if config.bias_correction and not sequential else []),
        *([AdaRoundLayersPass(data, config.batch_size, config.adaround_samples, config.adaround_iters,
                                outside_blocks=config.adaround_outside_blocks)]
          if config.use_adaround else []),
        *([ReconstructBlocksPass(data, config.batch_size, config.recon_samples, config.recon_iters,
                                 learn_8bit=config.block_recon_8bit, freeze=config.recon_freeze,
                                 borders=config.act_borders)]
          if config.use_block_recon else []),
        *([SearchActExponentsPass(data, config.batch_size, config.search_samples)] if config.use_search else []),
        LegalizeScalesPass(),
        *([LearnActBordersPass(data, config.batch_size, config.border_samples)]
          if config.act_borders and not config.use_block_recon and data is not None else []),
        *([CompensateRemaindersPass(data, config.arcq, samples=config.arcq_samples)] if config.arcq and data is not None
          else []),
        *([RefitHeadPass(data, config.batch_size)] if config.use_refit_head and data is not None else []),
        EmitQdqPass(config.rounding),
    ]


def data_free_config(config: QuantConfig) -> QuantConfig:
    """The settings a data-free compile runs with: GPTQ needs input second moments, which BatchNorm statistics
    do not give, so weights are rounded to nearest (then bias-corrected with the propagated means)."""
    if (config.gptq_target != "float" or config.act_search or config.adaround or config.block_recon or config.learn_clip
            or config.act_borders or config.refit_head or config.arcq):
        raise PtqcError("--gptq-target asym/qdrop, --act-search, --adaround, --block-recon, --learn-clip, "
                        "--act-borders, --refit-head and --arcq need calibration data; pass --calib")
    if config.gptq:
        logger.warning("data-free: GPTQ needs calibration data; weights are rounded to nearest")
    return dataclasses.replace(config, gptq=False, adaround=False, block_recon=False, learn_clip=False, refit_head=False)


def compile(
    model: str | os.PathLike | onnx.ModelProto,
    calib: str | np.ndarray | Dataset | None = None,
    config: QuantConfig | None = None,
    preprocess: Preprocess | None = None,
    report_samples: int = 0,
) -> CompileResult:
    """Quantize ``model`` with power-of-two scales, calibrating on ``calib``; returns the QDQ model.

    ``calib=None`` is data-free: activation ranges come from the model's BatchNorm statistics (a model
    without BatchNorm is refused), with ``preprocess`` giving the input range.  ``report_samples > 0`` also
    measures the per-layer error report on that many calibration samples (``result.report``).
    """
    config = config or QuantConfig()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    irm = loader.load(model)
    timings["load"] = time.perf_counter() - start
    input_name, input_shape = loader.input_spec(irm)
    data = None
    if calib is not None:
        data = open_dataset(calib, preprocess, limit=config.calib_size, input_name=input_name)
        check_shape(data, input_shape)
    else:
        if report_samples:
            raise PtqcError("the report needs data to measure on; pass calib")
        config = data_free_config(config)
    manager = ir.passes.PassManager([_Timed(p, timings) for p in build_passes(config, data, preprocess)])
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
    irm.metadata_props["ptqc.calibration"] = ("data-free: activation ranges from BatchNorm statistics"
                                              if data is None else f"{samples} samples")
    if preprocess is not None:
        irm.metadata_props["ptqc.preprocess"] = repr(preprocess)
    proto = writer.to_proto(irm)
    proto.producer_name = "ptqc"
    proto.producer_version = ptqc.__version__
    timings["total"] = time.perf_counter() - start
    result = CompileResult(proto, timings, samples)
    if report_samples:
        from ptqc import report

        begin = time.perf_counter()
        n = min(report_samples, len(data))
        result.report = report.analyse(model, proto, data, samples=report_samples, measured_on=(
            f"the first {n} of the {samples} calibration samples: the model was fitted to them, so the figures "
            "are better than on unseen data (ptqc.report.measurement_data gives held-out samples)"))
        timings["report"] = time.perf_counter() - begin
    return result
