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
