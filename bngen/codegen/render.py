"""Plan -> C text, through the Jinja templates in templates/.

A pure function of the plan: no C is written in Python.  Undefined template variables
are errors (StrictUndefined), and numbers reach C as exact hexadecimal literals.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2
import numpy as np

from ..plan.plan import Plan
from ..version import __version__


def template_dir() -> Path:
    """templates/: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent.parent  # the bngen package
    for candidate in (here / "templates", here.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bngen's C templates are missing (looked in {here / 'templates'} and {here.parent / 'templates'})")


def hexfloat(value: float, ctype: str = "double") -> str:
    """An exact C literal for `value` rounded to `ctype` ("double" or "float"), without
    the trailing zeros of the mantissa (0x1.8p+1, not 0x1.8000000000000p+1)."""
    text = float(np.float32(value) if ctype == "float" else value).hex()
    if "." in text and "p" in text:
        mantissa, exponent = text.split("p")
        text = mantissa.rstrip("0").rstrip(".") + "p" + exponent
    return text + ("f" if ctype == "float" else "")


class _BytecodeCache(jinja2.FileSystemBytecodeCache):
    """Jinja's per-user bytecode cache (in the temp directory), failing soft: compiling the
    templates costs a new process ~0.2 s, loading them compiled a few ms; a cache that
    cannot be read or written just means compiling them again."""

    def load_bytecode(self, bucket):
        try:
            super().load_bytecode(bucket)
        except (OSError, EOFError, ValueError, TypeError):
            bucket.reset()

    def dump_bytecode(self, bucket):
        try:
            super().dump_bytecode(bucket)
        except OSError:
            pass


def _bytecode_cache():
    try:
        return _BytecodeCache()  # <tmp>/_jinja2-cache-<uid>, created private to the user
    except (OSError, RuntimeError):
        return None


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        bytecode_cache=_bytecode_cache(),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
        autoescape=False,
    )
    env.filters["hexfloat"] = hexfloat
    env.globals["version"] = __version__
    return env


def _render(template: str, plan: Plan, **extra) -> str:
    text = environment().get_template(template).render(plan=plan, spec=plan.spec, **extra)
    return _tidy(text)


def _tidy(text: str) -> str:
    """Collapses the blank lines that template control flow leaves behind, and drops the
    indented lines that a macro rendering nothing (an absent pragma) leaves empty."""
    out, blank = [], 0
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and not line.strip():
            continue
        line = line.rstrip()
        blank = blank + 1 if not line else 0
        if blank <= 1:
            out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def render_source(plan: Plan) -> str:
    """The C translation unit compiled for `plan`."""
    return _render("kernel.c.j2", plan)


def render_template(template: str, plan: Plan, **extra) -> str:
    """Any template of templates/ rendered for `plan` (with `extra` variables), tidied."""
    return _render(template, plan, **extra)


def render_cdef(plan: Plan) -> str:
    """The declarations cffi needs to call the entry points of `plan`."""
    return _render("cdef.h.j2", plan)
