"""Segmentation metrics computed exactly as mmsegmentation does (`mmseg.core.evaluation.metrics`).

Per-class intersection and union are accumulated over the whole set (a confusion matrix), pixels whose
label is `ignore_index` are left out of prediction and label alike, IoU = intersection / union,
Acc = intersection / label area, classes with an empty union (or label area) are NaN and left out of
the means; aAcc = total intersection / total labelled pixels.
"""

import numpy as np


class ConfusionMatrix:
  """Accumulates a [num_classes, num_classes] matrix (rows: label, columns: prediction)."""

  def __init__(self, num_classes: int, ignore_index: int = 255):
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.matrix = np.zeros((num_classes, num_classes), np.int64)

  def update(self, pred: np.ndarray, label: np.ndarray) -> None:
    """Adds one image (or a batch) of integer maps of equal shape."""
    if pred.shape != label.shape:
      raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    keep = label != self.ignore_index
    label, pred = label[keep].astype(np.int64), pred[keep].astype(np.int64)
    if label.size and (label.max() >= self.num_classes or label.min() < 0):
      raise ValueError(f"label ids must be in [0, {self.num_classes}) or {self.ignore_index}; "
                       f"found {int(label.max())}")
    self.matrix += np.bincount(label * self.num_classes + pred,
                               minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

  def merge(self, other: "ConfusionMatrix") -> None:
    self.matrix += other.matrix


def metrics_from_confusion(matrix: np.ndarray) -> dict[str, object]:
  """aAcc, mIoU, mAcc (as fractions) and per-class IoU / Acc arrays from a confusion matrix."""
  matrix = matrix.astype(np.float64)
  intersect = np.diag(matrix)
  area_label = matrix.sum(axis=1)
  area_pred = matrix.sum(axis=0)
  union = area_label + area_pred - intersect
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, intersect / union, np.nan)
    acc = np.where(area_label > 0, intersect / area_label, np.nan)
  return {"aAcc": float(intersect.sum() / max(area_label.sum(), 1)),
          "mIoU": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
          "mAcc": float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else float("nan"),
          "IoU": iou, "Acc": acc}
