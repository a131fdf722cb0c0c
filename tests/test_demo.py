"""The embedded demo model and ``ptqc demo``."""

import os

import numpy as np
from click.testing import CliRunner

from ptqc.cli import main
from ptqc.demo import demo_model_path, make_shapes, run_demo
from ptqc.evaluate import evaluate_arrays
from ptqc.loader import read_model


def test_demo_model_ships_with_the_ops_it_promises():
    ops = {n.op_type for n in read_model(demo_model_path()).graph.node}
    assert {"Conv", "BatchNormalization", "Relu", "Add", "MaxPool", "GlobalAveragePool", "Gemm"} <= ops


def test_generated_data_is_deterministic_and_held_out_differs():
    a, ya = make_shapes(8, 2)
    b, yb = make_shapes(8, 2)
    c, _ = make_shapes(8, 1)
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and not np.array_equal(a, c)


def test_demo_model_is_accurate_in_fp32():
    x, y = make_shapes(500, 2)
    assert evaluate_arrays(demo_model_path(), x, y).top1 > 90.0


def test_demo_w8a8_is_close_and_passes_inspect(tmp_path):
    out = tmp_path / "demo.onnx"
    res = run_demo("w8a8", str(out), echo=lambda *_: None)
    assert os.path.exists(out) and res["inspect_ok"]
    assert res["quantized"]["top1"] >= res["fp32"]["top1"] - 1.0


def test_demo_cli_prints_both_accuracies(tmp_path):
    result = CliRunner().invoke(main, ["-q", "demo", "--bits", "w4a4", "-o", str(tmp_path / "d.onnx")])
    assert result.exit_code == 0, result.output
    assert "FP32" in result.output and "ptqc w4a4" in result.output
