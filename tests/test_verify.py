"""The integer reference: shift rounding, bit-exact agreement with onnxruntime, export round trip, and the
hand-made failures verify must catch (a corrupted weight, a non-power-of-two scale, an overflow)."""

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import ptqc
from graphs import inputs, mobilenet_like, resnet_like
from ptqc.cli import main
from ptqc.intexec import Executor, shift_round
from ptqc.intprog import INT32_MAX, Program, accumulator_bounds, lower
from ptqc.verify import verify

CALIB = inputs(32, seed=5)
X = inputs(16, seed=11)


def _compile(model, wb, ab, rounding="half-even"):
    cfg = ptqc.QuantConfig(weight_bits=wb, act_bits=ab, calib_size=32, rounding=rounding)
    return ptqc.compile(model, CALIB, cfg).model


@pytest.fixture(scope="module")
def resnet_w4a4_up():
    return _compile(resnet_like(3), 4, 4, "half-up")


def test_shift_round_ties_and_left_shifts():
    acc = np.array([-7, -3, -2, -1, 1, 2, 3, 5, 7])
    # acc / 2: -3.5 -1.5 -1 -0.5 0.5 1 1.5 2.5 3.5
    assert shift_round(acc, -1, "half-even").tolist() == [-4, -2, -1, 0, 0, 1, 2, 2, 4]
    assert shift_round(acc, -1, "half-up").tolist() == [-3, -1, -1, 0, 1, 1, 2, 3, 4]
    # acc / 4 with a non-tie below and above the half
    assert shift_round(np.array([5, 6, 7, -5, -6, -7]), -2, "half-up").tolist() == [1, 2, 2, -1, -1, -2]
    assert shift_round(np.array([5, 6, 7, -5, -6, -7]), -2, "half-even").tolist() == [1, 2, 2, -1, -2, -2]
    assert shift_round(np.array([3, -3]), 2, "half-even").tolist() == [12, -12]
    # per-channel shifts broadcast
    assert shift_round(np.array([[6, 6]]), np.array([[-2, 1]]), "half-up").tolist() == [[2, 12]]


@pytest.mark.parametrize("builder", [resnet_like, mobilenet_like])
@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (2, 4)])
@pytest.mark.parametrize("rounding", ["half-even", "half-up"])
def test_reference_is_bit_exact_with_onnxruntime(builder, bits, rounding):
    model = _compile(builder(1), *bits, rounding)
    report = verify(model, X)
    assert report.ok, (report.mismatch, report.errors)
    assert report.samples == len(X) and report.tensors >= 5 and report.compared_values > 10_000
    assert report.float_outputs and max(report.float_outputs.values()) == 0.0


def test_half_up_graph_really_differs_from_half_even(resnet_w4a4_up):
    """Ties occur (scales are powers of two), so reading the half-up graph with the half-even rule fails:
    the rounding Adds are doing real work and verify would notice a wrong rule."""
    program = lower(resnet_w4a4_up)
    assert program.rounding == "half-up"
    program.rounding = "half-even"
    report = verify(resnet_w4a4_up, X, program)
    assert report.mismatch is not None


def test_export_round_trip_runs_the_same(tmp_path, resnet_w4a4_up):
    onnx.save(resnet_w4a4_up, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["export-int", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "int")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "int" / "program.json").read_text())
    assert manifest["format"] == "ptqc-int/1" and manifest["rounding"] == "half-up"
    conv = next(s for s in manifest["steps"] if s["op"] == "Conv")
    assert conv["attrs"]["weight_bits"] == 7 and "w" in conv["consts"]  # first layer: 8-bit policy, pair-safe grid
    loaded = Program.load(str(tmp_path / "int"))
    direct = lower(resnet_w4a4_up)
    a = Executor(loaded).run({"input": X}).values
    b = Executor(direct).run({"input": X}).values
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "m.onnx"), "--program", str(tmp_path / "int"), "--count", "4"])
    assert res.exit_code == 0 and "PASS" in res.output, res.output


def test_corrupted_exported_weight_is_caught_at_its_layer(tmp_path, resnet_w4a4_up):
    program = lower(resnet_w4a4_up)
    program.save(str(tmp_path / "int"))
    path = tmp_path / "int" / "arrays.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    step = next(s for s in program.steps if s.op == "Conv")
    w = arrays[step.consts["w"]]
    w.reshape(-1)[0] = 7 if w.reshape(-1)[0] != 7 else -7
    np.savez(path, **arrays)
    onnx.save(resnet_w4a4_up, tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "m.onnx"), "--program", str(tmp_path / "int"), "--count", "8"])
    assert res.exit_code == 1
    assert f"tensor {step.output} differs at index" in res.output, res.output


def _set_init(model, name, arr):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, init in enumerate(m.graph.initializer):
        if init.name == name:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, name))
    return m


def test_non_power_of_two_scale_is_named(tmp_path):
    model = _compile(resnet_like(2), 8, 8)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] != "input")
    scale = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == q.input[1])
    bad = _set_init(model, q.input[1], (scale * 1.5).astype(np.float32))
    onnx.save(bad, tmp_path / "bad.onnx")
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "bad.onnx"), "--count", "4"])
    assert res.exit_code == 1
    assert "is not a power of two" in res.output and (q.name in res.output or q.input[0] in res.output), res.output


def test_weight_outside_its_bit_width_is_named():
    model = _compile(resnet_like(2), 4, 8)
    wdq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(p.key == "ptqc.bits" and p.value == "4" for p in n.metadata_props) and "_W" in n.input[0])
    codes = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == wdq.input[0]).copy()
    codes.reshape(-1)[3] = 100
    report = verify(_set_init(model, wdq.input[0], codes), X)
    assert not report.ok and "outside the declared 4-bit range" in report.errors[0]


def test_accumulator_overflow_is_reported_statically_and_on_data():
    model = _compile(resnet_like(2), 8, 8)
    program = lower(model)
    step = next(s for s in program.steps if s.op == "Conv" and "b" in s.consts)
    bdq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in
               {i for node in model.graph.node if node.name == step.name for i in node.input[2:]})
    b = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == bdq.input[0]).copy()
    b[:] = INT32_MAX - 10  # any positive product now overflows int32
    bad = _set_init(model, bdq.input[0], b)
    bounds = {bd.step: bd for bd in accumulator_bounds(lower(bad))}
    assert bounds[step.name].worst > INT32_MAX and bounds[step.name].bits > 32
    report = verify(bad, X)
    assert not report.ok
    assert any(step.name in e and "overflows int32" in e for e in report.errors)
    assert any(step.name in e and "int32 accumulator overflow at index" in e for e in report.errors)


def test_verify_cli_on_images_and_json(tmp_path, resnet_w4a4_up):
    onnx.save(resnet_w4a4_up, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", X)
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npy"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["ok"] and d["samples"] == 16 and d["rounding"] == "half-up"


def test_export_refuses_a_foreign_folder_and_leaves_no_temp(tmp_path, resnet_w4a4_up):
    onnx.save(resnet_w4a4_up, tmp_path / "m.onnx")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    res = CliRunner().invoke(main, ["export-int", str(tmp_path / "m.onnx"), "-o", str(other)])
    assert res.exit_code == 2 and res.output.startswith("error:")
    assert (other / "keep.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".ptqc-export-")]


def test_half_up_offsets_are_declared_by_inspect(resnet_w4a4_up):
    from ptqc.inspect import inspect_model

    report = inspect_model(resnet_w4a4_up)
    adds = [n for n in resnet_w4a4_up.graph.node if any(p.key == "ptqc.role" and p.value == "rounding" for p in n.metadata_props)]
    assert report.ok and len(adds) >= 4
    assert report.extra_ops["Add (half-up rounding offset)"] == len(adds)
    meta = {p.key: p.value for p in resnet_w4a4_up.metadata_props}
    assert meta["ptqc.rounding"] == meta["ptqc.config.rounding"] == "half-up"


def test_first_layer_is_pair_safe_so_fused_onnxruntime_is_exact_too():
    """The first layer reads a signed 8-bit input (uint8 codes around 128): its weights stay within +-64, so
    onnxruntime's u8 x s8 int16 pair sums cannot saturate and its fused QLinearConv computes the integer
    result too (on CPUs with VNNI this holds anyway)."""
    model = _compile(resnet_like(4), 4, 4)
    program = lower(model)
    first = next(s for s in program.steps if s.op == "Conv")
    w = program.arrays[first.consts["w"]]
    assert first.attrs["weight_bits"] == 7 and w.min() >= -64 and w.max() <= 63
    x = np.clip(np.random.default_rng(3).normal(0, 0.9, (16, 3, 16, 16)), -1, 1).astype(np.float32)
    report = verify(model, x, fuse=True)
    assert report.ok, (report.mismatch, report.errors)
    assert not any(first.name in w for w in report.warnings)
