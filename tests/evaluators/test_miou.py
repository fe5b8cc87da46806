"""mIoU against an independent implementation written from the definition (mmseg's total_area_to_metrics)."""

import numpy as np
import pytest

from groupvit_jax.evaluators.miou import ConfusionMatrix, metrics_from_confusion


def _reference(preds, labels, num_classes, ignore=255):
  """Per image: mask ignore pixels, histogram intersection / prediction / label areas; sum; divide."""
  inter = np.zeros(num_classes)
  area_pred = np.zeros(num_classes)
  area_label = np.zeros(num_classes)
  for p, l in zip(preds, labels):
    m = l != ignore
    p, l = p[m], l[m]
    hit = p[p == l]
    inter += np.histogram(hit, bins=num_classes, range=(0, num_classes - 1))[0]
    area_pred += np.histogram(p, bins=num_classes, range=(0, num_classes - 1))[0]
    area_label += np.histogram(l, bins=num_classes, range=(0, num_classes - 1))[0]
  union = area_pred + area_label - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / union
    acc = inter / area_label
  return inter.sum() / area_label.sum(), np.nanmean(iou), np.nanmean(acc), iou


def test_matches_independent_implementation_with_ignore_and_absent_classes():
  rng = np.random.RandomState(0)
  num_classes = 9
  preds, labels = [], []
  for _ in range(12):
    shape = tuple(rng.randint(20, 60, size=2))
    label = rng.randint(0, num_classes - 2, size=shape)  # classes 7, 8 never in the labels
    label[rng.rand(*shape) < 0.15] = 255
    pred = np.where(rng.rand(*shape) < 0.6, label, rng.randint(0, num_classes - 1, size=shape))  # 8 never predicted
    pred[pred == 255] = 0
    preds.append(pred)
    labels.append(label)
  cm = ConfusionMatrix(num_classes)
  for p, l in zip(preds, labels):
    cm.update(p, l)
  got = metrics_from_confusion(cm.matrix)
  aacc, miou, macc, iou = _reference(preds, labels, num_classes)
  assert got["aAcc"] == pytest.approx(aacc, abs=1e-12)
  assert got["mIoU"] == pytest.approx(miou, abs=1e-12)
  assert got["mAcc"] == pytest.approx(macc, abs=1e-12)
  np.testing.assert_allclose(got["IoU"], iou, equal_nan=True)
  assert np.isnan(got["IoU"][8]) and got["IoU"][7] == 0.0  # 7 predicted but absent: IoU 0; 8 nowhere: NaN


def test_merging_matrices_equals_one_pass():
  rng = np.random.RandomState(1)
  a, b, whole = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
  for i in range(6):
    p, l = rng.randint(0, 5, (10, 10)), rng.randint(0, 5, (10, 10))
    (a if i % 2 else b).update(p, l)
    whole.update(p, l)
  a.merge(b)
  np.testing.assert_array_equal(a.matrix, whole.matrix)


def test_bad_labels_are_named():
  cm = ConfusionMatrix(3)
  with pytest.raises(ValueError, match=r"label ids must be in \[0, 3\) or 255; found 7"):
    cm.update(np.zeros((2, 2), int), np.full((2, 2), 7))
  with pytest.raises(ValueError, match="prediction shape"):
    cm.update(np.zeros((2, 3), int), np.zeros((2, 2), int))
