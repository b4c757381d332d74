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


def test_reverse_task_words_answers_and_the_settings_it_needs(toy):
    """toy.task=reverse: 3000 distinct words of 6-10 letters in a seeded order, each answered by
    itself reversed; the sums' data is what it was (the cached world's held-out split)."""
    import pytest

    from spin_ray.config import ConfigError, load_config
    from spin_ray.toy import _make_splits

    train, held_out, dev = _make_splits(0, "reverse")
    assert (len(train), len(held_out), len(dev)) == (2000, 500, 500) and _make_splits(0, "reverse")[0] == train
    words = [r["messages"][0]["content"].removeprefix("reverse: ") for r in train + held_out + dev]
    assert len(set(words)) == 3000 and all(6 <= len(w) <= 10 and w.isalpha() for w in words)
    assert all(r["messages"][1]["content"] == w[::-1] for r, w in zip(train, words, strict=False))
    user = [{"role": "user", "content": "reverse: abcdef"}]
    assert is_correct(user, " fedcba<|end|>") and not is_correct(user, "fedcb")
    assert _make_splits(0)[1] == read_jsonl(toy.eval_path)
    with pytest.raises(ConfigError, match="generation.max_tokens=12"):
        load_config(None, ["toy.task=reverse", "generation.max_tokens=8"])
    assert load_config(None, ["toy.task=reverse", "generation.max_tokens=12"]).toy.task == "reverse"
