"""The long-lived Ray Train + DeepSpeed trainer: exact first-step loss, export, same workers throughout."""

import math
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from helpers import dealt, hf_logps, make_trainer, perturbed, stream_of, with_engine_logps
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spin_ray.pairs import pair_stream
from spin_ray.private import object_store_bytes
from spin_ray.trainer.supervisor import TrainerError


def test_zero3_exact_first_step_export_and_same_workers(ray_session, toy, pairs, tmp_path):
    trainer = make_trainer(toy, tmp_path, "train.zero_stage=3", "train.epochs=2", "spin.stream=false")
    p0 = AutoModelForCausalLM.from_pretrained(toy.model_dir, dtype=torch.float32).eval()
    try:
        first = trainer.train(1, stream_of(with_engine_logps(p0, pairs), tmp_path / "pairs"))
        # The engines' log-probs (here HF's) of the generated tokens are the reference's: ~0 apart.
        assert first.logprob_mismatch[0] < 1e-5 and first.logprob_mismatch[1] < 1e-4
        step1 = first.logs[0]
        real, generated = hf_logps(toy.model_dir, pairs)
        # 16 pairs, 8 per rank, one micro batch each: step 1 sees every pair, policy == reference.
        assert step1["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert step1["logps/real"] == pytest.approx(real.mean(), abs=1e-5)
        assert step1["logps/generated"] == pytest.approx(generated.mean(), abs=1e-5)
        assert step1["rewards/margins"] == 0
        assert first.logs[1]["loss"] < math.log(2)  # step 2 moved away from the reference

        in_store = object_store_bytes()
        weights = trainer.export(1, tmp_path / "iter_1" / "model", lambda: None)
        # Once the coordinator has the packed model, no copy of it stays in the store (rank 0 held
        # one through the next iteration: the whole model pinned while it trains).
        size, deadline = len(weights), time.time() + 10
        del weights
        while object_store_bytes() > in_store + size // 2 and time.time() < deadline:
            time.sleep(0.1)
        assert object_store_bytes() <= in_store + size // 2
        exported_real, exported_gen = hf_logps(tmp_path / "iter_1" / "model", pairs)
        assert np.abs(exported_real - real).max() > 1e-3  # training changed the weights

        second = trainer.train(2, stream_of(pairs, tmp_path / "pairs"))
        # The reference is now the exported p_1: the first step of iteration 2 is log(2) again, and
        # the policy's log-probs (before its first update) are the exported checkpoint's.
        assert second.logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert second.logs[0]["logps/real"] == pytest.approx(exported_real.mean(), abs=1e-5)
        assert second.logs[0]["logps/generated"] == pytest.approx(exported_gen.mean(), abs=1e-5)
        assert {first.pid, second.pid} <= set(trainer.pids) and len(set(trainer.pids)) == 2
        assert trainer.restarts == [] and trainer.generation == 1
    finally:
        trainer.stop()


def test_zero2_engine_reference_odd_pairs_same_workers(ray_session, toy, pairs, tmp_path):
    """spin.reference=engines: the reference log-probs come with the rows (here HF's, added where
    the coordinator adds the engines'), and the first step's loss is log 2."""
    real, generated = hf_logps(toy.model_dir, pairs)
    ref = dict(zip(pairs["uid"].to_pylist(), zip(real, generated, strict=True), strict=True))

    def with_reference(rows):
        for row in rows:
            yield row | {"ref_real_logps": ref[row["uid"]][0], "ref_generated_logps": ref[row["uid"]][1]}

    trainer = make_trainer(toy, tmp_path, "train.zero_stage=2", "spin.reference=engines", "train.batch_size=2")
    try:
        pids = set(trainer.pids)
        for t in (1, 2):
            # Log-probs of engines that were never given p_1: the policy before its first update tells.
            stale = with_engine_logps(perturbed(toy.model_dir, 0, scale=0.0 if t == 1 else 0.05), pairs.slice(0, 7))
            odd = stream_of(stale, tmp_path / "pairs", batch_size=2, score=with_reference)
            result = trainer.train(t, odd)  # 7 pairs on 2 ranks: no hang
            assert (result.logprob_mismatch[0] < 1e-5) if t == 1 else (result.logprob_mismatch[0] > 0.1)
            assert result.steps == 2 and result.pid in pids  # 3 pairs per rank, batches of 2
            if t == 1:
                assert result.logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert set(trainer.pids) == pids
    finally:
        trainer.stop()


def test_sft_arm_exact_nll_and_the_same_steps(ray_session, toy, pairs, tmp_path):
    """The baseline: the same rows and optimizer steps as SPIN (test above: 2 epochs -> 2 steps),
    its loss the token-mean NLL of the real answers, on each rank's 8 rows, averaged over ranks."""
    real, _ = hf_logps(toy.model_dir, pairs)
    by_uid = dict(
        zip(pairs["uid"].to_pylist(), zip(real, map(len, pairs["real_ids"].to_pylist()), strict=True), strict=True)
    )
    stream = stream_of(pairs.select(["uid", "prompt_ids", "real_ids"]), tmp_path / "pairs")
    first_step = dealt(stream, 2)[0]
    nll = [-sum(by_uid[u][0] for u in rank) / sum(by_uid[u][1] for u in rank) for rank in first_step]
    trainer = make_trainer(toy, tmp_path, "spin.objective=sft", "train.zero_stage=2", "train.epochs=2")
    try:
        result = trainer.train(1, stream)
        assert result.steps == 2 and set(result.logs[0]) == {
            "iteration",
            "step",
            "epoch",
            "lr",
            "loss",
            "logps/real",
            "pairs",
        }
        assert result.logs[0]["loss"] == pytest.approx(np.mean(nll), abs=1e-6)
        assert result.logs[0]["logps/real"] == pytest.approx(real.mean(), abs=1e-5)
        assert result.logs[1]["loss"] != result.logs[0]["loss"]  # step 2 sees the weights step 1 moved
    finally:
        trainer.stop()


def test_worker_killed_mid_training_or_export_never_saves_old_weights(ray_session, toy, pairs, tmp_path):
    """SIGKILL a train rank mid-iteration: Ray Train restarts the group, the new workers load p_t
    (the last exported checkpoint) and the stream is replayed from its first pair. Then kills
    around the export: rank 0 frozen before it writes anything (the new group holds p_0 again, so
    the iteration is trained again before p_1 is saved), and rank 1 frozen while rank 0 writes p_1
    (the new group loads that complete p_1 and exports again). fp32 weights equal bit for bit."""
    many = pa.concat_tables([pairs] * 8)  # 128 pairs, 32 steps per rank: time to kill mid-way
    many = many.set_column(0, "uid", pa.array([f"{u}-{i}" for i, u in enumerate(many["uid"].to_pylist())]))
    stored = tmp_path / "iter_1" / "pairs"
    stored.mkdir(parents=True)
    for k in range(4):
        pq.write_table(many.slice(32 * k, 32), stored / f"part-{k:06d}.parquet")
    overrides = ("train.zero_stage=2", "train.batch_size=2", "train.log_every=8", "train.max_restarts=3")
    exported = {}
    for fault in (False, True):
        trainer = make_trainer(toy, tmp_path / str(fault), *overrides)
        model = tmp_path / str(fault) / "model"
        again = lambda: pair_stream([stored], None, 1, 16, 2)  # noqa: E731
        try:
            killer = threading.Thread(target=kill_rank_mid_training, args=(trainer, 1)) if fault else None
            if killer:
                killer.start()
            result = trainer.train(1, again())
            if killer:
                killer.join()
                kill_around_export(trainer, 0, model, again, written=False)
                kill_around_export(trainer, 1, model, again, written=True)
            else:
                trainer.export(1, model, again)
            exported[fault] = load_file(model / "model.safetensors")
        finally:
            trainer.stop()
        assert result.steps == 32
    assert [r["during"] for r in trainer.restarts] == ["train", "export", "export"]
    assert trainer.generation == 4 and not set(trainer.pids) & set(trainer.restarts[0]["pids"])
    assert exported[True].keys() == exported[False].keys()
    for name, tensor in exported[False].items():
        assert torch.equal(exported[True][name], tensor), name


def kill_around_export(trainer, rank: int, model, again, written: bool) -> None:
    """Freezes `rank`, starts the export, SIGKILLs the rank (once rank 0 has written the
    checkpoint, if `written`) and waits for the export to end."""
    pid = trainer.pids[rank]
    shutil.rmtree(model, ignore_errors=True)
    os.kill(pid, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        export = pool.submit(trainer.export, 1, model, again)
        if written:
            deadline = time.monotonic() + 60
            while not (model / "model.safetensors").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # rank 0 tells the channel right after the rename: a group starting now loads p_1
        else:
            time.sleep(1)
            assert not model.exists()
        os.kill(pid, signal.SIGKILL)
        export.result(timeout=600)


def test_odd_stream_gives_both_ranks_the_same_steps_and_a_rank_error_surfaces_at_once(
    ray_session, toy, pairs, tmp_path
):
    """spin.stream on 2 ranks: 7 pairs in batches of 2 -> 3 pairs and 2 steps per rank, no hang;
    the first step's loss is log 2 (policy = reference). Then rank 1 raises while rank 0 waits
    for it in a collective: the error reaches the caller in seconds, not after the stall timeout."""
    stored = tmp_path / "iter_1" / "pairs"
    stored.mkdir(parents=True)
    pq.write_table(pairs.slice(0, 7), stored / "part-000000.parquet")
    trainer = make_trainer(toy, tmp_path, "train.batch_size=2", "train.max_restarts=0")
    try:
        for t in (1, 2):
            result = trainer.train(t, pair_stream([stored], None, t, 4, 2))
            assert result.steps == 2 and result.logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert trainer.restarts == []
        tick = time.monotonic()
        with pytest.raises(TrainerError, match=r"rank 1 failed in raise_on_rank_1:(.|\n)*a bad batch on rank 1"):
            trainer._call(raise_on_rank_1)
        assert time.monotonic() - tick < 10  # train.stall_timeout_s is 120 here
    finally:
        for pid in trainer.pids:  # rank 0 waits in its all_reduce for good
            os.kill(pid, signal.SIGKILL)
        trainer.stop()


def raise_on_rank_1(worker) -> None:
    """A task (run by every rank) in which rank 1 fails while rank 0 waits for it in a collective."""
    if worker.rank == 1:
        raise ValueError("a bad batch on rank 1")
    torch.distributed.all_reduce(torch.ones(1))


def kill_rank_mid_training(trainer, rank: int) -> None:
    """Waits until `rank` reports a training step past the first few, then SIGKILLs its process."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, _ = ray.get(trainer.channel.poll.remote(-1)).steps.get(rank, (0, 0))
        if done >= 4:
            os.kill(trainer.pids[rank], signal.SIGKILL)
            return
        time.sleep(0.05)
    raise AssertionError("training never reached step 4")


def test_frozen_worker_is_reported_with_what_each_rank_was_doing(ray_session, toy, pairs, tmp_path):
    trainer = make_trainer(toy, tmp_path, "train.stall_timeout_s=5", "train.max_restarts=0")
    try:
        os.kill(trainer.pids[1], signal.SIGSTOP)  # rank 0 then waits for it in the first collective
        tick = time.monotonic()
        with pytest.raises(TrainerError, match=r"stalled while running 'train'") as e:
            trainer.train(1, stream_of(pairs, tmp_path / "pairs"))
        assert 5 < time.monotonic() - tick < 60  # 5 s of silence, on a busy machine
        assert f"rank 1 (pid {trainer.pids[1]}) silent for" in str(e.value) and "train.stall_timeout_s" in str(e.value)
    finally:
        for pid in trainer.pids:
            os.kill(pid, signal.SIGKILL)
        trainer.stop()
