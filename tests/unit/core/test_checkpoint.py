import pytest

from medusa_train.training.batching import global_batch, shard
from medusa_train.training.checkpoint import atomic_write, latest_checkpoint, list_checkpoints, read_state, save_checkpoint_dir


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_checkpoints_rotate_and_ignore_partial(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint_dir(tmp_path, step, lambda d: (d / "w").write_text("x"), {"a": step}, keep=2)
    (tmp_path / ".step_40.tmp").mkdir()  # a checkpoint killed half-way
    (tmp_path / "step_50").mkdir()  # no state file: incomplete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_20", "step_30"]
    assert read_state(latest_checkpoint(tmp_path)) == {"a": 30, "step": 30}


def test_global_batches_are_deterministic_and_cover_epochs():
    first_epoch = [i for b in range(5) for i in global_batch(20, 4, seed=3, index=b)]
    assert sorted(first_epoch) == list(range(20))
    assert global_batch(20, 4, 3, 7) == global_batch(20, 4, 3, 7)
    assert global_batch(20, 4, 3, 5) != global_batch(20, 4, 3, 0)  # next epoch reshuffles


def test_shards_partition_a_batch():
    rows = list(range(8))
    assert shard(rows, 0, 2) + shard(rows, 1, 2) == rows


def test_too_few_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="only 3 training rows"):
        global_batch(3, 8, 0, 0)
