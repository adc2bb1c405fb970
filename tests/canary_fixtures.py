"""Candidates for the canary tests: logistic regressions that fail on some requests, answer slowly, or score
higher than the champion. Each passes the staging smoke test on the smoke rows (``smoke_frame``)."""

import time

import numpy as np
from sklearn.linear_model import LogisticRegression

# Column 1 of the preprocessed matrix is the standardised monthly_charges: above this, about a fifth of rows.
CHARGES_Z = 1


class FaultyClassifier(LogisticRegression):
    """Fails on every request holding a row with standardised monthly charges above ``fail_above``."""

    def __init__(self, fail_above: float = 0.85, max_iter: int = 1000) -> None:
        super().__init__(class_weight="balanced", max_iter=max_iter, random_state=0)
        self.fail_above = fail_above

    def predict_proba(self, X):  # noqa: N803 - scikit-learn's signature
        if (np.asarray(X)[:, CHARGES_Z] > self.fail_above).any():
            raise RuntimeError("injected failure")
        return super().predict_proba(X)


class SlowClassifier(LogisticRegression):
    """Answers after ``delay_s`` more."""

    def __init__(self, delay_s: float = 0.1, max_iter: int = 1000) -> None:
        super().__init__(class_weight="balanced", max_iter=max_iter, random_state=0)
        self.delay_s = delay_s

    def predict_proba(self, X):  # noqa: N803
        time.sleep(self.delay_s)
        return super().predict_proba(X)


class ShiftedClassifier(LogisticRegression):
    """Scores every row ``shift`` higher (clipped to [0, 1]): no errors, no delay, another score distribution."""

    def __init__(self, shift: float = 0.2, max_iter: int = 1000) -> None:
        super().__init__(class_weight="balanced", max_iter=max_iter, random_state=0)
        self.shift = shift

    def predict_proba(self, X):  # noqa: N803
        p = np.clip(super().predict_proba(X)[:, 1] + self.shift, 0.0, 1.0)
        return np.column_stack([1 - p, p])


def smoke_frame(frame):
    """Rows none of the candidates fails on: the staging smoke test passes, live traffic tells them apart."""
    return frame[frame["monthly_charges"] < 70].head(20)
