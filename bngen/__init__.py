"""bngen: a compiler for batch-normalization kernels.

Describe a layer with `Spec`, `build` it into a `Kernel` (specialised C, compiled and
cached on disk), and call it on NumPy arrays.  ``bngen.torch`` (imported on request
only) puts the kernels behind drop-in ``torch.nn.BatchNorm*`` modules.
"""

from . import frameworks, oracle, statistics
from .aot.emit import emit
from .aot.fold import fold
from .core.spec import Spec, SpecError
from .jit.build import build
from .jit.kernel import Kernel
from .layers.layer import BatchNormalization
from .layers.population import population_statistics
from .plan.plan import Plan, make_plan
from .version import __version__

__all__ = [
    "Spec", "SpecError", "Plan", "make_plan", "build", "Kernel", "BatchNormalization",
    "emit", "fold", "frameworks", "oracle", "statistics", "population_statistics", "__version__",
]
