"""The environment tools/bootstrap.py builds is complete for detectron2's own tools: its
Visualizer (which imports cv2) draws predictions."""
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import Visualizer

import aqd_d2  # noqa: F401  (registers the embedded datasets' metadata)


def test_detectron2_visualizer_draws_predictions():
    image = np.full((64, 80, 3), 255, dtype=np.uint8)
    inst = Instances((64, 80), pred_boxes=Boxes(torch.tensor([[8.0, 8.0, 40.0, 48.0]])),
                     scores=torch.tensor([0.9]), pred_classes=torch.tensor([1]))
    meta = MetadataCatalog.get("aqd_shapes_tiny_val")
    out = Visualizer(image, meta).draw_instance_predictions(inst).get_image()
    assert out.shape == image.shape
    assert (out != 255).any(axis=2).sum() > 50  # the box and its label were drawn
