"""AQuant rounding borders: the rule, the fit lowering its own error, the written ops, inspect and the CLI."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import ptqc
from graphs import inputs, linear_stream, mobilenet_like, run
from ptqc import loader, simulate
from ptqc.annotations import ACT
from ptqc.data import ArrayData
from ptqc.errors import PtqcError
from ptqc.inspect import inspect_model
from ptqc.intprog import LoweringError, lower
from ptqc.passes.emit_qdq import container
from ptqc.passes.learn_act_borders import best_borders
from ptqc.pipeline import build_passes
from ptqc.quant import BORDER_STEPS, border_codes

CFG = ptqc.QuantConfig(4, 4, act_borders=True, adaround=False, block_recon=False)


def test_border_rule_by_hand():
    u = np.array([-3.0, 0.2, 0.7, 1.3, 1.9, 2.5, 3.0, 9.0]).reshape(1, 1, 8)
    # one channel, levels 0, 1, 2 (codes 0..3): border 0.25 at level 0, 0.5 at level 1, 0.75 at level 2
    q = border_codes(u, np.array([[0.25, 0.5, 0.75]]), 0, 3)
    assert q.tolist() == [[[0, 0, 1, 1, 2, 2, 3, 3]]]
    # 0.5 everywhere is round-half-up inside the range
    v = np.linspace(-1, 4, 41).reshape(1, 1, -1)
    assert np.array_equal(border_codes(v, np.full((1, 3), 0.5), 0, 3), np.clip(np.floor(v + 0.5), 0, 3))


def test_best_borders_by_hand():
    gain = np.zeros((1, 2, BORDER_STEPS))
    gain[0, 0, 8] = -1.0  # fraction 1/4: rounding up costs
    gain[0, 0, 24] = 3.0  # fraction 3/4: rounding up saves
    gain[0, 1, 4] = 2.0   # level 1: rounding up from fraction 1/8 saves; every border up to 1/8 is as good
    border, saved = best_borders(gain, np.full((1, 2), 100))
    assert border[0, 0] == 0.5 and saved[0, 0] == 0.0  # 0.5 already rounds up the saving bin only
    assert border[0, 1] == 4 / BORDER_STEPS and saved[0, 1] == 2.0
    border, saved = best_borders(gain, np.array([[100, 10]]))
    assert border[0, 1] == 0.5 and saved[0, 1] == 0.0  # too few elements: stays at 0.5


def _annotated(model, calib):
    irm = loader.load(model)
    for p in build_passes(CFG, ArrayData(calib))[:-1]:  # everything but the writer
        p(irm)
    return irm


def _tensor_errors(irm, names, x, borders):
    """Squared error of each tensor's quantized value against the float model's, with ``borders`` fed."""
    sim = simulate.build(irm, extra_outputs=[f"{n}__sim" for n in names], border_inputs=names)
    sess = ort.InferenceSession(sim.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {sim.input_name: x, **simulate.border_feed(irm, names, borders)}
    got = sess.run([f"{n}__sim" for n in names], feed)
    fp = ir_float(irm, names, x)
    return [float(np.sum((g - f) ** 2)) for g, f in zip(got, fp)]


def ir_float(irm, names, x):
    from ptqc.passes.calibrate import float_session, run_batch

    return run_batch(float_session(irm, names), "input", x, names)


@pytest.mark.parametrize("make", [mobilenet_like, linear_stream])
def test_the_fit_lowers_the_first_tensors_error_on_its_images(make):
    calib = inputs(64)
    irm = _annotated(make(), calib)
    values = [v for v in simulate.planned_values(irm) if v.meta[ACT].border is not None]
    assert values, "no tensor got a border"
    names = [v.name for v in values]
    borders = {v.name: v.meta[ACT].border for v in values}
    for b in borders.values():
        assert b.min() >= 0 and b.max() <= 1 and np.all(b * BORDER_STEPS == np.round(b * BORDER_STEPS))
    # the first tensor's fit sees no border before it, so on the calibration images it is exactly optimal
    # against the float values (clipped to its code range, which both roundings share)
    first = names[:1]
    with_border = _tensor_errors(irm, first, calib, {first[0]: borders[first[0]]})[0]
    nearest = _tensor_errors(irm, first, calib, {})[0]
    assert with_border < nearest


def test_written_ops_follow_the_rule_bit_exactly():
    calib = inputs(64)
    q = ptqc.compile(mobilenet_like(), calib, CFG).model
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    tables = [n for n in inits if n.endswith("_border_table")]
    assert tables
    x = inputs(8, seed=3)
    for table in tables:
        prefix = table[: -len("_table")]
        m = onnx.ModelProto()
        m.CopyFrom(q)
        m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(f"{prefix}_{t}") for t in ("u", "value"))
        u, value = run(m, x, [f"{prefix}_u", f"{prefix}_value"])
        lo = int(inits[f"{prefix}_k_lo"])
        levels = int(inits[f"{prefix}_k_hi"]) + 1 - lo
        border = inits[table].reshape(-1, levels).astype(np.float64) - np.arange(lo, lo + levels)
        s = float(inits[f"{prefix}_scale"])
        np.testing.assert_array_equal(value, border_codes(u, border, lo, lo + levels) * s)


def test_borders_raise_the_small_graphs_logit_snr():
    calib, x = inputs(64), inputs(64, seed=5)
    for make in (mobilenet_like, linear_stream):
        f = run(make(), x)[0]
        snr = {}
        for on in (False, True):
            cfg = ptqc.QuantConfig(4, 4, act_borders=on, adaround=False, block_recon=False, refit_head=False)
            qo = run(ptqc.compile(make(), calib, cfg).model, x)[0]
            snr[on] = 10 * np.log10(np.sum(f**2) / np.sum((f - qo) ** 2))
        assert snr[True] > snr[False] + 0.3, (make.__name__, snr)


def test_inspect_counts_the_border_ops_and_export_refuses_them():
    q = ptqc.compile(mobilenet_like(), inputs(64), CFG).model
    report = inspect_model(q)
    assert report.ok and not report.float_ops
    tensors = sum(1 for i in q.graph.initializer if i.name.endswith("_border_table"))
    assert sum(n for k, n in report.extra_ops.items() if "rounding border" in k) == 11 * tensors
    assert report.extra_ops["GreaterOrEqual (AQuant rounding border)"] == tensors
    with pytest.raises(LoweringError, match="rounding borders"):
        lower(q)


def test_simulation_with_borders_matches_the_written_model():
    calib, x = inputs(64), inputs(16, seed=2)
    model = mobilenet_like()
    q = ptqc.compile(model, calib, CFG).model
    irm = _annotated(model, calib)
    sim = simulate.build(irm)
    np.testing.assert_allclose(run(sim.proto, x)[0], run(q, x)[0], rtol=1e-4, atol=1e-4)


def test_cli_flag_and_data_free(tmp_path):
    from click.testing import CliRunner

    from ptqc.cli import main

    path, data, out = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(mobilenet_like(), str(path))
    np.save(data, inputs(64))
    res = CliRunner().invoke(main, ["compile", str(path), "--calib", str(data), "--w4a4", "--act-borders",
                                    "--no-adaround", "--no-block-recon", "-o", str(out)])
    assert res.exit_code == 0, res.output
    q = onnx.load(str(out))
    assert {p.key: p.value for p in q.metadata_props}["ptqc.config.act_borders"] == "True"
    assert any(p.key == "ptqc.role" and p.value == "border" for n in q.graph.node for p in n.metadata_props)
    with pytest.raises(PtqcError, match="act-borders"):
        ptqc.compile(mobilenet_like(), None, ptqc.QuantConfig(4, 4, act_borders=True))


def test_container_levels_match_the_table():
    irm = _annotated(mobilenet_like(), inputs(64))
    for v in simulate.planned_values(irm):
        b = v.meta[ACT].border
        if b is not None:
            _, lo, hi = container(v.meta[ACT])
            assert b.shape == (v.shape[1], hi - lo)


def test_report_follows_the_border_to_the_output_quantizer():
    res = ptqc.compile(mobilenet_like(), inputs(64), CFG, report_samples=16)
    q = res.model
    bordered = {n.name for n in q.graph.node for p in n.metadata_props if p.key == "ptqc.tensor"
                and any(m.key == "ptqc.role" and m.value == "border" for m in n.metadata_props)}
    layers = [lay for lay in res.report.layers if lay.output_tensor and any(
        b.startswith(lay.output_tensor + "_border") for b in bordered)]
    assert layers
    for lay in layers:
        assert lay.output_bits == 4 and lay.shifts and np.isfinite(lay.sqnr_db) and np.isfinite(lay.sqnr_alone_db)



def test_inspect_rejects_a_tagged_chain_that_is_not_a_border():
    q = ptqc.compile(mobilenet_like(), inputs(64), CFG).model
    assert inspect_model(q).ok
    scale = next(n for n in q.graph.node if n.op_type == "Mul" and n.output[0].endswith("_border_value"))
    for init in q.graph.initializer:
        if init.name == scale.input[1]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.5), init.name))
    report = inspect_model(q)
    assert not report.ok and any("rounding border" in p for p in report.problems)
    floor = next(n for n in q.graph.node if n.op_type == "Floor")
    floor.op_type = "Round"  # same tag, another op: no longer the border's chain
    assert any("not the border's op chain" in p for p in inspect_model(q).problems)
