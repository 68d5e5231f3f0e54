/* The start of the cffi wrapper, which is compiled apart from the kernel (the two
 * translation units build in parallel, and only the wrapper parses Python.h): the types
 * the entry points' declarations use.  The declarations follow (cdef.h.j2). */
#include <stddef.h>
#include <stdint.h>

