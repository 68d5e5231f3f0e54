"""bngen: a compiler for batch-normalization kernels.

Describe a layer with `Spec`, `build` it into a `Kernel` (specialised C, compiled and
cached on disk), and call it on NumPy arrays.  ``bngen.torch`` (imported on request
only) puts the kernels behind drop-in ``torch.nn.BatchNorm*`` modules.
"""

from . import frameworks, oracle, statistics  # noqa: E402
from .build import build  # noqa: E402
from .emit import emit  # noqa: E402
from .fold import fold  # noqa: E402
from .kernel import Kernel  # noqa: E402
from .layer import BatchNormalization  # noqa: E402
from .plan import Plan, make_plan  # noqa: E402
from .population import population_statistics  # noqa: E402
from .spec import Spec, SpecError  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "Spec", "SpecError", "Plan", "make_plan", "build", "Kernel", "BatchNormalization",
    "emit", "fold", "frameworks", "oracle", "statistics", "population_statistics", "__version__",
]
