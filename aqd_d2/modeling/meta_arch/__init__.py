"""Meta-architectures registered in detectron2's META_ARCH_REGISTRY (imported for that)."""
from .quantized import QuantizedDetector  # noqa: F401
