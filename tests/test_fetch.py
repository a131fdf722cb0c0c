"""``ptqc fetch``: checksum-verified download into the cache, tested with a local file URL (never the network)."""

import hashlib
import json
import os
from importlib import resources

import pytest
from click.testing import CliRunner

import ptqc.fetch
from ptqc.cli import main
from ptqc.errors import PtqcError


@pytest.fixture()
def fake_manifest(tmp_path, monkeypatch):
    payload = b"pretend this is an onnx model" * 1000
    src = tmp_path / "remote" / "tiny.onnx"
    src.parent.mkdir()
    src.write_bytes(payload)
    entry = {"name": "tiny", "url": src.as_uri(), "sha256": hashlib.sha256(payload).hexdigest(),
             "input_size": 32, "preprocess": "tf", "description": "test"}
    monkeypatch.setattr(ptqc.fetch, "load_manifest", lambda: {"tiny": entry})
    return entry, src


def test_fetch_from_file_url_verifies_and_caches(fake_manifest, tmp_path):
    entry, src = fake_manifest
    cache = tmp_path / "cache"
    path = ptqc.fetch.fetch_model("tiny", cache_dir=str(cache))
    assert open(path, "rb").read() == src.read_bytes()
    src.unlink()  # a second call is served from the cache
    assert ptqc.fetch.fetch_model("tiny", cache_dir=str(cache)) == path


def test_checksum_mismatch_leaves_nothing(fake_manifest, tmp_path):
    entry, src = fake_manifest
    src.write_bytes(b"tampered")
    cache = tmp_path / "cache"
    with pytest.raises(PtqcError, match="checksum mismatch"):
        ptqc.fetch.fetch_model("tiny", cache_dir=str(cache))
    assert os.listdir(cache) == []


def test_cli_fetch_errors(fake_manifest, tmp_path):
    result = CliRunner().invoke(main, ["fetch", "nope", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown model" in result.output
    result = CliRunner().invoke(main, ["fetch", "tiny", "--from", str(tmp_path / "missing.onnx"), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "not found" in result.output


def test_real_manifest_is_complete():
    models = json.loads(resources.files("ptqc.models").joinpath("manifest.json").read_text())["models"]
    assert len(models) >= 4
    for m in models:
        assert len(m["sha256"]) == 64 and int(m["sha256"], 16) >= 0
        assert m["preprocess"] in ("tf", "lite", "torch") and m["input_size"] > 0
