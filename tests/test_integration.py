"""Integration on the real ImageNet models, with a few images.

Data comes from ``$PTQC_SHARED`` (default: ../shared beside the repository); every test skips with the
reason when the files are absent.
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ptqc
from ptqc.data import make_preprocess
from ptqc.evaluate import evaluate_arrays, load_labelled
from ptqc.fetch import fetch_model
from ptqc.inspect import inspect_model

SHARED = os.environ.get("PTQC_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
MODELS = {"mobilenet_v2_1.0_224": "tf", "mobilenet_v1_0.75_224": "tf", "efficientnet_lite0_bn": "lite"}

pytestmark = pytest.mark.integration


def _need(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} not found (set PTQC_SHARED to the folder with models/ and imagenet/)")
    return path


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    name = request.param
    model = _need(os.path.join(SHARED, "models", f"{name}.onnx"))
    calib = _need(os.path.join(SHARED, "imagenet", "calib"))
    val = _need(os.path.join(SHARED, "imagenet", "val"))
    pre = make_preprocess(MODELS[name])
    x, y = load_labelled(val, os.path.join(val, "labels.txt"), pre, limit=100)
    q = ptqc.compile(model, calib, ptqc.QuantConfig(calib_size=32), pre).model
    return name, model, q, x, y


def test_w8a8_passes_inspect_and_keeps_accuracy(case):
    name, model, q, x, y = case
    report = inspect_model(q)
    assert report.ok, (report.problems, report.non_shift, report.float_ops)
    fp, qa = evaluate_arrays(model, x, y), evaluate_arrays(q, x, y)
    assert qa.top1 >= fp.top1 - 5.0, (name, fp, qa)


def test_w8a8_convolutions_run_in_int8_kernels(case, tmp_path):
    name, _, q, _, _ = case
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(q.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    n_conv = sum(1 for n in q.graph.node if n.op_type == "Conv")
    # every conv but the float-output classifier head is fused
    assert ops.count("QLinearConv") >= n_conv - 1, (name, ops.count("QLinearConv"), n_conv)


@pytest.mark.parametrize("bits", [(2, 4)])
def test_low_bit_compiles_and_runs(bits):
    name = "mobilenet_v2_1.0_224"
    model = _need(os.path.join(SHARED, "models", f"{name}.onnx"))
    calib = _need(os.path.join(SHARED, "imagenet", "calib"))
    # a few block steps exercise the pass; accuracy is the benchmark's job
    q = ptqc.compile(model, calib, ptqc.QuantConfig(*bits, calib_size=16, block_iters=10), make_preprocess("tf")).model
    assert inspect_model(q).ok
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": np.zeros((2, 3, 224, 224), np.float32)})[0]
    assert out.shape == (2, 1000) and np.all(np.isfinite(out))


def test_manifest_checksums_match_the_real_files(tmp_path):
    for name in MODELS:
        path = fetch_model(name, source=_need(os.path.join(SHARED, "models", f"{name}.onnx")), cache_dir=str(tmp_path))
        assert os.path.getsize(path) > 1_000_000
