"""The job's head-pinned actors (engine pool, trainer channel, coordinator) are not restarted:
each one's death stops the job within seconds, naming it, and the same command then resumes
exactly (docs/failures.md says why). One run dir, four jobs: three killed mid-iteration by PID,
the fourth finishes; its pairs and p_1 equal a fault-free run's."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from helpers import toy_config
from safetensors.torch import load_file

from spin_ray.cluster import ActorLost
from spin_ray.driver.job import run_job
from spin_ray.driver.prepare import prepare

JOB_ACTORS = {"Coordinator", "EnginePool", "Channel", "Engine"}


def alive_pids() -> dict[str, int]:
    """Actor class name -> pid, for this test's Ray (its processes descend from this one; Ray
    titles an actor's process `ray::Class.method`). The test runs one job at a time."""
    pids = {}
    for p in psutil.Process().children(recursive=True):
        try:
            title = p.cmdline()
        except psutil.Error:
            continue
        if title and title[0].startswith("ray::"):
            pids[title[0].removeprefix("ray::").split(".")[0].split(" ")[0]] = p.pid
    return pids


def wait_for(what: str, check, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} {alive_pids()}")


def test_a_dead_supervisor_stops_the_job_in_seconds_and_the_same_command_resumes(ray_session, toy, tmp_path):
    small = ("data.max_examples=128", "spin.iterations=1", "run.wandb_mode=disabled")
    reference = run_job(cfg := toy_config(tmp_path / "reference", toy.train_path, *small), prepare(cfg))
    out = tmp_path / "run"
    many_batches = "generation.batch_size=8"  # operational (pairs do not change): generation lasts long enough
    cfg = toy_config(out, toy.train_path, *small, many_batches)
    generating = out / "iter_1" / "pairs.tmp"
    with ThreadPoolExecutor(1) as pool:
        for victim, named in (
            ("EnginePool", "the engine pool"),
            ("Channel", "the trainer's channel"),
            ("Coordinator", "the coordinator actor"),
        ):
            job = pool.submit(run_job, cfg, prepare(cfg))
            wait_for("the first pairs", lambda: any(generating.glob("part-*.parquet")))
            os.kill(wait_for(victim, lambda v=victim: alive_pids().get(v)), signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(ActorLost, match=f"{named} died.*run the same command to resume"):
                job.result(timeout=120)
            assert time.monotonic() - killed < 30, victim
            # all of them: a dying actor's pid, read by the next round, would be the wrong victim
            wait_for("the job's actors to go", lambda: not JOB_ACTORS & alive_pids().keys(), 60)
        summary = pool.submit(run_job, cfg, prepare(cfg)).result(timeout=600)
    assert [row["iteration"] for row in summary["history"]] == [0, 1]
    ref_out = Path(reference["output_dir"])
    got, want = (pq.read_table(d / "iter_1" / "pairs").to_pylist() for d in (out, ref_out))
    assert len(got) == 128
    assert sorted((r["uid"], r["generated_ids"]) for r in got) == sorted((r["uid"], r["generated_ids"]) for r in want)
    final, expected = (load_file(d / "iter_1" / "model" / "model.safetensors") for d in (out, ref_out))
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
