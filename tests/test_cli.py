"""The command line: the happy path, and one clear line + exit code 2 + no output for bad input."""

import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from graphs import Builder, inputs, resnet_like
import ptqc
from ptqc.cli import main
from ptqc.data import ImageFolder, Preprocess, spread_order


@pytest.fixture()
def model_path(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(resnet_like(size=16), str(path))
    return path


@pytest.fixture()
def calib_npy(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, inputs(24))
    return path


@pytest.fixture()
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_fails(result, text, out_path=None):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and text in lines[0], result.output
    if out_path is not None:
        assert not os.path.exists(out_path)
        assert not [f for f in os.listdir(os.path.dirname(out_path)) if f.startswith(".ptqc-")]


def test_help_on_every_command():
    for cmd in ([], ["compile"], ["inspect"], ["eval"], ["fetch"], ["demo"]):
        result = invoke(*cmd, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_compile_inspect_roundtrip(model_path, calib_npy, tmp_path):
    result = invoke("compile", model_path, "--w4a8", "--calib", calib_npy)
    out = tmp_path / "net.ptqc.onnx"
    assert result.exit_code == 0, result.output
    assert out.exists() and "w4a8" in result.output
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["ptqc.config.weight_bits"] == "4" and meta["ptqc.calib_samples"] == "24"
    result = invoke("inspect", out)
    assert result.exit_code == 0 and "PASS" in result.output


def test_compile_with_adaround_records_it(model_path, calib_npy, tmp_path):
    result = invoke("compile", model_path, "--w4a4", "--calib", calib_npy, "--adaround", "--adaround-iters", 5)
    assert result.exit_code == 0, result.output
    model = onnx.load(str(tmp_path / "net.ptqc.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["ptqc.config.adaround"] == "True" and meta["ptqc.config.adaround_iters"] == "5"
    methods = [p.value for n in model.graph.node for p in n.metadata_props if p.key == "ptqc.methods"]
    assert any("adaround" in m for m in methods)
    assert_fails(invoke("compile", model_path, "--w4a4", "--calib", calib_npy, "--adaround-iters", 0), "at least 1")


@pytest.mark.parametrize("flags,expected,ran", [(["--w4a4"], "auto: True", True), (["--w8a8"], "auto: False", False),
                                                (["--w4a4", "--no-adaround"], "False", False)])
def test_adaround_is_on_below_8_bit_weights_unless_turned_off(model_path, calib_npy, tmp_path, flags, expected, ran):
    result = invoke("compile", model_path, *flags, "--calib", calib_npy, "--adaround-iters", 5, "--no-block-recon")
    assert result.exit_code == 0, result.output
    model = onnx.load(str(tmp_path / "net.ptqc.onnx"))
    assert {p.key: p.value for p in model.metadata_props}["ptqc.config.adaround"] == expected
    methods = [p.value for n in model.graph.node for p in n.metadata_props if p.key == "ptqc.methods"]
    assert any("adaround" in m for m in methods) == ran


@pytest.mark.parametrize("flags,expected,ran", [(["--w4a4"], "auto: True", True), (["--w8a8"], "auto: False", False),
                                                (["--w4a4", "--no-block-recon"], "False", False)])
def test_block_recon_is_on_below_8_bit_weights_unless_turned_off(model_path, calib_npy, tmp_path, flags, expected, ran):
    result = invoke("compile", model_path, *flags, "--calib", calib_npy, "--no-adaround", "--block-iters", 300)
    assert result.exit_code == 0, result.output
    model = onnx.load(str(tmp_path / "net.ptqc.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["ptqc.config.block_recon"] == expected
    assert meta["ptqc.config.block_iters"] == "300"
    assert meta["ptqc.config.block_freeze"] == "auto: 0.0"  # 4-bit weights: AdaRound's annealing alone
    methods = [p.value for n in model.graph.node for p in n.metadata_props if p.key == "ptqc.methods"]
    assert any("block-recon" in m for m in methods) == ran
    assert_fails(invoke("compile", model_path, "--w4a4", "--calib", calib_npy, "--block-iters", 0), "at least 1")
    assert_fails(invoke("compile", model_path, "--w4a4", "--calib", calib_npy, "--block-freeze", 1.5), "between 0 and 1")
    # borders learned in the blocks sit on exponents the search would move afterwards
    assert_fails(invoke("compile", model_path, "--w4a4", "--calib", calib_npy, "--act-borders", "--act-search"),
                 "--act-search")


def test_block_steps_default_to_600_below_4_bit_weights():
    meta = {bits: ptqc.QuantConfig(*bits).as_metadata()["ptqc.config.block_iters"] for bits in ((2, 4), (3, 3), (4, 4))}
    assert meta == {(2, 4): "auto: 600", (3, 3): "auto: 600", (4, 4): "auto: 300"}
    assert ptqc.QuantConfig(2, 4, block_iters=50).recon_iters == 50


def test_block_freeze_flag_reaches_the_config(model_path, calib_npy, tmp_path):
    result = invoke("compile", model_path, "--w2a4", "--calib", calib_npy, "--no-adaround", "--block-iters", 20,
                    "--block-freeze", 0.5)
    assert result.exit_code == 0, result.output
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "net.ptqc.onnx")).metadata_props}
    assert meta["ptqc.config.block_freeze"] == "0.5"


def test_compile_from_image_folder_with_a_corrupt_image(model_path, image_dir, tmp_path):
    (image_dir / "zz_broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "o.onnx"
    result = invoke("compile", model_path, "--calib", image_dir, "--size", 16, "-o", out)
    assert result.exit_code == 0, result.output
    assert "skipping unreadable image" in result.output and out.exists()


def test_a_calibration_subset_spreads_over_a_folder_sorted_by_class(tmp_path):
    # a folder named by class, four images per class: the first 8 in sorted order would be 2 classes
    folder = tmp_path / "by_class"
    folder.mkdir()
    for c in range(16):
        for k in range(4):
            Image.fromarray(np.full((8, 8, 3), c * 16 + k, np.uint8)).save(folder / f"n{c:02d}_{k}.png")
    data = ImageFolder(str(folder), Preprocess(size=8, crop=1.0), limit=16)
    assert len({os.path.basename(f)[:3] for f in data.files}) == 16
    first8 = {os.path.basename(f)[:3] for f in data.files[:8]}
    assert len(first8) == 8  # any prefix is spread too (the passes that read fewer images take a prefix)
    rest = ImageFolder(str(folder), Preprocess(size=8, crop=1.0)).after(16)
    assert len(rest) == 48 and not set(rest.files) & set(data.files)
    assert spread_order(10) == [0, 8, 4, 2, 6, 1, 9, 5, 3, 7]


def test_explicit_bits_override_shorthand(model_path, calib_npy, tmp_path):
    out = tmp_path / "o.onnx"
    result = invoke("compile", model_path, "--w8a8", "--weight-bits", 3, "--calib", calib_npy, "-o", out)
    assert result.exit_code == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["ptqc.config.weight_bits"] == "3" and meta["ptqc.config.act_bits"] == "8"


def test_missing_model(tmp_path, calib_npy):
    assert_fails(invoke("compile", tmp_path / "nope.onnx", "--calib", calib_npy), "not found", tmp_path / "nope.ptqc.onnx")


def test_not_onnx(tmp_path, calib_npy):
    bad = tmp_path / "bad.onnx"
    bad.write_text("hello, I am not a model")
    assert_fails(invoke("compile", bad, "--calib", calib_npy), "ONNX", tmp_path / "bad.ptqc.onnx")


def test_truncated_onnx(tmp_path, model_path, calib_npy):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert_fails(invoke("compile", cut, "--calib", calib_npy), "ONNX", tmp_path / "cut.ptqc.onnx")


def test_empty_calibration_folder(tmp_path, model_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_fails(invoke("compile", model_path, "--calib", empty), "no images", tmp_path / "net.ptqc.onnx")


def test_missing_calibration_folder(tmp_path, model_path):
    assert_fails(invoke("compile", model_path, "--calib", tmp_path / "nowhere"), "not found", tmp_path / "net.ptqc.onnx")


def test_only_unreadable_images(tmp_path, model_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"garbage")
    assert_fails(invoke("compile", model_path, "--calib", folder, "--size", 16), "could be read", tmp_path / "net.ptqc.onnx")


def test_input_shape_mismatch(model_path, image_dir, tmp_path):
    # images preprocessed to 224x224 do not fit a 16x16 model
    assert_fails(invoke("compile", model_path, "--calib", image_dir), "does not match", tmp_path / "net.ptqc.onnx")


def test_nan_in_weights(tmp_path, calib_npy):
    model = resnet_like()
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w.flat[0] = np.nan
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    assert_fails(invoke("compile", path, "--calib", calib_npy), "NaN", tmp_path / "nan.ptqc.onnx")


def test_nan_in_calibration_outputs(tmp_path, model_path):
    x = inputs(8)
    x[0, 0, 0, 0] = np.inf
    path = tmp_path / "inf.npy"
    np.save(path, x)
    assert_fails(invoke("compile", model_path, "--calib", path), "NaN or Inf", tmp_path / "net.ptqc.onnx")


@pytest.mark.parametrize("args", [["--weight-bits", "9"], ["--act-bits", "1"], ["--weight-bits", "0"]])
def test_unknown_bit_widths(model_path, calib_npy, tmp_path, args):
    assert_fails(invoke("compile", model_path, "--calib", calib_npy, *args), "bit width", tmp_path / "net.ptqc.onnx")


def test_unwritable_output(model_path, calib_npy, tmp_path):
    assert_fails(invoke("compile", model_path, "--calib", calib_npy, "-o", tmp_path / "no" / "dir" / "x.onnx"),
                 "does not exist")
    assert_fails(invoke("compile", model_path, "--calib", calib_npy, "-o", tmp_path), "directory")


def test_unsupported_op(tmp_path, calib_npy):
    b = Builder()
    y = b.node("Einsum", ["input"], equation="ij->ji")
    model = b.model("input", y, [3, 3], [3, 3])
    path = tmp_path / "einsum.onnx"
    onnx.save(model, str(path))
    assert_fails(invoke("compile", path, "--calib", calib_npy), "unsupported op Einsum")


def test_failure_midway_leaves_no_file(tmp_path, monkeypatch):
    """A crash after the output is opened must not leave a partial file."""
    import ptqc.writer

    def boom(self, *a, **k):
        raise OSError("disk full")

    proto = resnet_like()
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", boom)
    out = tmp_path / "partial.onnx"
    with pytest.raises(OSError):
        ptqc.writer.save_atomic(proto, str(out))
    assert os.listdir(tmp_path) == []
