"""The diagnostic tools under benchmarks/ compute what they say (their printed figures are measurements)."""

import numpy as np

from benchmarks import grouping_quality


def test_oracle_names_each_group_by_its_majority_true_class():
  groups = np.array([[0, 0, 1, 1],
                     [0, 0, 1, 1],
                     [2, 2, 2, 2]])
  mask = np.array([[3, 3, 0, 5],
                   [3, 0, 5, 5],
                   [255, 255, 255, 255]])  # group 2 is all ignored pixels: stays ignored
  expected = np.array([[3, 3, 5, 5],
                       [3, 3, 5, 5],
                       [255, 255, 255, 255]])
  np.testing.assert_array_equal(grouping_quality.oracle_labels(groups, mask, num_classes=6), expected)
  # One group over everything: the oracle can only name it by the majority, here background.
  one = grouping_quality.oracle_labels(np.zeros((2, 3), int), np.array([[0, 0, 0], [0, 4, 4]]), 5)
  np.testing.assert_array_equal(one, np.zeros((2, 3)))
