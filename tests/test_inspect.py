"""``ptqc inspect`` fails where the integer claim does not hold, and says where."""

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import numpy_helper

import ptqc
from graphs import Builder, inputs, resnet_like
from ptqc.cli import main
from ptqc.inspect import format_table, inspect_model

CALIB = inputs(32, seed=5)


def _compile(model, size=16):
    return ptqc.compile(model, inputs(32, size=size, seed=5), ptqc.QuantConfig(calib_size=32)).model


def test_non_power_of_two_scale_fails(tmp_path):
    q = _compile(resnet_like())
    scale = next(i for i in q.graph.initializer if i.name.endswith("_scale") and not i.dims)
    scale.CopyFrom(numpy_helper.from_array(np.array(0.3, np.float32), scale.name))
    report = inspect_model(q)
    assert not report.ok and any("not a power of two" in p for p in report.problems)
    path = tmp_path / "bad.onnx"
    onnx.save(q, str(path))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and "PROBLEM" in result.output and "FAIL" in result.output


def test_weight_outside_declared_bits_fails():
    q = ptqc.compile(resnet_like(), CALIB, ptqc.QuantConfig(weight_bits=4, act_bits=8, calib_size=32)).model
    inits = {i.name: i for i in q.graph.initializer}
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear"
              and any(p.key == "ptqc.bits" and p.value == "4" for p in n.metadata_props) and n.input[0] in inits)
    w = numpy_helper.to_array(inits[dq.input[0]]).copy()
    w.flat[0] = 7  # a 4-bit signed weight is at most 7; 7 is fine, 8+ is not
    w.flat[1] = 100
    inits[dq.input[0]].CopyFrom(numpy_helper.from_array(w, dq.input[0]))
    report = inspect_model(q)
    assert any("exceed the declared 4-bit range" in p for p in report.problems)


def test_weight_grid_offsets_are_declared_and_checked():
    """At 2 bits the inner layers get per-channel grid offsets: the file declares them per channel, every
    scale is still 2^e, inspect passes, and an even code in a midrise (z = 1/2) row fails it."""
    q = ptqc.compile(resnet_like(), CALIB, ptqc.QuantConfig(weight_bits=2, act_bits=4, calib_size=32)).model
    report = inspect_model(q)
    assert report.ok and "per-channel weight grid offsets" in format_table(report)
    assert {r.w_bits for r in report.rows if r.op == "Conv"} == {"2+zp", "7"}  # the first layer: plain pair-safe grid
    inits = {i.name: i for i in q.graph.initializer}
    offset_dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"
                  and any(p.key == "ptqc.offset" for p in n.metadata_props)]
    assert offset_dqs and all(
        next(p.value for p in n.metadata_props if p.key == "ptqc.bits") == "2" for n in offset_dqs)
    for dq in offset_dqs:
        z = np.array([float(t) for t in next(p.value for p in dq.metadata_props if p.key == "ptqc.offset").split()])
        w = numpy_helper.to_array(inits[dq.input[0]])
        half = np.mod(z, 1) != 0
        assert np.all(w[half] % 2 == 1) and np.all(np.abs(w[half]) <= 3)  # 2(k + z) for k in [-2, 1]
        assert np.all((w[~half] >= -2 + z[~half, None, None, None]) & (w[~half] <= 1 + z[~half, None, None, None]))
    dq = next(n for n in offset_dqs
              if "0.5" in next(p.value for p in n.metadata_props if p.key == "ptqc.offset").split())
    z = [float(t) for t in next(p.value for p in dq.metadata_props if p.key == "ptqc.offset").split()]
    w = numpy_helper.to_array(inits[dq.input[0]]).copy()
    w[z.index(0.5)].flat[0] = 2
    inits[dq.input[0]].CopyFrom(numpy_helper.from_array(w, dq.input[0]))
    report = inspect_model(q)
    assert any("off the declared 2-bit grids" in p for p in report.problems)


def test_average_pool_over_49_positions_is_not_a_shift():
    b = Builder(2)
    x = b.node("Relu", [b.conv("input", 3, 8, stride=2)])
    y = b.node("Relu", [b.node("GlobalAveragePool", [x])])  # not a linear consumer: stays an average
    model = b.model("input", y, ["N", 3, 14, 14], ["N", 8, 1, 1])
    report = inspect_model(_compile(model, 14))
    assert not report.ok
    assert any("divides by 49" in m for m in report.non_shift)


def test_float_op_between_quantized_layers_is_reported():
    b = Builder(3)
    x = b.node("Sigmoid", [b.node("Relu", [b.conv("input", 3, 4)])])
    y = b.conv(x, 4, 4)
    model = b.model("input", y, ["N", 3, 8, 8], ["N", 4, 8, 8])
    report = inspect_model(_compile(model, 8))
    assert any("Sigmoid" in m for m in report.float_ops)
    assert not report.ok
