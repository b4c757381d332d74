"""The embedded toy world: a tiny offline SPIN playground, deterministic by seed.

Task: 2-digit addition. The user says "12+34=", the assistant answers "46". With
`toy.task=working`, the sum with its working written out: "work out 34+58" -> "4+8=12 3+5+1=9 92".
Everything is made locally, no hub access:

  root/
    model/            p_0: a tiny LlamaForCausalLM, briefly SFT'd (save_pretrained)
    data/train.jsonl  SFT data (p_0 was fine-tuned on exactly these examples)
    data/eval.jsonl   held-out split, disjoint prompts
    BUILD_OK.json     completion marker, written last

p_0 is deliberately under-trained (greedy held-out accuracy roughly 0.5-0.7),
so that SPIN has something to improve and correctness can be checked exactly.

A SPIN setting that works here (found with a plain-torch emulation of the job, 6 seeds):
first 500 train prompts, 1 sample each at temperature 1 / top_p 1, max 8 new tokens;
AdamW lr 1e-5 (300x below p_0's SFT lr), betas (0.9, 0.999), no weight decay, 10% linear
warmup then constant, 1 epoch, batch 32 pairs, beta 0.1, fresh optimizer each iteration,
pairs of iterations t and t-1. Held-out greedy accuracy rose in every seed and iteration,
on average 0.568 -> 0.621 -> 0.659 -> 0.685 (+0.09 to +0.17 per seed after 3 iterations);
continued SFT on the same prompts with the same steps and lr gains about as much (0.707).
At 3x that lr SPIN oscillates between iterations and can end below p_0; at 10x it collapses.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from spin_ray.toy_model import EOS, encode_example, greedy_responses, make_model, make_tokenizer, sft, sft_batches

# bump when anything below changes what gets built, so stale caches get rebuilt
TOY_VERSION = 2

# ---------------------------------------------------------------------------
# knobs of the world (chosen so that a build takes well under a minute on 1 core)

N_TRAIN = 2000  # SFT examples; SPIN samples its prompts from these
N_EVAL = 500  # held-out examples
N_DEV = 500  # a third disjoint split, only used to decide when p_0's SFT stops (never saved)
OPERAND_MIN, OPERAND_MAX = 10, 99  # both operands are 2-digit -> all prompts have the same length

# p_0's SFT stops as soon as its greedy dev accuracy reaches SFT_TARGET_ACC. Addition is
# learned in a sudden jump (the carry rule clicks), whose timing varies a lot with the seed
# (~200-700 steps), so a fixed step count gives p_0 anywhere from ~0.05 to ~0.9 accuracy.
# Stopping on a dev split lands every seed in the same middle of that jump. The working's p_0 stops
# at its start, where a sample rarely reproduces the whole answer.
SFT_TARGET_ACC = {"addition": 0.5, "working": 0.1}
SFT_MAX_STEPS = 1500
SFT_CHECK_EVERY = 10
SFT_BATCH = 64
SFT_LR = 3e-3
SFT_WARMUP = 20


@dataclass(frozen=True)
class ToyWorld:
    root: Path  # cache dir
    model_dir: Path  # HF checkpoint of p_0
    train_path: Path  # JSONL SFT data
    eval_path: Path  # JSONL held-out data


# ---------------------------------------------------------------------------
# task: data and correctness

_PROMPT_RE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=?\s*$")
# The second task, `toy.task=working`: the same sums, answered with the working written out (16-19
# characters where the sum has 2-3), and a p_0 stopped early (SFT_TARGET_ACC), so that a sample of
# p_0 rarely equals y exactly: the sums' short answers often do, and such a pair gives SPIN no
# gradient. (Reversing 4-10 letter words was tried first: this 2-layer model stays under 5% after
# 4,000 SFT steps.)
_WORKING_RE = re.compile(r"^\s*work out\s*(\d+)\s*\+\s*(\d+)\s*$")
MAX_ANSWER_TOKENS = {"addition": 8, "working": 24}  # the answer and EOS, with room


def working(a: int, b: int) -> str:
    """Units first, then tens with the carry (always written, +0 or +1), then the sum."""
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    return f"{a % 10}+{b % 10}={units} {a // 10}+{b // 10}+{units // 10}={tens} {a + b}"


def _prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def _make_splits(seed: int, task: str = "addition") -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint train/eval/dev examples: a seeded shuffle of all (a, b) operand pairs."""
    pairs = [(a, b) for a in range(OPERAND_MIN, OPERAND_MAX + 1) for b in range(OPERAND_MIN, OPERAND_MAX + 1)]
    random.Random(seed).shuffle(pairs)
    if task == "working":
        examples = [(f"work out {a}+{b}", working(a, b)) for a, b in pairs]
    else:
        examples = [(_prompt(a, b), str(a + b)) for a, b in pairs]
    assert len(examples) >= N_TRAIN + N_EVAL + N_DEV

    def rows(split: str, chosen: list[tuple[str, str]]) -> list[dict]:
        return [
            {
                "id": f"{split}-{i:06d}",
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            }
            for i, (prompt, answer) in enumerate(chosen)
        ]

    n_te = N_TRAIN + N_EVAL
    return (
        rows("train", examples[:N_TRAIN]),
        rows("eval", examples[N_TRAIN:n_te]),
        rows("dev", examples[n_te : n_te + N_DEV]),
    )


def is_correct(prompt_messages: list[dict], response: str) -> bool:
    """True iff `response` is the exact sum (or working) asked for by the last user message.

    Leading/trailing whitespace and a literal EOS string (in case a caller decoded
    without skip_special_tokens) are tolerated; anything else makes it wrong.
    """
    user = [m["content"] for m in prompt_messages if m["role"] == "user"]
    if not user:
        return False
    answer = response.replace(EOS, "").strip()
    if m := _WORKING_RE.match(user[-1]):
        return answer == working(int(m.group(1)), int(m.group(2)))
    m = _PROMPT_RE.match(user[-1])
    return m is not None and answer == str(int(m.group(1)) + int(m.group(2)))


def toy_accuracy(prompts: list[list[dict]], responses: list[str]) -> float:
    assert len(prompts) == len(responses), (len(prompts), len(responses))
    if not prompts:
        return 0.0
    return sum(is_correct(p, r) for p, r in zip(prompts, responses, strict=True)) / len(prompts)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _world(root: Path) -> ToyWorld:
    return ToyWorld(
        root=root,
        model_dir=root / "model",
        train_path=root / "data" / "train.jsonl",
        eval_path=root / "data" / "eval.jsonl",
    )


def toy_world(seed: int = 0, task: str = "addition") -> ToyWorld:
    """The toy world of `seed` (and `task`) in the cache (`SPIN_RAY_CACHE`, default
    ~/.cache/spin-ray), built on first use."""
    name = f"toy-seed{seed}" if task == "addition" else f"toy-{task}-seed{seed}"
    return build_toy_world(cache_dir() / name, seed=seed, task=task)


def cache_dir() -> Path:
    """Where built-in worlds are built: `SPIN_RAY_CACHE`, default ~/.cache/spin-ray."""
    return Path(os.environ.get("SPIN_RAY_CACHE", Path.home() / ".cache" / "spin-ray"))


def build_toy_world(root: str | Path, seed: int = 0, *, task: str = "addition", force: bool = False) -> ToyWorld:
    """Build (or reuse) the toy world under `root`. Same seed -> byte-identical files.

    One function, top to bottom, on purpose: the build order (splits, tokenizer, model, SFT, files,
    the marker last) is what makes a cache entry trustworthy."""
    root = Path(root)
    world = _world(root)
    marker = root / "BUILD_OK.json"
    want = {"version": TOY_VERSION, "seed": seed} | ({"task": task} if task != "addition" else {})  # sums: as before
    if marker.exists() and not force:
        got = json.loads(marker.read_text())
        if {k: got.get(k) for k in want} == want:
            return world
    # the marker goes last, so a half-finished build is never mistaken for a cached one
    marker.unlink(missing_ok=True)
    for stale in (world.model_dir, root / "data"):
        shutil.rmtree(stale, ignore_errors=True)
    world.train_path.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    # One thread: float reductions then happen in a fixed order, which is what makes the
    # saved weights byte-identical across builds (and keeps us off the shared core).
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the build prints one line, not a "Writing shards" bar
    try:
        train, held_out, dev = _make_splits(seed, task)
        _write_jsonl(world.train_path, train)
        _write_jsonl(world.eval_path, held_out)

        tokenizer = make_tokenizer()
        torch.manual_seed(seed)  # model init
        model = make_model(tokenizer)
        input_ids, labels = sft_batches(
            [encode_example(tokenizer, r["messages"]) for r in train], tokenizer.pad_token_id
        )

        def accuracy(rows: list[dict]) -> float:
            prompts = [r["messages"][:-1] for r in rows]
            return toy_accuracy(
                prompts, greedy_responses(model, tokenizer, prompts, max_new_tokens=MAX_ANSWER_TOKENS[task])
            )

        steps = sft(
            model,
            input_ids,
            labels,
            max_steps=SFT_MAX_STEPS,
            batch_size=SFT_BATCH,
            lr=SFT_LR,
            warmup=SFT_WARMUP,
            seed=seed,
            stop=lambda: accuracy(dev) >= SFT_TARGET_ACC[task],
            check_every=SFT_CHECK_EVERY,
        )
        acc = accuracy(held_out)

        model.save_pretrained(world.model_dir, safe_serialization=True)
        tokenizer.save_pretrained(world.model_dir)
    finally:
        torch.set_num_threads(prev_threads)
        if bars:
            hf_logging.enable_progress_bar()

    marker.write_text(
        json.dumps({**want, "p0_sft_steps": steps, "p0_eval_greedy_accuracy": acc}, sort_keys=True) + "\n"
    )
    print(
        f"toy world built at {root} (seed {seed}, {steps} SFT steps) in {time.perf_counter() - t0:.1f}s: "
        f"p_0 held-out greedy accuracy {acc:.3f}"
    )
    return world


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build the SPIN toy world")
    ap.add_argument("root")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", choices=sorted(MAX_ANSWER_TOKENS), default="addition")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    print(build_toy_world(args.root, args.seed, task=args.task, force=args.force))
