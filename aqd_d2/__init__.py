"""aqd_d2: quantized (2/3/4-bit) and binary detectors as a detectron2 plugin.

``import aqd_d2`` first makes the installed detectron2 usable (:mod:`aqd_d2.compat`: a no-op on
a full detectron2 build), then imports the subpackages whose import registers builders in
detectron2's registries (backbones, meta-architectures) and the embedded datasets in
``DatasetCatalog``. Nothing here changes detectron2's default config: call
:func:`add_aqd_config` on your cfg.
"""
from . import compat

compat.apply()

# Imported for their registrations (detectron2 registries and DatasetCatalog).
from . import data  # noqa: E402,F401
from . import modeling  # noqa: E402,F401
from .config import add_aqd_config, validate_aqd_config, ConfigError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["add_aqd_config", "validate_aqd_config", "ConfigError", "__version__"]
