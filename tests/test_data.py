import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spin_ray.chat import encode, stop_token_ids
from spin_ray.data import (
    ROW_GROUP,
    DataError,
    load_sft,
    read_sft,
    write_permuted,
    write_training_set,
)
from spin_ray.loop.generate import sample_seed
from spin_ray.toy_model import make_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def conv(q: str, a: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def load(path, tok, **kw):
    return load_sft(path, tok, max_prompt_tokens=kw.pop("max_prompt_tokens", 64), max_response_tokens=16, **kw)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_prompt_response_split_and_uids(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "id": "a",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "1+2="},
                    {"role": "assistant", "content": "3"},
                ],
            },
            conv("2+2=", "4"),
        ],
    )
    first, second = load(path, tok)
    assert first.uid == "a" and len(second.uid) == 18  # given id, else content hash + occurrence
    assert [m["role"] for m in first.prompt_messages] == ["system", "user"] and first.real == "3"
    # The generation prompt is exactly the prompt; the response carries the template's end of turn.
    assert first.prompt == "<|bos|><|system|>be brief<|end|><|user|>1+2=<|end|><|assistant|>"
    assert tok.decode(first.real_ids) == "3<|end|>" and first.real_ids[-1] == tok.eos_token_id
    assert load(path, tok)[1].uid == second.uid  # stable across runs


def test_repeated_prompts_and_equal_records_are_kept(tmp_path, tok, capsys):
    """SPIN's target is p_data(y|x): several (sometimes equal) answers per prompt are data, not errors."""
    rows = [conv("1+1=", "2"), conv("1+1=", "2"), conv("1+1=", "3"), conv("2+2=", "4"), conv("1+1=", "2")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples = load(path, tok)
    assert len(examples) == 5 and [e.real for e in examples] == ["2", "2", "3", "4", "2"]
    uids = [e.uid for e in examples]
    assert len(set(uids)) == 5
    assert uids[0].endswith("-0") and uids[1] == uids[0][:-1] + "1" and uids[4] == uids[0][:-1] + "2"
    assert uids == [e.uid for e in load(path, tok)]  # stable across loads: resume and seeds line up
    assert len({sample_seed(0, 0, u) for u in uids}) == 5  # each record its own sample y'
    summary = "5 records, 2 distinct prompts, 4 records with repeated prompt, 2 duplicate records"
    assert summary in capsys.readouterr().out
    deduped = load(path, tok, dedupe="records")
    assert [e.real for e in deduped] == ["2", "3", "4"] and [e.uid for e in deduped] == [uids[0], uids[2], uids[3]]


def test_duplicate_given_ids_name_both_records(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [conv("1+1=", "2", id=7), conv("2+2=", "4"), conv("3+3=", "6", id="7")])
    with pytest.raises(DataError, match=r"d.jsonl:3: field `id` '7' duplicates .*d.jsonl:1"):
        load(path, tok)


def test_training_set_streams_to_parquet_and_keeps_validating_past_max_examples(tmp_path, tok):
    rows = [conv(f"{i}+1=", str(i + 1)) for i in range(ROW_GROUP + 10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(max_prompt_tokens=64, max_response_tokens=16)
    dest = tmp_path / "train.parquet"
    full = write_training_set(read_sft(path, tok, **kw), dest, max_examples=None)
    examples = load_sft(path, tok, **kw)
    table = pq.read_table(dest)
    assert full.records == table.num_rows == ROW_GROUP + 10 and pq.ParquetFile(dest).metadata.num_row_groups == 2
    assert table["uid"].to_pylist() == [e.uid for e in examples]
    assert table["prompt_ids"].to_pylist() == [e.prompt_ids for e in examples]
    # The fingerprint of earlier versions (resume compares it with the one a run dir stores).
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.uid, e.prompt_ids, e.real_ids]).encode())
    assert full.fingerprint == h.hexdigest()[:16]
    assert full.prompt_tokens == sum(len(e.prompt_ids) for e in examples)
    assert sum(full.real_lengths.values()) == full.records
    first = write_training_set(read_sft(path, tok, **kw), None, max_examples=3)  # a dry run: nothing written
    assert first.path is None and first.records == 3 and first.fingerprint != full.fingerprint
    write_jsonl(path, [*rows, {"messages": "oops"}])
    with pytest.raises(DataError, match=rf"d.jsonl:{len(rows) + 1}: field `messages`"):
        write_training_set(read_sft(path, tok, **kw), None, max_examples=3)


@pytest.mark.parametrize("max_buckets", [256, 2])  # 2: the buckets grow instead of their number
def test_write_permuted_is_a_take_in_parts(tmp_path, monkeypatch, max_buckets):
    """The external shuffle that orders an iteration's prompts equals `take(order)`, cut into parts."""
    monkeypatch.setattr("spin_ray.data.MAX_BUCKETS", max_buckets)
    n = 3 * ROW_GROUP + 17  # several input batches and several buckets
    table = pa.table({"uid": [f"u{i}" for i in range(n)], "ids": [[i, i + 1] for i in range(n)]})
    pq.write_table(table, tmp_path / "src.parquet", row_group_size=1000)
    order = np.random.default_rng(5).permutation(n)

    def add(t: pa.Table) -> pa.Table:
        return t.append_column("twice", pa.array([2 * i[0] for i in t["ids"].to_pylist()]))

    parts = write_permuted(tmp_path / "src.parquet", order, tmp_path / "parts", 256, add)
    got = [pq.read_table(p) for p in parts]
    assert [t.num_rows for t in got] == [256] * (n // 256) + [n % 256]
    assert pa.concat_tables(got).equals(add(table).take(order))
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [p.name for p in parts]  # no bucket left


def test_every_bad_record_reported_with_line_and_field(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            conv("1+1=", "2", id="ok"),
            "{not json",
            {"text": "no messages"},
            {"messages": []},
            {"messages": [{"role": "user", "content": "1+1="}]},
            {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "2"}]},
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "2"}]},
            {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": 2}]},
            conv("3+3=", "6", id="ok"),
            conv("x" * 100, "6"),
        ],
    )
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        load(path, tok)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "9 problem(s)" in msg
    for line, field in [
        (2, "invalid JSON"),
        (3, "`messages` is missing"),
        (4, "non-empty list"),
        (5, "messages[0].role must be 'assistant'"),
        (6, "messages[0].role is 'robot'"),
        (7, "messages[0].content"),
        (8, "messages[1].content"),
        (9, "duplicates"),
        (10, "data.max_prompt_tokens=64"),
    ]:
        assert f"bad.jsonl:{line}: " in msg and field in msg.split(f"bad.jsonl:{line}: ")[1].split("\n")[0]


def test_long_prompts_skip_policy(tmp_path, tok, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [conv("1+1=", "2"), conv("x" * 100, "6")])
    assert len(load(path, tok, long_prompts="skip")) == 1
    assert "skipped 1 of 2" in capsys.readouterr().out


def test_empty_and_missing_files(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        load(tmp_path / "empty.jsonl", tok)
    with pytest.raises(DataError, match="nope.jsonl: file does not exist"):
        load(tmp_path / "nope.jsonl", tok)


def test_parquet_and_datasets_dir(tmp_path, tok):
    rows = [conv(f"{i}+1=", str(i + 1), id=f"r{i}") for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    from_parquet = load(tmp_path / "d.parquet", tok)
    from_disk = load(tmp_path / "ds", tok)
    assert [e.uid for e in from_parquet] == [e.uid for e in from_disk] == [f"r{i}" for i in range(5)]
    bad = [conv("1+1=", "2"), {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:row 1: messages\[1\].role must be 'assistant'"):
        load(tmp_path / "bad.parquet", tok)


def test_encode_falls_back_when_template_is_not_prefix(tok):
    messages = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    prompt, response = encode(tok, messages, stop_token_ids(tok))
    assert tok.decode(prompt).endswith("<|assistant|>") and tok.decode(response) == "2<|end|>"


def test_job_rejects_bad_data_before_ray(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [conv("1+1=", "2"), {"messages": "oops"}])
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "spin.py"), f"data.train_path={path}", f"run.output_dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{path}:2: field `messages` must be a non-empty list" in proc.stderr
    assert "ray.init" not in proc.stdout + proc.stderr and not (tmp_path / "run").exists()
    assert time.perf_counter() - t0 < 120


def test_job_rejects_bad_config_before_ray(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "spin.py"), "train.zero_stage=5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "train.zero_stage" in proc.stderr


def test_resume_trusts_only_complete_artifacts_and_removes_nothing_finished(tmp_path, toy, monkeypatch):
    """A crash leaves half-written files: a resumed run keeps what is whole and redoes the rest,
    but never removes a finished iteration on its own, nor anything when the disk fails to read."""
    import errno
    import shutil

    import safetensors

    from spin_ray.config import load_config
    from spin_ray.loop.resume import ResumeError, resume_point

    out = tmp_path / "run"
    cfg = load_config(None, [f"run.output_dir={out}", "spin.iterations=3"])
    pairs = pa.Table.from_pylist([{"uid": f"u{i}"} for i in range(10)])
    uids = pairs["uid"].combine_chunks()  # sorted, as resume.sorted_uids gives them
    for t in (1, 2, 3):
        (out / f"iter_{t}" / "pairs").mkdir(parents=True)
        pq.write_table(pairs, out / f"iter_{t}" / "pairs" / "pairs.parquet")
        shutil.copytree(toy.model_dir, out / f"iter_{t}" / "model")
        (out / f"iter_{t}" / "DONE").write_text(json.dumps({"global_step": 10 * t}))
    assert resume_point(cfg, "p0", uids).start == 4  # all whole: nothing to redo

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(safetensors, "safe_open", unreadable)
        with pytest.raises(ResumeError, match="could not read iteration 1 .*nothing was removed"):
            resume_point(cfg, "p0", uids)

    weights = out / "iter_2" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated checkpoint
    with pytest.raises(ResumeError, match=r"iteration 2 is marked done, but .* incomplete.*iterations \[3\]"):
        resume_point(cfg, "p0", uids)
    assert (out / "iter_3" / "DONE").exists() and weights.exists()  # nothing removed

    (out / "iter_3" / "DONE").unlink()  # iteration 3 never finished: iteration 2 is redone
    pq.write_table(pairs.slice(0, 7), out / "iter_2" / "pairs" / "pairs.parquet")  # 7 of 10 pairs
    point = resume_point(cfg, "p0", uids)
    assert (point.start, point.model_path, point.global_step) == (2, str(out / "iter_1" / "model"), 10)
    assert (out / "iter_1" / "DONE").exists()  # iteration 1 is untouched
    assert not (out / "iter_2" / "DONE").exists() and not (out / "iter_2" / "model").exists()
    assert not (out / "iter_2" / "pairs").exists()  # incomplete pairs are generated again
    assert not (out / "iter_3").exists()  # built on an iteration that never finished

    (out / "iter_1" / "DONE").write_text('{"global_st')  # torn, the last finished iteration: redone
    said = []
    assert resume_point(cfg, "p0", uids, said.append).start == 1
    assert "iteration 1 is marked done, but" in said[0] and (out / "iter_1" / "pairs").exists()


def test_a_second_job_on_a_run_dir_is_refused_naming_the_first(tmp_path):
    import socket

    from spin_ray.rundir import RunDirBusy, lock

    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": first.pid, "since": 0}))
        with pytest.raises(RunDirBusy, match=rf"pid {first.pid} on host {socket.gethostname()}"):
            lock(tmp_path)
    finally:
        first.kill()
        first.wait()
    lock(tmp_path)  # its holder is gone: taken over
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock(tmp_path)  # a second run in the same process (tests, notebooks) keeps it
    (tmp_path / "run.lock").write_text(json.dumps({"host": "gpu-node-7", "pid": 12, "since": 0}))
    with pytest.raises(RunDirBusy, match="pid 12 on host gpu-node-7"):  # beating on another host
        lock(tmp_path)
    os.utime(tmp_path / "run.lock", (0, 0))  # silent for a long time: stale
    lock(tmp_path)


def hub_cache(cache: Path, repo_id: str, splits: dict[str, list[dict]]) -> None:
    """`repo_id` as `datasets` keeps a Hub dataset it downloaded: what load_dataset reads offline."""
    from datasets.packaged_modules.json.json import Json

    cache.parent.mkdir(parents=True, exist_ok=True)
    files = {split: str(write_jsonl(cache.parent / f"{split}.jsonl", rows)) for split, rows in splits.items()}
    built = cache.parent / "built"
    Json(cache_dir=str(built), data_files=files, dataset_name=repo_id.split("/")[1]).download_and_prepare()
    dest = cache / repo_id.replace("/", "___") / "default" / "0.0.0"
    dest.mkdir(parents=True)
    next(built.glob("*/*/0.0.0")).rename(dest / "0123abcd")  # config / version / the Hub commit


def test_a_hub_dataset_id_with_its_split_from_the_local_cache(tmp_path, tok, monkeypatch):
    cache = tmp_path / "hf" / "datasets"
    hub_cache(
        cache, "HuggingFaceH4/ultrachat_200k", {"train_sft": [conv("1+2=", "3")] * 2, "test_sft": [conv("5+5=", "10")]}
    )
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    train = load("HuggingFaceH4/ultrachat_200k", tok, split="train_sft")
    held_out = load("HuggingFaceH4/ultrachat_200k", tok, split="test_sft")
    assert [e.real for e in train] == ["3", "3"] and [e.real for e in held_out] == ["10"]
    with pytest.raises(DataError, match=r"ultrachat_200k: cannot load it as a Hub dataset .*Unknown split"):
        load("HuggingFaceH4/ultrachat_200k", tok, split="train")
    with pytest.raises(DataError, match="does not exist"):
        load("data/missing.jsonl", tok)  # a path, not taken for a Hub id


def test_the_official_spin_datas_real_conversation_is_the_sft_record(tmp_path, tok):
    """UCLA-AGI/SPIN_iter0's schema: `real` and `generated` conversations; y comes from `real`."""
    real, generated = conv("1+2=", "3")["messages"], conv("1+2=", "4")["messages"]
    path = write_jsonl(tmp_path / "spin.jsonl", [{"real": real, "generated": generated}, {"generated": generated}])
    with pytest.raises(DataError, match=r"spin.jsonl:2: field `messages` is missing \(or `real`"):
        load(path, tok)
    write_jsonl(path, [{"real": real, "generated": generated}])
    assert [(e.prompt_messages, e.real) for e in load(path, tok)] == [(real[:1], "3")]


def test_token_limits_come_from_the_data_unless_set(toy, tmp_path):
    from spin_ray.config import load_config
    from spin_ray.driver.prepare import prepare

    tok = make_tokenizer()
    examples = [*load(toy.train_path, tok), *load(toy.eval_path, tok)]
    longest_prompt = max(len(e.prompt_ids) for e in examples)
    longest_answer = max(len(e.real_ids) for e in examples)
    cfg = load_config(None, ["model.path=toy", f"run.output_dir={tmp_path}/a"])
    prepared = prepare(cfg, dry_run=True)
    assert (cfg.data.max_prompt_tokens, cfg.data.max_response_tokens) == (longest_prompt, longest_answer)
    assert cfg.generation.max_tokens == longest_answer and prepared.max_model_len == longest_prompt + longest_answer + 1
    assert [line.split(":")[0] for line in prepared.limits] == [
        f"data.max_prompt_tokens={longest_prompt}",
        f"data.max_response_tokens={longest_answer}",
        f"generation.max_tokens={longest_answer}",
    ]
    cfg = load_config(None, ["model.path=toy", "generation.max_tokens=3", f"run.output_dir={tmp_path}/b"])
    assert (
        prepare(cfg, dry_run=True).limits[-1].startswith("data.max_response_tokens") and cfg.generation.max_tokens == 3
    )
    # The context bounds what the data may take: answers are cut, and y' gets what the longest prompt leaves.
    cfg = load_config(
        None, ["model.path=toy", f"generation.max_model_len={longest_prompt + 3}", f"run.output_dir={tmp_path}/c"]
    )
    prepare(cfg, dry_run=True)
    assert cfg.generation.max_tokens == cfg.data.max_response_tokens == 2 < longest_answer
    with pytest.raises(DataError, match=rf"is {longest_prompt} tokens, over the context \({longest_prompt + 1}\)"):
        prepare(load_config(None, ["model.path=toy", f"generation.max_model_len={longest_prompt + 1}"]), dry_run=True)
