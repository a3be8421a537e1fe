"""Detectron2 building blocks that aqd_d2 registers (backbones, meta-architectures, losses)."""
from . import backbone  # noqa: F401
from . import meta_arch  # noqa: F401
from . import distill  # noqa: F401,E402  (registers the "KnowledgeTransfer" meta-architecture)
from . import bidet  # noqa: F401,E402  (registers "BiDetRCNN", "BiDetSSD", "BiDetROIHeads")
from . import box_head  # noqa: F401,E402  (registers the "BiRealFCHead" box head)
