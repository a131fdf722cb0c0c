"""equalize_residual_stream: which tensors form a stream, exactness, and the power-of-two error it minimises."""

import numpy as np
import onnx_ir as ir
import pytest

from graphs import inputs, linear_stream, mobilenet_like, run
from ptqc import loader
from ptqc.annotations import ACT
from ptqc.config import QuantConfig
from ptqc.data import ArrayData
from ptqc.passes.equalize_residual_stream import EqualizeResidualStreamPass, find_streams, pot_error
from ptqc.passes.fold_batchnorm import FoldBatchNormPass
from ptqc.passes.gap_to_sum import GapToSumPass
from ptqc.passes.plan_quantization import PlanQuantizationPass


def _planned(model) -> ir.Model:
    irm = loader.load(model)
    ir.passes.PassManager([FoldBatchNormPass(), GapToSumPass(), PlanQuantizationPass(QuantConfig(4, 4))])(irm)
    return irm


def test_a_stream_is_the_linear_tensors_adds_join():
    streams = find_streams(_planned(linear_stream()).graph)
    assert len(streams) == 1
    s = streams[0]
    # the projection output, two block outputs and two sums; written by 3 convs, read by 2 expansions and the head
    assert (len(s.tensors), len(s.writers), len(s.readers)) == (5, 3, 3)
    # mobilenet_like adds a Clip output (not linear in the channel scale's sense: it has a bound): no stream
    assert find_streams(_planned(mobilenet_like()).graph) == []


def test_the_network_computes_the_same_function():
    model, x = linear_stream(), inputs(40)
    irm = _planned(model)
    before = run(ir.serde.serialize_model(irm), x[16:])[0]
    EqualizeResidualStreamPass(ArrayData(x[:16]), 8, samples=16)(irm)
    after = run(ir.serde.serialize_model(irm), x[16:])[0]
    assert np.allclose(after, before, rtol=1e-4, atol=1e-5)
    factors = {float(v.meta[ACT].rescale) for v in find_streams(irm.graph)[0].tensors}
    assert len(factors) == 1 and 1.0 < factors.pop() < 2.0  # the stream scaled as one, by a factor in (1, 2)


def test_pot_error_by_hand():
    # 2-bit signed grid {-2, -1, 0, 1} * 2^e; e = 0 gives [0, -1, 1], the least error of every e
    x = np.array([0.3, -0.7, 1.2])
    assert pot_error(x, 2) == pytest.approx((0.09 + 0.09 + 0.04) / (0.09 + 0.49 + 1.44))


def test_cli_flag_runs_the_pass(tmp_path):
    import onnx
    from click.testing import CliRunner

    from ptqc.cli import main

    path, data, out = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(linear_stream(), str(path))
    np.save(data, inputs(32))
    res = CliRunner().invoke(main, ["compile", str(path), "--calib", str(data), "--w4a4", "--equalize-residual",
                                    "--no-adaround", "--no-block-recon", "-o", str(out)])
    assert res.exit_code == 0, res.output
    q = onnx.load(str(out))
    assert {p.key: p.value for p in q.metadata_props}["ptqc.config.equalize_residual"] == "True"
    methods = [p.value for n in q.graph.node for p in n.metadata_props if p.key == "ptqc.methods"]
    assert sum("equalize_residual_stream" in m for m in methods) == 3  # the stream's three writers


def test_on_by_default_below_8_bit_activations():
    from ptqc.config import QuantConfig
    from ptqc.data import ArrayData
    from ptqc.pipeline import build_passes

    def runs(cfg):
        return any(type(p).__name__ == "EqualizeResidualStreamPass" for p in build_passes(cfg, ArrayData(inputs(4))))

    assert runs(QuantConfig(8, 4)) and runs(QuantConfig(4, 4, block_recon=False))
    assert runs(QuantConfig(4, 4)) and QuantConfig(4, 4).use_block_recon  # with block reconstruction too
    assert not runs(QuantConfig(8, 8)) and not runs(QuantConfig(4, 8))  # 8-bit activations
    assert runs(QuantConfig(4, 4, equalize_residual=True)) and not runs(QuantConfig(8, 4, equalize_residual=False))
    assert not runs(QuantConfig(8, 4).for_trials())  # search trials stay cheap
    assert not any(type(p).__name__ == "EqualizeResidualStreamPass" for p in build_passes(QuantConfig(8, 4), None))
    assert QuantConfig(8, 4).as_metadata()["ptqc.config.equalize_residual"] == "auto: True"
