"""The C compiler: a pure function from C text to a loadable Python extension.

`Compiler` is injected into `build` (tests pass one with ``-Werror``).  Its `identity`
(path and ``--version``) and flags go into the cache key, so a different compiler or
flag set never reuses another's binary.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.machinery
import importlib.util
import io
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import cffi
from cffi.recompiler import make_c_source

from ..codegen.render import template_dir
from ..core.errors import CompileError
from ..plan.target import Target, host_target

# -fno-math-errno: the kernels never read errno, and without it sqrt is a library call
# behind a branch, which keeps the per-channel coefficient loops scalar.
DEFAULT_FLAGS = ("-O3", "-march=native", "-fno-math-errno")
STRICT_WARNINGS = ("-Wall", "-Wextra", "-Werror")
# Seconds one compiler run may take before it is killed (a build takes about one; a
# compiler that hangs -- waiting on a licence server, a stuck NFS mount -- must not hang
# every process that builds a kernel).
DEFAULT_TIMEOUT = 300.0
# The flags the OpenMP probe can record: anything else in a compiler record was not
# written by `Compiler.features` (and could put, say, -B<dir>/ on the compiler's argv).
_OPENMP_FLAGS = ("-fopenmp",)
_SIMD_FLAGS = ("-fopenmp", "-fopenmp-simd")



@dataclasses.dataclass(frozen=True)
class Compiler:
    """A C compiler command and its flags.

    ``cc`` defaults to ``$CC`` or ``cc``; ``flags`` to optimisation for this machine.
    ``warnings`` are added on top (``STRICT_WARNINGS`` turns every warning into an
    error, which the test suite uses so that a sloppy template fails).  ``timeout``:
    seconds one compiler run may take.
    """

    cc: str = dataclasses.field(default_factory=lambda: os.environ.get("CC", "cc"))
    flags: Tuple[str, ...] = DEFAULT_FLAGS
    warnings: Tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT

    @property
    def command(self) -> list:
        """``cc`` split like a shell would; a CompileError naming it if it is not a command."""
        try:
            cmd = shlex.split(self.cc)
        except ValueError as exc:  # unbalanced quotes
            raise CompileError(f"C compiler {self.cc!r} (CC) is not a valid command line: {exc}") from None
        if not cmd:
            raise CompileError(f"C compiler {self.cc!r} (CC) is empty; install gcc or clang, or set CC to one")
        return cmd

    @property
    def argv0(self) -> str:
        path = shutil.which(self.command[0])
        if path is None:
            raise CompileError(f"C compiler {self.cc!r} not found; install gcc or clang, or set CC")
        return path

    def identity(self) -> str:
        """The resolved compiler path and its ``--version`` banner."""
        return _identity(self.argv0)

    def features(self, store: Optional[Path] = None) -> "Features":
        """What the compiler supports, probed once; remembered in `store` if given, so
        that a new process loading a cached kernel compiles nothing at all."""
        identity = self.identity()
        record = None
        if store is not None:  # keyed by flags too (-march decides what the target has) and
            # by the macros asked about, so a bngen that asks about more probes again
            key = "\n".join([identity, *self.flags, machine_tag(), *TARGET_MACROS])
            record = store / f"compiler-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
            found = Features.from_record(record)
            if found is not None:
                return found

        def accepts(*args: str) -> bool:
            return _probe(self.argv0, identity, args, self.timeout)

        openmp = "-fopenmp" if accepts("-fopenmp") else None
        found = Features(
            openmp=openmp,
            simd=openmp or ("-fopenmp-simd" if accepts("-fopenmp-simd") else None),
            macros=_target_macros(self.argv0, identity, tuple(self.flags)),
        )
        if record is not None:
            from .cache import write_private

            try:
                record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_private(record, json.dumps(dataclasses.asdict(found)))
            except OSError:
                pass  # an unwritable store only costs a probe next time
        return found

    def commands(self, kernel_c: str, wrapper_c: str, output: str, features: "Features") -> list:
        """The command lines that build the extension `output`: compile the kernel and the
        cffi wrapper (these two may run at once), then link them."""
        mode = [features.openmp or features.simd] if (features.openmp or features.simd) else []
        cc = [*self.command, *self.flags, *mode, *self.warnings, "-fPIC"]
        return [
            [*cc, "-c", kernel_c, "-o", kernel_c + ".o"],
            [*cc, "-I", sysconfig.get_paths()["include"], "-c", wrapper_c, "-o", wrapper_c + ".o"],
            [*cc, "-shared", kernel_c + ".o", wrapper_c + ".o", "-o", output, "-lm"],
        ]

    def fingerprint(self, features: "Features") -> str:
        """Everything about this compiler that changes the binary it produces."""
        return "\n".join(
            [
                self.identity(),
                " && ".join(" ".join(c) for c in self.commands("KERNEL", "WRAPPER", "OUTPUT", features)),
                f"cffi {cffi.__version__}",
                f"python {sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}",
                f"machine {machine_tag()}",
            ]
        )

    def compile(self, source: str, cdef: str, module_name: str, directory: Path, features: "Features") -> Path:
        """Compile `source` (whose entry points `cdef` declares) into `directory`.

        The kernel and the cffi wrapper are separate translation units, compiled at the
        same time (the wrapper's Python.h is a third of the work, none of it the
        kernel's) and then linked.  Returns the path of the extension module; raises
        `CompileError` with the compiler's output if it fails.
        """
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        wrapper = io.StringIO()
        prelude = (template_dir() / "wrapper_prelude.h").read_text()
        make_c_source(ffi, module_name, prelude + cdef, wrapper, verbose=False)
        kernel_c, wrapper_c = directory / f"{module_name}_kernel.c", directory / f"{module_name}.c"
        kernel_c.write_text(source)
        wrapper_c.write_text(wrapper.getvalue())
        output = directory / extension_filename(module_name)
        *parallel, link = self.commands(str(kernel_c), str(wrapper_c), str(output), features)
        self._run(parallel)
        self._run([link])
        for cmd in parallel:
            Path(cmd[cmd.index("-o") + 1]).unlink(missing_ok=True)  # the objects: the extension has them
        return output

    def _run(self, commands: list) -> None:
        """Runs `commands` at once and waits for every one (also when one fails: the
        caller then removes the directory they write into), each within the timeout;
        a CompileError naming the compiler unless all succeed and write their output."""
        processes = []
        try:
            for cmd in commands:  # each in a process group of its own: a timeout kills the driver's children too
                processes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                  start_new_session=True))
            errors = [process.communicate(timeout=self.timeout)[1] for process in processes]
        except OSError as exc:  # not executable, vanished since `which`, ...
            _stop(processes)
            raise CompileError(f"cannot run C compiler {self.cc!r}: {exc}") from None
        except subprocess.TimeoutExpired:
            _stop(processes)
            raise CompileError(f"C compiler {self.cc!r} took more than {self.timeout:g} s; killed it "
                               "(Compiler(timeout=...) allows longer)") from None
        except BaseException:  # KeyboardInterrupt: the compilers are in sessions of their own
            _stop(processes)
            raise
        for cmd, process, text in zip(commands, processes, errors):
            _check(cmd, process.returncode, text)
            output = Path(cmd[cmd.index("-o") + 1])
            if not output.is_file():  # a "compiler" that exits 0 and writes nothing
                raise CompileError(f"C compiler {self.cc!r} exited with status 0 but wrote no {output.name}:"
                                   f"\n$ {' '.join(cmd)}\n{text}")


def extension_filename(module_name: str) -> str:
    """The file name of the compiled extension module `module_name`."""
    return f"{module_name}{sysconfig.get_config_var('EXT_SUFFIX')}"


def _stop(processes: list) -> None:
    """Kills `processes` and waits for them, so that none writes after the caller cleans up."""
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:  # already gone
            pass
    for process in processes:
        process.communicate()


@dataclasses.dataclass(frozen=True)
class Features:
    """What a compiler accepts: the flag for OpenMP threads and for ``omp simd``; and
    which of the ISA macros of `TARGET_MACROS` it defines with its flags (what the
    target CPU has)."""

    openmp: Optional[str]
    simd: Optional[str]
    macros: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "macros", tuple(self.macros))  # (a list, from the JSON record)

    def target(self, flags: Tuple[str, ...] = ()) -> Target:
        """The JIT target these features describe (flags: the compiler's, which may ask
        for wider vectors than its default)."""
        return host_target(dict.fromkeys(self.macros, "1"), flags, openmp=self.openmp is not None,
                           simd_pragmas=self.simd is not None, vendor=cpu_vendor())


    @classmethod
    def from_record(cls, path: Path) -> Optional["Features"]:
        """The features a compiler record at `path` holds, if it is exactly what
        `Compiler.features` writes (the three keys, values it can probe, from a file of
        this user that nobody else can write); else None, and the compiler is probed again."""
        from .cache import insecure  # the cache's trust rule, which the record lives under

        try:
            if insecure(path, follow=False) is not None:
                return None
            data = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(data, dict) or set(data) != {"openmp", "simd", "macros"}:
            return None
        openmp, simd, macros = data["openmp"], data["simd"], data["macros"]
        if openmp is not None and openmp not in _OPENMP_FLAGS:
            return None
        if not (simd == openmp if openmp is not None else simd is None or simd in _SIMD_FLAGS):
            return None
        if not isinstance(macros, list) or not all(isinstance(m, str) and m in TARGET_MACROS for m in macros) \
                or len(set(macros)) != len(macros):
            return None
        return cls(openmp=openmp, simd=simd, macros=tuple(macros))


# The predefined macros that say what the target has (read with ``cc -dM -E``), and
# __clang__, whose builtins some ISA partials do not spell.
TARGET_MACROS = ("__x86_64__", "__i386__", "__aarch64__", "__arm__", "__SSE2__", "__AVX__", "__AVX2__", "__F16C__",
                 "__AVX512F__", "__AVX512BW__", "__AVX512DQ__", "__AVX512VL__", "__AVX512BF16__", "__AVX512FP16__", "__ARM_NEON",
                 "__ARM_FP16_FORMAT_IEEE", "__clang__")


def _check(cmd: list, code: int, errors: str) -> None:
    """Raise `CompileError` with the compiler's output unless `cmd` succeeded."""
    if code != 0:
        raise CompileError(f"compiling generated C failed (exit {code}):\n$ {' '.join(cmd)}\n{errors}")


def load_module(module_name: str, path: Path):
    """Import the compiled extension at `path` (its ``lib`` and ``ffi``)."""
    loader = importlib.machinery.ExtensionFileLoader(module_name, str(path))
    spec = importlib.util.spec_from_file_location(module_name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def machine_tag() -> str:
    """The architecture and, for -march=native builds, the CPU's feature set."""
    return f"{platform.machine()}-{_cpu_features()}"


@functools.lru_cache(maxsize=None)
def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """This machine's CPU vendor (x86 ``vendor_id``: GenuineIntel, AuthenticAMD), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=None)
def _identity(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CompileError(f"cannot run C compiler {path}: {exc}") from None
    return f"{path}\n{out.stdout.strip()}"


@functools.lru_cache(maxsize=None)
def _target_macros(path: str, identity: str, flags: Tuple[str, ...]) -> Tuple[str, ...]:
    """The `TARGET_MACROS` the compiler predefines with `flags` (none if it cannot say)."""
    try:
        out = subprocess.run([path, *flags, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    defined = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("#define ") and len(line.split()) > 1}
    return tuple(m for m in TARGET_MACROS if m in defined)


@functools.lru_cache(maxsize=None)
def _probe(path: str, identity: str, args: Tuple[str, ...], timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether the compiler builds templates/probe.c with `args` (and writes the program)."""
    with tempfile.TemporaryDirectory(prefix="bngen-probe-") as tmp:
        out = Path(tmp, "probe")
        try:
            result = subprocess.run([path, *args, str(template_dir() / "probe.c"), "-o", str(out)],
                                    capture_output=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return False
        # -fsyntax-only writes nothing; otherwise a flag counts only if the program was written
        return result.returncode == 0 and ("-fsyntax-only" in args or out.is_file())
