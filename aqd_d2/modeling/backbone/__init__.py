"""Backbone builders registered in detectron2's BACKBONE_REGISTRY (imported for that)."""
from .aqd_fpn import build_aqd_resnet_fpn_backbone  # noqa: F401
from .quicknet import build_quicknet_backbone  # noqa: F401,E402  ("build_quicknet_backbone")
from .darknet import build_darknet19_backbone, build_mobilenet_yolo_backbone  # noqa: F401,E402
from .vgg import build_vgg16_ssd_backbone  # noqa: F401,E402  (SSD300 VGG16 + extras)
from .mobilenet_ssd import build_mobilenet_ssd_backbone  # noqa: F401,E402  (MobileNetV1 SSD)
from .bireal_resnet import build_bireal_resnet_backbone, build_bireal_resnet_fpn_backbone  # noqa: F401,E402
from .shufflenetv2 import build_shufflenetv2_backbone  # noqa: F401,E402  ("build_shufflenetv2_backbone")
