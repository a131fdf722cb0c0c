"""Data-free calibration: ranges and means from BatchNorm statistics, checked against the formulas and
against sampling, on a small graph whose BN parameters are known."""

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

import ptqc
from graphs import Builder, inputs, mobilenet_like, resnet_like
from ptqc import loader
from ptqc.annotations import ACT, BN, HIST, MEAN
from ptqc.cli import main
from ptqc.config import QuantConfig
from ptqc.data import PRESETS
from ptqc.errors import PtqcError
from ptqc.passes import calibrate_from_bn as cb
from ptqc.passes.calibrate_from_bn import CalibrateFromBnPass, clipped_normal_moments
from ptqc.passes.fold_batchnorm import FoldBatchNormPass
from ptqc.passes.gap_to_sum import GapToSumPass
from ptqc.passes.plan_quantization import PlanQuantizationPass


@pytest.mark.parametrize("mu,sd,lo,hi", [(0.3, 1.2, 0.0, None), (-0.5, 0.7, 0.0, 6.0), (2.0, 3.0, 0.0, 6.0),
                                         (0.1, 0.4, None, None), (1.0, 2.0, -1.0, 1.5)])
def test_clipped_normal_moments_match_sampling(mu, sd, lo, hi):
    rng = np.random.default_rng(0)
    s = rng.normal(mu, sd, 2_000_000)
    s = np.clip(s, -np.inf if lo is None else lo, np.inf if hi is None else hi)
    m, d = clipped_normal_moments(np.array([mu]), np.array([sd]), lo, hi)
    assert m[0] == pytest.approx(s.mean(), abs=4e-3 * sd)
    assert d[0] == pytest.approx(s.std(), rel=4e-3)


def _bn_net() -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> BN -> Clip(0, 6) -> GAP -> Flatten -> Gemm."""
    b = Builder(7)
    x = b.node("Relu", [b.bn(b.conv("input", 3, 4, bias=False), 4)])
    lo, hi = b.init("lo", np.array(0.0, np.float32)), b.init("hi", np.array(6.0, np.float32))
    x = b.node("Clip", [b.bn(b.conv(x, 4, 6, bias=False), 6), lo, hi])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    w = b.rng.normal(0, 0.3, (5, 6)).astype(np.float32)
    b.node("Gemm", [x, b.init("fcW", w), b.init("fcB", np.zeros(5, np.float32))], transB=1)
    b.nodes[-1].output[0] = "logits"
    return b.model("input", "logits", ["N", 3, 8, 8], ["N", 5])


def _calibrated(model, preset="tf"):
    irm = loader.load(model)
    ir.passes.PassManager([FoldBatchNormPass(), GapToSumPass(), PlanQuantizationPass(QuantConfig(8, 8)),
                           CalibrateFromBnPass(PRESETS[preset])])(irm)
    return irm


def test_ranges_and_means_follow_the_batchnorm_statistics():
    irm = _calibrated(_bn_net())
    convs = [n for n in irm.graph if n.op_type == "Conv"]
    assert all(BN in n.meta for n in convs)
    first, second = convs
    bn1, bn2 = first.meta[BN], second.meta[BN]
    # first activation: Relu(N(beta, gamma^2)); its top is max_c(beta + 6|gamma|), nothing below 0
    relu_out = second.inputs[0]
    h = relu_out.meta[HIST]
    assert h.max_value == pytest.approx(float(np.max(bn1.beta + cb.SIGMAS * np.abs(bn1.gamma))), rel=1e-12)
    assert h.min_value == 0.0
    # its mean, for the next layer's bias correction, is the clipped-normal mean computed by hand
    z = bn1.beta / np.abs(bn1.gamma)
    phi = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in z]))
    assert np.allclose(relu_out.meta[MEAN], bn1.beta * cdf + np.abs(bn1.gamma) * phi, rtol=1e-9)
    # second activation: Clip(0, 6) bounds the top at 6
    clip_out = next(v for n in irm.graph for v in n.outputs if ACT in v.meta and v.meta[ACT].clip_hi == 6.0)
    top = np.minimum(bn2.beta + cb.SIGMAS * np.abs(bn2.gamma), 6.0)
    assert clip_out.meta[HIST].max_value == pytest.approx(float(top.max()), rel=1e-12)
    # the input: preprocessed pixels in [-1, 1] under tf preprocessing
    inp = irm.graph.inputs[0].meta[HIST]
    assert inp.max_value == pytest.approx(1.0) and inp.min_value == pytest.approx(-1.0)
    assert np.allclose(irm.graph.inputs[0].meta[MEAN], (np.array(cb.IMAGENET_MEAN) - 127.5) / 127.5)


def test_histograms_hold_samples_for_the_low_bit_rules():
    irm = _calibrated(_bn_net())
    for v in [irm.graph.inputs[0]] + [v for n in irm.graph for v in n.outputs if ACT in v.meta]:
        h = v.meta[HIST]
        assert h.total > 10_000
        assert h.best_exponent(4, v.meta[ACT].signed) <= h.best_exponent(8, v.meta[ACT].signed) + 4


def test_model_without_batchnorm_is_refused_with_what_to_pass():
    with pytest.raises(PtqcError, match=r"BatchNormalization.*--calib"):
        ptqc.compile(mobilenet_like(), None, QuantConfig(8, 8))


def test_data_free_compile_is_close_and_says_so():
    model = resnet_like(seed=2)
    x = inputs(32, seed=3)
    result = ptqc.compile(model, None, QuantConfig(8, 8))
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta["ptqc.calib_samples"] == "0" and meta["ptqc.calibration"].startswith("data-free")
    assert meta["ptqc.config.gptq"] == "False"  # GPTQ needs data; the metadata says what ran
    from graphs import run

    fp = run(model, x)[0]
    q = run(result.model, x)[0]
    assert 10 * np.log10(np.sum(fp**2) / np.sum((fp - q) ** 2)) > 20.0


def test_data_free_cli(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(resnet_like(), str(path))
    res = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "q.onnx")])
    assert res.exit_code == 0, res.output
    assert "data-free" in res.output
    res = CliRunner().invoke(main, ["compile", str(path), "--act-search", "-o", str(tmp_path / "r.onnx")])
    assert res.exit_code == 2 and "need calibration data" in res.output
    assert not (tmp_path / "r.onnx").exists()
