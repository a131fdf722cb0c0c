"""The float simulation of the quantized model agrees with the emitted QDQ graph, and its parts with the whole."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

import ptqc
from graphs import inputs, mobilenet_like, resnet_like, strided_residual
from ptqc import loader
from ptqc.annotations import WEIGHT
from ptqc.data import ArrayData
from ptqc.pipeline import build_passes
from ptqc.passes.calibrate import float_session
from ptqc.simulate import CutInputs, build, cut_model, layer_arrays, scale_feed


def _annotated(model, cfg, calib):
    irm = loader.load(model)
    passes = build_passes(cfg, ArrayData(calib))
    for p in passes[:-1]:  # everything but the writer
        p(irm)
    return irm


def _session(proto):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(proto, feed):
    return _session(proto).run(None, feed)[0]


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


def _before_blocks(model, cfg, calib):
    """The annotated IR model as block reconstruction receives it."""
    irm = loader.load(model)
    for p in build_passes(cfg, ArrayData(calib)):
        if type(p).__name__ == "ReconstructBlocksPass":
            break
        p(irm)
    return irm


def test_cut_inputs_match_whole_network_runs_while_layers_are_fixed():
    # every layer in order, including ones inside a residual block (not cuts: the skip is live there, so the
    # part after them also reads the data input), fixing each layer as a reconstruction pass would
    for model, size in ((mobilenet_like(), 16), (strided_residual(), 15)):
        cfg = ptqc.QuantConfig(4, 4, calib_size=16, adaround=False)
        irm = _before_blocks(model, cfg, inputs(16, size=size, seed=1))
        layers = [n for n in irm.graph if WEIGHT in n.meta and n.meta[WEIGHT].q is not None]
        batches = [inputs(8, size=size, seed=2), inputs(5, size=size, seed=3)]
        # the reference: whole-network runs of the simulation and the float model, every layer input exposed
        names = sorted({n.inputs[0].name for n in layers})
        sim = _session(build(irm, weight_inputs=True, extra_outputs=[f"{n}__sim" for n in names]).proto)
        fp = float_session(irm, [n for n in names if n != "input"])
        weights = {k: v for n in layers for k, v in layer_arrays(n, quantized=False).items()}
        cut = CutInputs(irm, layers, quantized=False, batches=batches)
        for layer in layers:
            name = layer.inputs[0].name
            cut.advance(name)
            for b, x_q, x_f in zip(batches, cut.x_q, cut.x_f):
                ref_q = sim.run([f"{name}__sim"], {"input": b, **weights})[0]
                ref_f = b if name == "input" else fp.run([name], {"input": b})[0]
                np.testing.assert_allclose(x_q, ref_q, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(x_f, ref_f, rtol=1e-6, atol=1e-6)
            weights.update(layer_arrays(layer, quantized=True))
            cut.fix(layer)
        # fixing changed what later layers read: the last layer's quantized input is not the float one's
        assert not np.allclose(cut.x_q[0], cut.x_f[0], atol=1e-3)


def test_a_part_between_two_cuts_reads_only_the_first():
    proto = ir.serde.serialize_model(loader.load(mobilenet_like()))
    add = next(n for n in proto.graph.node if n.op_type == "Add")
    first_clip = next(n for n in proto.graph.node if n.op_type == "Clip")
    # the residual block: from the stem's Clip output to the Add
    part = cut_model(proto, [first_clip.output[0]], [add.output[0]])
    assert [i.name for i in part.graph.input] == [first_clip.output[0]]
    assert [n.op_type for n in part.graph.node] == ["Conv", "Clip", "Conv", "Add"]
    x = inputs(4)
    stem = _run(cut_model(proto, ["input"], [first_clip.output[0]]), {"input": x})
    got = _run(part, {first_clip.output[0]: stem})
    ref = _run(cut_model(proto, ["input"], [add.output[0]]), {"input": x})
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # from inside the block, the skip still needs the stem: the part reads the data input too
    inner = next(n for n in proto.graph.node if n.op_type == "Conv" and n.input[0] != "input" and
                 n.input[0] != first_clip.output[0])
    assert {i.name for i in cut_model(proto, [inner.input[0]], [add.output[0]]).graph.input} == {inner.input[0], "input"}
