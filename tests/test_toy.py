"""The toy world: deterministic by seed, a weak-but-not-random p_0, a correctness check."""

import hashlib
import json
import time

from spin_ray.toy import build_toy_world, is_correct, read_jsonl


def digests(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_files_in_minutes(toy, tmp_path, capsys):
    start = time.perf_counter()
    fresh = build_toy_world(tmp_path / "toy", seed=0)
    assert time.perf_counter() - start < 120
    assert "p_0 held-out greedy accuracy" in capsys.readouterr().out
    assert digests(fresh.root) == digests(toy.root)  # the session's toy was built the same way
    assert build_toy_world(tmp_path / "toy", seed=0) == fresh  # cached: no rebuild


def test_data_and_p0(toy):
    train, held_out = read_jsonl(toy.train_path), read_jsonl(toy.eval_path)
    assert len(train) == 2000 and len(held_out) == 500
    prompts = {r["messages"][0]["content"] for r in train}
    assert not prompts & {r["messages"][0]["content"] for r in held_out}  # disjoint splits
    assert all(is_correct(r["messages"][:-1], r["messages"][-1]["content"]) for r in train + held_out)
    assert not is_correct([{"role": "user", "content": "12+34="}], "47")
    p0 = json.loads((toy.root / "BUILD_OK.json").read_text())["p0_eval_greedy_accuracy"]
    assert 0.3 <= p0 <= 0.8  # weak, but far from random (~0.01)


def test_working_task_answers_and_the_settings_it_needs(toy):
    """toy.task=working: the sums' operand pairs in the same seeded order, each answered with its
    working (units, tens with the carry, the sum); the sums' data is what it was."""
    import pytest

    from spin_ray.config import ConfigError, load_config
    from spin_ray.toy import _make_splits, working

    train, held_out, dev = _make_splits(0, "working")
    assert (len(train), len(held_out), len(dev)) == (2000, 500, 500)
    sums = _make_splits(0)[0]
    assert [r["messages"][0]["content"] for r in train[:2]] == [
        "work out " + s["messages"][0]["content"].removesuffix("=") for s in sums[:2]
    ]
    assert (working(34, 58), working(12, 34), working(99, 99)) == (
        "4+8=12 3+5+1=9 92",
        "2+4=6 1+3+0=4 46",
        "9+9=18 9+9+1=19 198",
    )
    assert all(is_correct(r["messages"][:-1], r["messages"][-1]["content"]) for r in train + held_out + dev)
    user = [{"role": "user", "content": "work out 34+58"}]
    assert is_correct(user, " 4+8=12 3+5+1=9 92<|end|>") and not is_correct(user, "4+8=12 3+5=8 92")
    assert not is_correct(user, "92")  # the whole working is the answer
    assert _make_splits(0)[1] == read_jsonl(toy.eval_path)
    with pytest.raises(ConfigError, match="generation.max_tokens=24"):
        load_config(None, ["toy.task=working", "generation.max_tokens=12"])
    assert load_config(None, ["toy.task=working", "generation.max_tokens=24"]).toy.task == "working"
