"""Mixed precision: --keep-float, --max-drop and --target-size on small graphs."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import ptqc
from graphs import inputs, resnet_like, run
from ptqc import mixed
from ptqc.cli import main
from ptqc.config import QuantConfig, load_toml
from ptqc.errors import PtqcError
from ptqc.inspect import inspect_model


def test_estimated_drop_by_hand():
    fp = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]]))
    q = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # disagrees on the second image only
    # the changed answer loses the float model's 0.4 confidence in it, over 3 images, in points
    assert mixed.estimated_drop(fp, q) == pytest.approx(100 * 0.4 / 3)
    labels = np.array([0, 0, 2])
    assert mixed.estimated_drop(fp, q, labels) == pytest.approx(100 / 3)
    assert mixed.estimated_drop(fp, fp) == 0.0
    d = np.array([0.0, 0.4, 0.0])
    mean, upper = mixed.drop_bound(fp, q)
    assert mean == pytest.approx(100 * d.mean())
    assert upper == pytest.approx(100 * (d.mean() + 1.645 * d.std(ddof=1) / np.sqrt(3)))


def _kept(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def test_keep_float_leaves_the_layer_float_and_inspect_says_so():
    model, x = resnet_like(seed=1), inputs(48, seed=2)
    names = [n.name for n in ptqc.compile(model, x[:32], QuantConfig(4, 4, calib_size=32)).model.graph.node
             if n.op_type == "Conv"]
    target = names[1]
    q = ptqc.compile(model, x[:32], QuantConfig(4, 4, calib_size=32, keep_float=[target])).model
    node = _kept(q, target)
    inits = {i.name for i in q.graph.initializer}
    assert node.input[1] in inits  # the float weight itself, no DequantizeLinear in front
    producer = {o: n for n in q.graph.node for o in n.output}
    assert node.input[0] not in producer or producer[node.input[0]].op_type != "DequantizeLinear"
    report = inspect_model(q)
    assert not report.ok and any(target in m and "kept float" in m for m in report.non_shift)
    assert not report.problems  # every scale still a power of two
    fp = run(model, x[32:])[0]
    full = run(ptqc.compile(model, x[:32], QuantConfig(4, 4, calib_size=32)).model, x[32:])[0]
    part = run(q, x[32:])[0]
    assert np.sum((fp - part) ** 2) < np.sum((fp - full) ** 2)


def test_keep_float_errors_and_toml(tmp_path):
    model, x = resnet_like(), inputs(16)
    with pytest.raises(PtqcError, match="no quantizable layer named 'nope'"):
        ptqc.compile(model, x, QuantConfig(4, 4, keep_float=["nope"]))
    path = tmp_path / "c.toml"
    path.write_text('bits = "w4a4"\nkeep_float = ["Conv_2"]\n')
    assert load_toml(str(path)) == {"weight_bits": 4, "act_bits": 4, "keep_float": ["Conv_2"]}
    path.write_text('keep_float = "Conv_2"\n')
    with pytest.raises(PtqcError, match="list of layer names"):
        load_toml(str(path))


def test_target_size_fills_the_budget_in_ranking_order():
    model, x = resnet_like(seed=3, width=16), inputs(40, seed=4)
    cfg = QuantConfig(4, 4, calib_size=32)
    low = mixed.weight_bytes(ptqc.compile(model, x[:32], cfg).model)
    ranking = mixed.rank_layers(model, x[:32], cfg, None, samples=8)
    assert ranking  # the low-bit layers, lowest SQNR alone first
    new_cfg, choice = mixed.target_size(model, x[:32], cfg, None, (low + 700) / 1e6, ranking=ranking)
    size = mixed.weight_bytes(ptqc.compile(model, x[:32], new_cfg).model)
    assert size <= low + 700 and choice.size_mb == pytest.approx(size / 1e6)
    assert choice.raised == ranking[: len(choice.raised)]
    # the next layer in the ranking would not have fitted
    if len(choice.raised) < len(ranking):
        bigger = mixed.with_raised(cfg, ranking[: len(choice.raised) + 1])
        assert mixed.weight_bytes(ptqc.compile(model, x[:32], bigger).model) > low + 700
    with pytest.raises(PtqcError, match="target-size"):
        mixed.target_size(model, x[:32], cfg, None, low / 2e6, ranking=ranking)


def test_max_drop_picks_the_shortest_prefix_that_meets_the_budget():
    model, x = resnet_like(seed=5, width=16), inputs(96, seed=6)
    cfg = QuantConfig(2, 2, calib_size=32)
    held = x[32:]
    budget = 2.0
    new_cfg, choice = mixed.max_drop(model, x[:32], cfg, None, budget, held)
    fp = run(model, held)[0]
    q = run(ptqc.compile(model, x[:32], new_cfg).model, held)[0]
    mean, upper = mixed.drop_bound(fp, q)
    assert (mean, upper) == pytest.approx((choice.estimate, choice.upper)) and upper <= budget
    bounds = {k: b for k, _, b in choice.trials}
    k = len(choice.raised)
    assert bounds[k] <= budget
    if k > 0:  # bisection ends next to a prefix one layer shorter that it tried and that missed the budget
        assert bounds[k - 1] > budget


def test_max_drop_trials_skip_adaround_and_the_chosen_model_has_the_full_settings():
    model, x = resnet_like(seed=5, width=16), inputs(96, seed=6)
    cfg = QuantConfig(2, 2, calib_size=32, adaround_iters=10)
    assert cfg.use_adaround and not cfg.for_trials().use_adaround
    assert QuantConfig(2, 2, adaround=True).for_trials().use_adaround  # asked for: trials keep it
    assert cfg.use_block_recon and not cfg.for_trials().use_block_recon
    assert QuantConfig(2, 2, block_recon=True).for_trials().use_block_recon
    assert QuantConfig(8, 8, layer_bits={"conv": "w4a8"}).use_adaround and not QuantConfig(8, 8).use_adaround
    new_cfg, choice = mixed.max_drop(model, x[:32], cfg, None, 50.0, x[32:])
    assert choice.result is not None and new_cfg.use_adaround
    # the model handed back is the full-settings compile of the choice, measured on the held-out samples
    again = ptqc.compile(model, x[:32], new_cfg).model
    assert choice.result.model.SerializeToString(deterministic=True) == again.SerializeToString(deterministic=True)
    # the full settings' refinement ran: block reconstruction (AdaRound leaves these layers to it by default)
    methods = [p.value for n in again.graph.node for p in n.metadata_props if p.key == "ptqc.methods"]
    assert any("block-recon" in m for m in methods)
    mean, upper = mixed.drop_bound(run(model, x[32:])[0], run(again, x[32:])[0])
    assert (mean, upper) == pytest.approx((choice.estimate, choice.upper))


def test_cli_max_drop_writes_the_choice_into_the_model(tmp_path):
    path, data = tmp_path / "m.onnx", tmp_path / "x.npy"
    onnx.save(resnet_like(seed=5, width=16), str(path))
    np.save(data, inputs(96, seed=6))
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, ["compile", str(path), "--calib", str(data), "--calib-size", "32", "--w2a2",
                                    "--max-drop", "2", "--eval-size", "64", "-o", str(out)])
    assert res.exit_code == 0, res.output
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["ptqc.mixed_precision"].startswith("max-drop 2:")
    res = CliRunner().invoke(main, ["compile", str(path), "--calib", str(data), "--calib-size", "96", "--max-drop", "1",
                                    "-o", str(tmp_path / "r.onnx")])
    assert res.exit_code == 2 and "has only 96" in res.output


def test_max_drop_writes_the_trial_model_when_the_full_settings_miss_the_budget(monkeypatch):
    model, x = resnet_like(seed=5, width=16), inputs(96, seed=6)
    cfg = QuantConfig(2, 2, calib_size=32, adaround_iters=10)
    _, first = mixed.max_drop(model, x[:32], cfg, None, 50.0, x[32:])  # unpatched: how many trials it makes
    real, calls = mixed.drop_bound, []

    def bound(fp, q, labels=None):  # the trials as measured, then the full-settings compile far over budget
        calls.append(q)
        return real(fp, q, labels) if len(calls) <= len(first.trials) else (99.0, 99.0)

    monkeypatch.setattr(mixed, "drop_bound", bound)
    new_cfg, choice = mixed.max_drop(model, x[:32], cfg, None, 50.0, x[32:])
    assert len(calls) == len(first.trials) + 1 and choice.raised == first.raised
    assert choice.result is None and not new_cfg.use_adaround
    assert (choice.estimate, choice.upper) == dict((k, (m, u)) for k, m, u in choice.trials)[len(choice.raised)]


def test_fewest_doubles_then_bisects():
    asked = []

    def fits(k):
        asked.append(k)
        return k >= 5

    assert mixed._fewest(fits, 12) == 5 and asked == [1, 2, 4, 8, 6, 5]
    assert mixed._fewest(lambda k: k >= 5, 4) is None
    assert mixed._fewest(lambda k: True, 7) == 1


def test_max_drop_keeps_layers_float_when_8_bits_everywhere_miss(monkeypatch):
    model, x = resnet_like(seed=5, width=16), inputs(96, seed=6)
    cfg = QuantConfig(2, 2, calib_size=32, adaround_iters=10)
    real_compile, last = ptqc.compile, {}

    def spy(m, calib, config, *args, **kwargs):
        last["config"] = config
        return real_compile(m, calib, config, *args, **kwargs)

    def bound(fp, q, labels=None):  # scored by what was compiled: 8 bits everywhere misses 1.0, 3 float layers fit
        floats = len(last["config"].keep_float)
        return (5.0, 5.0) if floats == 0 else (3.0, 3.0) if floats < 3 else (0.5, 0.5)

    monkeypatch.setattr(ptqc, "compile", spy)
    monkeypatch.setattr(mixed, "drop_bound", bound)
    new_cfg, choice = mixed.max_drop(model, x[:32], cfg, None, 1.0, x[32:])
    assert [k for k, _, _ in choice.float_trials] == [1, 2, 4, 3]
    assert len(choice.floated) == 3 and choice.upper == 0.5
    assert choice.raised == [n for n in choice.ranking if n not in choice.floated]
    assert new_cfg.keep_float == choice.floated and not set(new_cfg.keep_float) & set(new_cfg.layer_bits)
    kept = {n.name for n in choice.result.model.graph.node
            if any(p.key == "ptqc.keep_float" for p in n.metadata_props)}
    assert kept == set(choice.floated)
    assert "3 layers kept float" in choice.describe()
    with pytest.raises(PtqcError, match="no-float-fallback"):
        mixed.max_drop(model, x[:32], cfg, None, 1.0, x[32:], float_fallback=False)


def test_outputs_in_batches_match_one_run():
    from ptqc import runtime

    model, x = resnet_like(seed=7), inputs(70, seed=8)
    whole = run(model, x)[0]
    assert np.allclose(runtime.outputs_in_batches(model, x, batch=32), whole, rtol=1e-5, atol=1e-6)


def test_report_lists_the_layers_kept_float():
    from ptqc import report, report_html
    from ptqc.data import ArrayData

    model, x = resnet_like(seed=1), inputs(48, seed=2)
    target = [n.name for n in ptqc.compile(model, x[:32], QuantConfig(8, 8, calib_size=32)).model.graph.node
              if n.op_type == "Conv"][1]
    q = ptqc.compile(model, x[:32], QuantConfig(4, 4, calib_size=32, keep_float=[target])).model
    rep = report.analyse(model, q, ArrayData(x[32:]), samples=8)
    assert rep.kept_float == [target] and target not in {layer.name for layer in rep.layers}
    assert f"Kept float, so not integer-only (absent from the layer table): <code>{target}</code>" in report_html.render(rep)
