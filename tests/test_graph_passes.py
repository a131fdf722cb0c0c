"""Graph rewrites are exact: BatchNorm folding, BN without a producer, GlobalAveragePool -> sum."""

import numpy as np
import onnx

from graphs import Builder, inputs, resnet_like, run
from ptqc import loader
from ptqc.annotations import BN
from ptqc.passes.fold_batchnorm import FoldBatchNormPass
from ptqc.passes.gap_to_sum import GapToSumPass
from ptqc.writer import to_proto


def _apply(model, *passes):
    irm = loader.load(model)
    for p in passes:
        p(irm)
    return irm, to_proto(irm)


def test_batchnorm_folding_is_exact_and_keeps_statistics():
    model = resnet_like()
    irm, folded = _apply(model, FoldBatchNormPass())
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    stats = [n.meta[BN] for n in irm.graph if BN in n.meta]
    assert len(stats) == 3 and all(s.gamma.shape == s.beta.shape for s in stats)
    x = inputs()
    np.testing.assert_allclose(run(folded, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-5)


def test_batchnorm_without_producer_becomes_depthwise_conv():
    b = Builder(3)
    y = b.node("Relu", [b.bn("input", 3)])
    model = b.model("input", y, ["N", 3, 8, 8], ["N", 3, 8, 8])
    _, out = _apply(model, FoldBatchNormPass())
    ops = [n.op_type for n in out.graph.node]
    assert "BatchNormalization" not in ops and "Conv" in ops
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert onnx.helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 3
    x = inputs(size=8)
    np.testing.assert_allclose(run(out, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-6)
    assert out.graph.output[0].name == model.graph.output[0].name


def test_gap_feeding_gemm_becomes_sum_with_folded_weights():
    model = resnet_like(1)
    _, out = _apply(model, FoldBatchNormPass(), GapToSumPass())
    ops = [n.op_type for n in out.graph.node]
    assert "GlobalAveragePool" not in ops and "ReduceSum" in ops
    x = inputs()
    np.testing.assert_allclose(run(out, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-5)


def test_gap_not_feeding_a_linear_layer_is_kept():
    b = Builder(4)
    y = b.node("GlobalAveragePool", [b.node("Relu", [b.conv("input", 3, 4)])])
    y = b.node("Relu", [y])
    model = b.model("input", y, ["N", 3, 8, 8], ["N", 3, 8, 8])
    _, out = _apply(model, GapToSumPass())
    assert "GlobalAveragePool" in [n.op_type for n in out.graph.node]


def test_calibration_statistics_do_not_depend_on_the_batch_split():
    """A short last batch is padded for onnxruntime; the padding must not enter the statistics."""
    from ptqc.annotations import ACT, HIST, MEAN
    from ptqc.config import QuantConfig
    from ptqc.data import ArrayData
    from ptqc.passes.calibrate import CalibratePass
    from ptqc.passes.plan_quantization import PlanQuantizationPass

    x = inputs(30, seed=3)
    stats = []
    for batch in (16, 30, 7):
        irm = loader.load(resnet_like())
        FoldBatchNormPass()(irm)
        PlanQuantizationPass(QuantConfig(act_bits=4))(irm)
        CalibratePass(ArrayData(x), batch_size=batch)(irm)
        values = [v for n in irm.graph for v in n.outputs if ACT in v.meta]
        stats.append({v.name: (v.meta[HIST].counts.copy(), v.meta[HIST].max_value, v.meta.get(MEAN)) for v in values})
    assert sum(int(c.sum()) for c, _, _ in stats[0].values()) > 0  # the 4-bit tensors were binned
    for other in stats[1:]:
        for name, (counts, mx, mean) in stats[0].items():
            assert np.array_equal(counts, other[name][0]) and mx == other[name][1]
            if mean is not None:
                np.testing.assert_allclose(mean, other[name][2], rtol=1e-9)
