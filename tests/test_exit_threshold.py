"""Early exit's threshold choice (bertexport/students/exit_threshold.py); the threshold on
real compiled segments is tested in test_early_exit.py."""

import numpy as np

from bertexport.students.exit_threshold import choose_threshold


def test_choose_threshold_is_the_smallest_before_agreement_falls():
    # 4 rows, one exit: confidences 0.95 (right), 0.9 (right), 0.8 (wrong), 0.7 (right)
    exits = [np.log(np.array([[0.95, 0.05], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]))]
    final = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    c = choose_threshold(exits, final, [1], 2, agreement=1.0)
    assert 0.8 <= c["threshold"] < 0.9 and c["agreement"] == 1.0 and c["exits"] == {"1": 2, "2": 2}
    c = choose_threshold(exits, final, [1], 2, agreement=0.75)  # one miss allowed: every row may leave
    assert c["threshold"] < 0.7 and c["agreement"] == 0.75 and c["mean_layers"] == 1.0
