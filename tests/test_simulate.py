"""The float simulation of the quantized model agrees with the emitted QDQ graph."""

import numpy as np
import onnxruntime as ort

import ptqc
from graphs import inputs, mobilenet_like, resnet_like, strided_residual
from ptqc import loader
from ptqc.data import ArrayData
from ptqc.pipeline import build_passes
from ptqc.simulate import build, scale_feed


def _annotated(model, cfg, calib):
    irm = loader.load(model)
    passes = build_passes(cfg, ArrayData(calib))
    for p in passes[:-1]:  # everything but the writer
        p(irm)
    return irm


def _run(proto, feed):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_simulation_matches_the_emitted_model():
    # strided_residual has a Conv without a bias input, which gets one from bias correction
    for model, cfg, size in ((resnet_like(), ptqc.QuantConfig(4, 4, calib_size=32), 16),
                             (mobilenet_like(), ptqc.QuantConfig(8, 8, calib_size=32), 16),
                             (strided_residual(), ptqc.QuantConfig(4, 4, calib_size=32, adaround=False,
                                                                   block_recon=False), 15)):
        calib, x = inputs(32, size=size, seed=1), inputs(16, size=size, seed=2)
        emitted = ptqc.compile(model, calib, cfg).model
        irm = _annotated(model, cfg, calib)
        ref = _run(emitted, {"input": x})
        fixed = build(irm)
        np.testing.assert_allclose(_run(fixed.proto, {"input": x}), ref, rtol=1e-4, atol=1e-4)
        sim = build(irm, scale_inputs=True)
        out = _run(sim.proto, {"input": x, **scale_feed(irm, sim)})
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        # another exponent for one tensor changes the output
        name = next(iter(sim.scale_inputs))
        other = _run(sim.proto, {"input": x, **scale_feed(irm, sim, {name: -12})})
        assert not np.allclose(other, ref)
