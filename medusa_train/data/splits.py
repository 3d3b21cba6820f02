"""Train/eval split of a dataset, seeded."""

from __future__ import annotations

import datasets


def train_eval_split(ds: datasets.Dataset, eval_fraction: float,
                     seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval): eval holds round(eval_fraction * len) rows (at least 1 when the
    fraction is > 0), picked by a seeded shuffle. eval_fraction 0 gives an empty eval set."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0:
        return ds, ds.select([])
    n_eval = max(1, round(eval_fraction * len(ds)))
    if n_eval >= len(ds):
        raise ValueError(f"eval_fraction={eval_fraction} of {len(ds)} rows leaves nothing to train on")
    parts = ds.train_test_split(test_size=n_eval, seed=seed)
    return parts["train"], parts["test"]
