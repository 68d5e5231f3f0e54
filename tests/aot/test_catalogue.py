"""generated/: the catalogue of reference kernels is current and compiles.

Regenerates the catalogue (4 kernels) into a temporary directory and compares every file
byte for byte with generated/; compiles each kernel strictly for its target (the host
compiler, and arm-none-eabi-gcc for the Cortex-M one when installed) and runs the
sensor kernel's self-test on the host.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from _emit_support import CORTEX_M_OBJECTS, HOST, STRICT

from bngen.aot.catalogue import ITEMS, regenerate
from bngen.tools.cli import main as cli_main

GENERATED = Path(__file__).resolve().parents[2] / "generated"  # the checkout's, not an installed copy's


def _files(root: Path):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_regenerating_changes_nothing(tmp_path):
    regenerate(tmp_path)
    want, got = _files(GENERATED), _files(tmp_path)
    stale = sorted(set(want) - set(got))
    new = sorted(set(got) - set(want))
    changed = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    assert not (stale or new or changed), (
        f"generated/ is out of date (stale {stale}, new {new}, changed {changed}); "
        "run `python -m bngen.aot.catalogue` and commit the result"
    )


def test_catalogue_command_writes_the_same_files(tmp_path, capsys):
    assert cli_main(["catalogue", "--out", str(tmp_path)]) == 0
    assert _files(tmp_path) == _files(GENERATED)
    assert "resnet50_stem_bn.c" in capsys.readouterr().out


@pytest.mark.parametrize("item", ITEMS, ids=lambda i: i.name)
def test_catalogue_kernels_compile_strictly(tmp_path, item):
    HOST.require()
    source = GENERATED / item.name / f"{item.name}.c"
    extra = ("-Wdouble-promotion",) if item.target == "cortex-m" else ()
    HOST.compile([source], tmp_path / "k.o", warnings=STRICT + extra)
    if item.target == "cortex-m" and not CORTEX_M_OBJECTS.missing():
        CORTEX_M_OBJECTS.compile([source], tmp_path / "k_m4.o", warnings=STRICT + extra)
        if item.spec.dtype == "float16":  # and with the FPU's half conversions
            CORTEX_M_OBJECTS.compile([source], tmp_path / "k_m4_fp16.o", warnings=STRICT + extra, extra=("-mfp16-format=ieee",))
    if item.harness:
        exe = HOST.compile([source, GENERATED / item.name / f"{item.name}_test.c"], tmp_path / "selftest", link=True)
        run = subprocess.run([str(exe)], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout
