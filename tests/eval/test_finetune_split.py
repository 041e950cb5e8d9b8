"""mmssl eval finetune trains on --train and reports on --test (counts from the shards
read by tarfile)."""

from test_eval_tasks import naive_samples

from mmssl.eval.cli import run_task


def test_finetune_reports_the_test_split(tmp_path, tiny_model_dir, train_shards, test_shards):
    res = run_task(
        [
            "finetune",
            "--model",
            tiny_model_dir,
            "--train",
            train_shards,
            "--test",
            test_shards,
            "--steps",
            "1",
            "--train-batch-size",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert len(naive_samples(train_shards)) != len(naive_samples(test_shards))
    assert res["num_test"] == len(naive_samples(test_shards))
    assert res["num_train"] == len(naive_samples(train_shards))
