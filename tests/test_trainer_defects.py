"""The trainer's quiet paths, in process (no Ray): gradient accumulation that ends every iteration
on an optimizer step, checkpoint replacement that always leaves a complete one on disk, and a
feeder whose threads end and close the stream when it is stopped."""

import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
from helpers import free_port, stream_of

from spin_ray.config import LoraConfig, load_config
from spin_ray.lora import merge, peft_config
from spin_ray.trainer import feeder as feeder_module
from spin_ray.trainer.ds import Micro, accumulation, lr_at
from spin_ray.trainer.feeder import Feeder


@pytest.fixture(scope="module")
def world_of_one():
    """This process as a torch.distributed world of one over gloo, as a CPU train rank sees it."""
    saved = dict(os.environ)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    os.environ |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    torch.distributed.init_process_group("gloo")
    yield
    torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def spin_worker(out_dir: Path, model_path: Path, holds: int, *overrides: str):
    """A train rank in this process (a world of one) on a few toy pairs per micro batch."""
    from spin_ray.trainer.worker import SpinWorker

    cfg = load_config(
        None,
        [
            f"run.output_dir={out_dir}",
            "train.num_workers=1",
            "train.batch_size=2",
            "train.log_every=1",
            "train.lr=1e-3",
            "train.optimizer=adamw",
            "train.schedule=linear",
            "train.warmup_ratio=0",
            *overrides,
        ],
    )
    return SpinWorker(cfg, str(model_path), holds)


def fed(worker, batches: list[dict]) -> None:
    """The rank's next micro batches, without the channel."""
    worker.fed_batches = lambda count: iter(batches[:count])


def weights(worker) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in worker.engine.module.state_dict().items()}


def micro_batches(pairs: pa.Table) -> list[dict]:
    return [pairs.slice(i, 2).to_pydict() for i in range(0, pairs.num_rows, 2)]


def test_the_accumulation_plan_steps_on_each_epochs_last_smaller_group():
    plan = accumulation(per_epoch=63, epochs=2, grad_accum=4)  # the iteration: 63 micro batches per rank
    assert len(plan) == 126 and sum(m.last for m in plan) == 32  # 15 full steps and one of 3, per epoch
    assert plan[-1].last and plan[62].last and plan[62].step == 15 and plan[62].group == 3
    assert [m.group for m in plan[60:67]] == [3, 3, 3, 4, 4, 4, 4]
    assert accumulation(per_epoch=2, epochs=1, grad_accum=4) == [Micro(0, 2, False), Micro(0, 2, True)]


def test_an_iteration_ends_on_an_optimizer_step_and_a_resume_equals_a_straight_run(world_of_one, toy, pairs, tmp_path):
    """6 micro batches with grad_accum=4: steps of 4 and 2 in every iteration, the lr decaying over
    those 2 steps. So the run that exports p_1 and goes on equals, bit for bit, the run that
    resumes from the exported p_1 (DeepSpeed's job-wide count had left 2 micro batches over,
    missing from p_1 and added into iteration 2's first step, but not on a resume)."""
    batches = micro_batches(pairs)  # 8 of 2 pairs
    straight = spin_worker(tmp_path, toy.model_dir, 0, "train.grad_accum=4")
    lrs: list[float] = []
    inner = straight.optimizer.optimizer  # torch's AdamW under DeepSpeed's ZeRO wrapper
    inner.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    fed(straight, batches[:6])
    straight.train(1, rows_per_rank=12)
    assert lrs == [lr_at(0, 2, 1e-3, 0, "linear"), lr_at(1, 2, 1e-3, 0, "linear")] == [1e-3, 5e-4]
    model_dir = tmp_path / "iter_1" / "model"
    straight.export(1, str(model_dir), pack_weights=False)
    fed(straight, batches[2:])
    straight.train(2, rows_per_rank=12)
    assert len(lrs) == 4

    resumed = spin_worker(tmp_path, model_dir, 1, "train.grad_accum=4")
    fed(resumed, batches[2:])
    resumed.train(2, rows_per_rank=12)
    ours, theirs = weights(straight), weights(resumed)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_smaller_last_step_is_the_mean_of_its_micro_batches(world_of_one, toy, pairs, tmp_path):
    """2 micro batches in an iteration with grad_accum=4 make one step, their mean as with
    grad_accum=2 (HF Trainer's scaling), under ZeRO-3; before, they made none."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    batches = micro_batches(pairs)[:2]
    after = []
    try:
        for accum in (4, 2):
            worker = spin_worker(tmp_path, toy.model_dir, 0, f"train.grad_accum={accum}", "train.zero_stage=3")
            fed(worker, batches)
            worker.train(1, rows_per_rank=4)
            assert worker.engine.global_steps == 1
            after.append(worker.engine._zero3_consolidated_16bit_state_dict())
    finally:
        unset_hf_deepspeed_config()  # the workers may outlive the test: later loads here must not be ZeRO-3's
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])


def complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def export(out: Path, toy, tmp_path):
    worker = spin_worker(tmp_path, toy.model_dir, 0)
    return lambda: worker.export(0, str(out), pack_weights=False)


def merged(out: Path, toy, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(toy.model_dir, dtype=torch.float32)
    get_peft_model(model, peft_config(LoraConfig(r=8))).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(toy.model_dir).save_pretrained(adapter)
    return lambda: merge(adapter, out, "float32")


@pytest.mark.parametrize("writer", [export, merged])
def test_replacing_a_checkpoint_always_leaves_a_complete_one(writer, request, toy, tmp_path, monkeypatch):
    """A checkpoint written again (an export whose reply a restart lost, a merge of a redone
    iteration): after every rename and removal a complete one is on disk, and a crash before the new
    one is in place leaves the old one where it was. Before, the old one was removed first."""
    if writer is export:
        request.getfixturevalue("world_of_one")
    final = tmp_path / "iter_1" / "model"
    write = writer(final, toy, tmp_path)
    write()
    kept = (final / "model.safetensors").read_bytes()
    rename, rmtree = Path.rename, shutil.rmtree
    complete_after_each: list[bool] = []

    def watched(operation):
        def run(*args, **kwargs):
            result = operation(*args, **kwargs)
            complete_after_each.append(complete(final) or complete(final.with_name(final.name + ".old")))
            return result

        return run

    monkeypatch.setattr(shutil, "rmtree", watched(rmtree))
    monkeypatch.setattr(Path, "rename", watched(rename))
    write()
    assert complete_after_each and all(complete_after_each) and complete(final)
    assert not final.with_name(final.name + ".old").exists()

    def crash_before_the_new_one_is_in(self, target):
        if self.name.endswith(".tmp"):
            raise OSError("killed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_before_the_new_one_is_in)
    with pytest.raises(OSError, match="killed"):
        write()
    assert complete(final) and (final / "model.safetensors").read_bytes() == kept


def open_files() -> set[str]:
    fds = Path("/proc/self/fd")
    return {os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()}


def test_stopping_the_feeder_ends_both_threads_and_closes_the_stream(tmp_path, monkeypatch):
    """A group restart: the channel answers the feed it waited on with False (the group is gone)
    and the coordinator stops the feeder. Before, only the sender ended: the maker waited forever
    on its full queue, holding the stream and its open parquet file."""
    monkeypatch.setattr(feeder_module, "ray", SimpleNamespace(put=lambda x: x, get=lambda x: x))
    restarted = threading.Event()
    channel = SimpleNamespace(
        feed=SimpleNamespace(remote=lambda generation, batches: restarted.wait() and False),
        end_feed=SimpleNamespace(remote=lambda generation: None),
    )
    rows = [{"uid": f"u{i}", "prompt_ids": [1], "real_ids": [2], "generated_ids": [3]} for i in range(400)]
    stream = stream_of(pa.Table.from_pylist(rows), tmp_path / "pairs", window=4, batch_size=1)
    part = str(tmp_path / "pairs" / "part-000000.parquet")
    before = set(threading.enumerate())
    feeder = Feeder(channel, 1, stream.steps(1, 1))  # 400 steps: more than its queue holds
    threads = set(threading.enumerate()) - before
    assert len(threads) == 2
    deadline = time.monotonic() + 10
    while part not in open_files() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert part in open_files()  # the maker is reading it
    restarted.set()
    feeder.stop()
    for thread in threads:
        thread.join(timeout=5)
    assert not [thread for thread in threads if thread.is_alive()]
    assert part not in open_files()
