"""Just in time: C compiled by the host compiler, cached on disk, loaded with cffi and
called through a checked binder."""
