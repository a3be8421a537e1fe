"""Meta-architectures registered in detectron2's META_ARCH_REGISTRY (imported for that)."""
from .quantized import QuantizedDetector  # noqa: F401
from .retinanet import AQDRetinaNet  # noqa: F401,E402  ("AQDRetinaNet")
from .fcos import FCOS  # noqa: F401,E402  ("FCOS")
from .centernet import CenterNet  # noqa: F401,E402  ("CenterNet")
from .yolov2 import YOLOv2  # noqa: F401,E402  ("YOLOv2")
from .ssd import SSD  # noqa: F401,E402  ("SSD")
from .lighthead import LightHeadROIHeads  # noqa: F401,E402  (ROI_HEADS "LightHeadROIHeads")
from .res5_basic import Res5BasicBoxHead  # noqa: F401,E402  (ROI_BOX_HEAD "Res5BasicBoxHead")
from .classifier import ImageClassifier  # noqa: F401,E402  ("ImageClassifier", backbone pretraining)
