"""The command line: demo end to end, build from a spec file, cache info/clear, --help.

Runs `python -m bngen` in subprocesses against a temporary cache (2 specs compiled).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bngen

ROOT = Path(__file__).resolve().parents[2]


def bngen_cli(*args, cache_dir=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if cache_dir is not None:
        env["BNGEN_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([sys.executable, "-m", "bngen", *args], capture_output=True, text=True, env=env, timeout=300)


def test_demo_checks_against_the_oracle(tmp_path):
    out = bngen_cli("demo", "--batch", "2", "--repeat", "2", cache_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("OK") == 2
    assert "training forward" in out.stdout and "inference" in out.stdout and "numpy" in out.stdout


def test_build_from_spec_file_then_cache_info_and_clear(tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(bngen.Spec((None, 8), epsilon=0.5).to_json())
    cache = tmp_path / "cache"
    out = bngen_cli("build", "--spec", str(spec_file), "--show-source", cache_dir=cache)
    assert out.returncode == 0, out.stderr
    assert "bn_forward" in out.stdout
    info = bngen_cli("cache", "info", cache_dir=cache)
    assert info.returncode == 0 and "entries: 1" in info.stdout and str(cache) in info.stdout
    cleared = bngen_cli("cache", "clear", cache_dir=cache)
    assert cleared.returncode == 0 and "removed 1" in cleared.stdout
    assert "entries: 0" in bngen_cli("cache", "info", cache_dir=cache).stdout


def test_bad_spec_file_is_a_clear_error(tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text('{"shape": [2, 3], "epsilon": -1}')
    out = bngen_cli("build", "--spec", str(spec_file), cache_dir=tmp_path)
    assert out.returncode == 2
    assert "epsilon: -1" in out.stderr
    missing = bngen_cli("build", "--spec", str(tmp_path / "nope.json"), cache_dir=tmp_path)
    assert missing.returncode == 2 and "--spec: cannot read" in missing.stderr


@pytest.mark.parametrize("command", [[], ["demo"], ["build"], ["cache"], ["cache", "info"]])
def test_help_everywhere(command):
    out = bngen_cli(*command, "--help")
    assert out.returncode == 0 and "usage: bngen" in out.stdout
