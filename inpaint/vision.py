"""torchvision, imported so that it works beside the CPU build of torch.

The torchvision wheel the registry serves is a CUDA build; beside CPU torch its C++ ops library fails
to load, and `import torchvision` then dies registering fake kernels for `torchvision::nms` and
`torchvision::qnms`, ops that only that library defines. We use none of torchvision's C++ ops
(detection, roi_align...), so when the plain import fails for that reason, we declare the two op
schemas ourselves and import again. On a normal install the first import succeeds and nothing is
declared.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_stub_library: torch.library.Library | None = None  # kept alive: dropping it would undefine the ops


def import_torchvision() -> ModuleType:
    """Return the `torchvision` module, declaring its missing op schemas first if its C++ library is absent."""
    global _stub_library
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err) or _stub_library is not None:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _stub_library = torch.library.Library("torchvision", "DEF")
        _stub_library.define("nms" + _NMS_SCHEMA)
        _stub_library.define("qnms" + _NMS_SCHEMA)
        import torchvision
    return torchvision
