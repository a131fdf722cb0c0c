"""Learned clipping thresholds: the step gradient of the window engine, and the pass's objective and output."""

import numpy as np
import pytest

import ptqc
from graphs import inputs, mobilenet_like, strided_residual
from ptqc import loader
from ptqc.annotations import ACT, CLIP, HIST, group_sizes
from ptqc.blockrec import Program, sample_windows
from ptqc.data import ArrayData
from ptqc.inspect import inspect_model
from ptqc.passes.learn_clip_ranges import LearnClipRangesPass, eligible
from ptqc.passes.reconstruct_blocks import _float, find_blocks
from ptqc.pipeline import build_passes

# per-channel thresholds by least squares (on by default with low-bit weights) would take these tensors first
CFG = ptqc.QuantConfig(weight_bits=4, act_bits=4, calib_size=32, adaround=False, block_recon=False,
                       equalize_channels=False)


def _run_until(model, cfg, x, name):
    """The IR after every pass up to and including the one called ``name``."""
    irm = loader.load(model)
    for p in build_passes(cfg, ArrayData(x)):
        p(irm)
        if type(p).__name__ == name:
            return irm
    raise AssertionError(f"{name} did not run")


@pytest.mark.parametrize("per_channel", [False, True])
def test_step_gradient_where_every_value_saturates(per_channel):
    """With a step so small that every positive value saturates, the quantizer's output is exactly its top,
    linear in the step: the gradient in the step must match finite differences through the rest of the block."""
    irm = _run_until(strided_residual(), CFG, inputs(8, size=15), "CalibratePass")
    block = find_blocks(irm.graph, quantized_input=False)[-1]  # 1x1, Clip, 5x5 depthwise, Clip, 1x1, Add
    prog = Program(block, 2)
    name = block.nodes[1].outputs[0].name  # the expansion's Clip output
    xin = np.random.default_rng(3).normal(0, 1, (4, 8, 7, 7))
    wins = sample_windows(block, prog.win, xin, xin, 16, np.random.default_rng(4))
    weights = {n.name: _float(n) for n in block.layers}
    x64 = wins.x_f.astype(np.float64)
    s = np.full(16, 1e-9) * (np.arange(16) + 1) if per_channel else 1e-9
    q = 15

    def run(step):
        return prog.forward(x64, wins.masks, weights, quantize=True, quant={name: (step, 0.0, q * step)})

    y, tape = run(s)
    g = np.random.default_rng(5).normal(size=y.shape)
    grad = prog.backward(g, tape, wins.masks, weights)[name + "/step"]
    assert np.shape(grad) == np.shape(s)
    for c in range(16 if per_channel else 1):
        ds = np.zeros(16) if per_channel else 0.0
        if per_channel:
            ds[c] = 1e-10
        else:
            ds = 1e-10
        y2, _ = run(s + ds)
        fd = np.sum(g * (y2 - y)) / 1e-10
        assert (grad[c] if per_channel else grad) == pytest.approx(fd, rel=1e-4)


def _learn(model, x):
    irm = _run_until(model, CFG, x, "CalibratePass")
    group_size = group_sizes(irm.graph)
    targets = [v for n in irm.graph for v in n.outputs if eligible(v, group_size)]
    LearnClipRangesPass(ArrayData(x), samples=32, iters=60, windows=2048)(irm)
    return irm, targets


def test_a_tensor_depthwise_convs_read_gets_a_threshold_per_channel():
    irm, targets = _learn(strided_residual(), inputs(32, size=15, seed=6))
    before, after = irm.graph.meta["ptqc.clip_loss"]
    assert after < before  # measured 0.02647 -> 0.02267 (both tensors)
    # both expansion outputs are read by depthwise convs: each gets a threshold per channel, laid on its
    # power-of-two grid at once.  The first ends a block and is learned on the next block's output error; the
    # residual block's is inside its block.  (The last depthwise output feeds the 8-bit last layer.)
    blocks = find_blocks(irm.graph, quantized_input=False)
    channel = [v for v in targets if np.ndim(v.meta[ACT].rescale) == 1]
    assert [v.name for v in channel] == [blocks[0].output, blocks[-1].nodes[1].outputs[0].name]
    for v in channel:
        assert v.meta[ACT].exp is not None and v.meta[ACT].clip_hi == 15 * 2.0 ** v.meta[ACT].exp


def test_a_tensor_a_dense_conv_reads_gets_one_learned_threshold():
    irm, targets = _learn(mobilenet_like(), inputs(32, seed=6))
    before, after = irm.graph.meta["ptqc.clip_loss"]
    assert after < before  # measured 0.003436 -> 0.003431
    learned = [v for v in targets if CLIP in v.meta]
    assert len(learned) == 1 and learned[0].producer().op_type == "Clip"
    least_squares = learned[0].meta[HIST].best_clip(4, False, upper=6.0)
    assert 0 < learned[0].meta[CLIP] <= 6.0 and learned[0].meta[CLIP] != least_squares


def test_compile_with_learned_thresholds_passes_inspect_and_records_them():
    x = inputs(32, size=15, seed=6)
    on = ptqc.compile(strided_residual(), x, CFG).model
    off = ptqc.compile(strided_residual(), x, ptqc.QuantConfig(**{**CFG.__dict__, "learn_clip": False})).model
    assert inspect_model(on).ok
    meta = {p.key: p.value for p in on.metadata_props}
    assert meta["ptqc.config.learn_clip"] == "auto: True"
    blocks = ptqc.QuantConfig(weight_bits=4, act_bits=4)
    assert blocks.use_block_recon and blocks.use_learn_clip
    assert ptqc.QuantConfig(weight_bits=8, act_bits=4).use_learn_clip
    assert not ptqc.QuantConfig(weight_bits=4, act_bits=8).use_learn_clip
    assert not ptqc.QuantConfig(weight_bits=2, act_bits=4).use_learn_clip
    assert ptqc.QuantConfig(weight_bits=8, act_bits=8, layer_bits={"conv": "w8a4"}).use_learn_clip
    inits = lambda m: {i.name for i in m.graph.initializer}
    assert any("_ch" in name for name in inits(on)) and not any("_ch" in name for name in inits(off))


def test_learned_thresholds_lower_the_model_error_on_held_out_inputs():
    """End to end at 8-bit weights (no block reconstruction): a Clip output whose channels differ up to 50x in
    range, read by a depthwise conv.  Measured 0.00209 -> 0.00098 mean squared output error."""
    from test_methods import _uneven_channels_model, run

    model = _uneven_channels_model()
    calib, test = inputs(64, seed=12), inputs(32, seed=13)
    ref = run(model, test)[0]
    cfg = dict(weight_bits=8, act_bits=4, calib_size=64, first_last_8bit=False, block_recon=False)
    err = {lc: float(((run(ptqc.compile(model, calib, ptqc.QuantConfig(**cfg, learn_clip=lc)).model, test)[0] - ref) ** 2).mean())
           for lc in (False, True)}
    assert err[True] < 0.7 * err[False]
