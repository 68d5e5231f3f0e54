"""bngen's exceptions, in one place.  Each is also importable where it is raised
(`bngen.SpecError`, `bngen.distributed.SynchronizationError`)."""


class SpecError(ValueError):
    """An invalid layer description; the message names the field and the value."""


class CompileError(RuntimeError):
    """The C compiler rejected generated code; the message carries its output."""


class SynchronizationError(RuntimeError):
    """Ranks disagreed on what they were synchronising (raised on every rank)."""
