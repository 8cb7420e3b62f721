"""Data parallelism: 2 CPU processes over gloo reproduce one process with the same global batch."""
import os
import socket

import torch
import torch.multiprocessing as mp

from jitfast import read_checkpoint, train
from jitfast.training.progress import read_metrics

ARGS = ["--model", "JiT-T/8", "--image-size", "16", "--batch-size", "4", "--steps", "3",
        "--log-every", "1", "--warmup-steps", "1", "--sample-steps", "2",
        "--samples-per-class", "1", "--grid-classes", "2", "--device", "cpu", "--cpu-threads", "1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    train.main(argv)


def run_distributed(argv, world=2):
    mp.spawn(worker, args=(world, free_port(), argv), nprocs=world)


def single_process(argv):
    threads = torch.get_num_threads()  # main() sets it to --cpu-threads
    try:
        return train.main(argv)
    finally:
        torch.set_num_threads(threads)


def assert_same_weights(a, b):
    for key in ("model", "model_ema1", "model_ema2"):
        for name, value in b[key].items():
            torch.testing.assert_close(a[key][name], value, rtol=1e-5, atol=1e-6)


def assert_equal_runs(two_dir, one, metrics=("loss",)):
    two_losses = [[r[k] for k in metrics] for r in read_metrics(two_dir / "metrics.jsonl")]
    one_losses = [[r[k] for k in metrics] for r in read_metrics(one["metrics"])]
    assert len(two_losses) == 3
    torch.testing.assert_close(two_losses, one_losses, rtol=1e-5, atol=0)
    assert_same_weights(read_checkpoint(two_dir / "checkpoint-00000003.pt"),
                        read_checkpoint(one["checkpoint"]))


def test_ddp_two_processes_equal_one(tmp_path):
    run_distributed(ARGS + ["--out", str(tmp_path / "two")])
    assert_equal_runs(tmp_path / "two", single_process(ARGS + ["--out", str(tmp_path / "one")]))


def test_ddp_and_fsdp_two_processes_train_pmf_as_one(tmp_path):
    """pMF: each process draws its share of the batch (the flow-matching examples all in the
    first share, the label drops where they fall); DDP averages the gradients of the JVP pass's
    loss as of any other. FSDP2 gathers each block's weights for its dual form too
    (``forward_dual``), Muon orthogonalises the whole matrices of its sharded rows, the EDM EMAs
    update the shards; resuming its step-2 checkpoint, still sharded, repeats step 3."""
    # at JiT's lr here: Muon's and Adam's normalised steps carry the all-reduce's rounding of the
    # gradients into the weights in proportion to the lr (pMF's 1e-2: about 3e-5)
    pmf = ["--model", "pMF-T/4", *ARGS[2:], "--cfg-beta", "2", "--lr", "2e-4"]
    metrics = ("loss", "loss_u", "loss_v")
    one = single_process(pmf + ["--out", str(tmp_path / "one")])
    run_distributed(pmf + ["--out", str(tmp_path / "ddp")])
    assert_equal_runs(tmp_path / "ddp", one, metrics)
    sharded = pmf + ["--fsdp", "--activation-checkpointing", "--ckpt-every", "2"]
    run_distributed(sharded + ["--out", str(tmp_path / "fsdp")])
    assert_equal_runs(tmp_path / "fsdp", one, metrics)
    assert_resumes(sharded, tmp_path / "fsdp", tmp_path / "resumed")


def test_fsdp_two_processes_equal_one_and_resume(tmp_path):
    """FSDP2 with activation checkpointing; then resuming its step-2 checkpoint, still sharded,
    repeats step 3 exactly."""
    sharded = ARGS + ["--fsdp", "--activation-checkpointing"]
    run_distributed(sharded + ["--ckpt-every", "2", "--out", str(tmp_path / "two")])
    assert_equal_runs(tmp_path / "two", single_process(ARGS + ["--out", str(tmp_path / "one")]))
    assert_resumes(sharded, tmp_path / "two", tmp_path / "resumed")


def assert_resumes(argv, run, resumed):
    """Resuming `run`'s step-2 checkpoint with `argv` repeats its step 3 exactly."""
    run_distributed(argv + ["--resume", str(run / "checkpoint-00000002.pt"), "--out",
                            str(resumed)])
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [3]
    assert again[0]["loss"] == read_metrics(run / "metrics.jsonl")[-1]["loss"]
    assert_same_weights(read_checkpoint(resumed / "checkpoint-00000003.pt"),
                        read_checkpoint(run / "checkpoint-00000003.pt"))
