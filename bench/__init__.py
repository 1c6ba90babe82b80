"""Benchmarks: how fast selector scores one config, against the usual ways to do it.

`python -m bench` (or `make bench`) times one K-fold trial four ways on the same prepared folds,
alternating the contenders so that drift in the machine's speed hits all of them alike:

  (a) a typical Optuna + DataLoader script that trains the folds in turn (the baseline),
  (b) scikit-learn's MLPClassifier with the same network under `cross_val_score` (float32 input),
  (c) selector's reference engine (`selector.engine.cross_validate`),
  (d) selector's fold-stacked engine (`selector.stacked.cross_validate`),

on digits (5 folds, 3 x 256 ReLU, dropout 0.2, AdamW, batch 128, 20 epochs) and on
make_classification 50000 x 100 (5 classes, 5 epochs, same network). Each row gives the median
seconds, the speed-up over (a), the training arithmetic's rate as a share of the machine's float32
matmul ceiling (measured in the same run), and the mean CV accuracy after the last epoch.
"""

from __future__ import annotations
