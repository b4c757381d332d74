"""The embedded toy world: a tiny offline SPIN playground, deterministic by seed.

Task: 2-digit addition. The user says "12+34=", the assistant answers "46".
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

# bump when anything below changes what gets built, so stale caches get rebuilt
TOY_VERSION = 2

# ---------------------------------------------------------------------------
# knobs of the world (chosen so that a build takes well under a minute on 1 core)

N_TRAIN = 2000  # SFT examples; SPIN samples its prompts from these
N_EVAL = 500  # held-out examples
N_DEV = 500  # a third disjoint split, only used to decide when p_0's SFT stops (never saved)
OPERAND_MIN, OPERAND_MAX = 10, 99  # both operands are 2-digit -> all prompts have the same length
MAX_POSITIONS = 512  # room for the 128+ token prompts that expose a stale vLLM prefix cache

# p_0's SFT stops as soon as its greedy dev accuracy reaches SFT_TARGET_ACC. Addition is
# learned in a sudden jump (the carry rule clicks), whose timing varies a lot with the seed
# (~200-700 steps), so a fixed step count gives p_0 anywhere from ~0.05 to ~0.9 accuracy.
# Stopping on a dev split lands every seed in the same middle of that jump.
SFT_TARGET_ACC = 0.5
SFT_MAX_STEPS = 1500
SFT_CHECK_EVERY = 10
SFT_BATCH = 64
SFT_LR = 3e-3
SFT_WARMUP = 20

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|end|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]

# Every turn is "<|role|>content<|end|>" and <|end|> is the EOS token, so the assistant
# turn ends with EOS and generation stops there. The generation prompt is the conversation
# so far plus "<|assistant|>", hence an exact prefix of the full conversation's rendering.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('toy chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class ToyWorld:
    root: Path  # cache dir
    model_dir: Path  # HF checkpoint of p_0
    train_path: Path  # JSONL SFT data
    eval_path: Path  # JSONL held-out data


# ---------------------------------------------------------------------------
# task: data and correctness

_PROMPT_RE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=?\s*$")


def _prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def _make_splits(seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint train/eval/dev examples: a seeded shuffle of all (a, b) operand pairs."""
    pairs = [(a, b) for a in range(OPERAND_MIN, OPERAND_MAX + 1) for b in range(OPERAND_MIN, OPERAND_MAX + 1)]
    random.Random(seed).shuffle(pairs)
    assert len(pairs) >= N_TRAIN + N_EVAL + N_DEV

    def rows(split: str, chosen: list[tuple[int, int]]) -> list[dict]:
        return [
            {
                "id": f"{split}-{i:06d}",
                "messages": [
                    {"role": "user", "content": _prompt(a, b)},
                    {"role": "assistant", "content": str(a + b)},
                ],
            }
            for i, (a, b) in enumerate(chosen)
        ]

    n_te = N_TRAIN + N_EVAL
    return rows("train", pairs[:N_TRAIN]), rows("eval", pairs[N_TRAIN:n_te]), rows("dev", pairs[n_te : n_te + N_DEV])


def is_correct(prompt_messages: list[dict], response: str) -> bool:
    """True iff `response` is the exact sum asked for by the last user message.

    Leading/trailing whitespace and a literal EOS string (in case a caller decoded
    without skip_special_tokens) are tolerated; anything else makes it wrong.
    """
    user = [m["content"] for m in prompt_messages if m["role"] == "user"]
    if not user:
        return False
    m = _PROMPT_RE.match(user[-1])
    if m is None:
        return False
    answer = response.replace(EOS, "").strip()
    return answer == str(int(m.group(1)) + int(m.group(2)))


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


# ---------------------------------------------------------------------------
# tokenizer: character level, so digits are single tokens


def make_tokenizer() -> PreTrainedTokenizerFast:
    # Printable ASCII plus common whitespace, not just the corpus' 12 characters, so that
    # system prompts or other text round-trip instead of turning into <|unk|>.
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # every character is its own pre-token; [\s\S] also matches newlines, unlike "."
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate without the WordLevel default of spaces
    # registered as added tokens so that "<|user|>" in text is matched whole, not char by char
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # batched generation needs left padding
        model_max_length=MAX_POSITIONS,
    )


def encode_example(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> tuple[list[int], int]:
    """Token ids of a full conversation, and where its final assistant response starts."""
    prompt_ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt_ids)
    p = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(p)] == p, "generation prompt must tokenize to a prefix of the conversation"
    return ids, len(p)


# ---------------------------------------------------------------------------
# model


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention supports 32/64/..., not 16
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=8,
    )
    return model


def _sft_batches(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels with prompt and padding masked to -100."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, labels


def sft(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seed: int,
    stop: Callable[[], bool] | None = None,
    check_every: int = 10,
) -> int:
    """Plain AdamW SFT on response tokens (linear warmup, then constant lr).

    Calls `stop()` every `check_every` steps and returns early once it says True;
    returns the number of steps taken.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    attn = (input_ids != model.config.pad_token_id).long()
    perm, pos = torch.randperm(len(input_ids), generator=g), 0
    step = 0
    while step < max_steps:
        if stop is not None and step > 0 and step % check_every == 0 and stop():
            break
        model.train()  # stop() may have switched to eval mode
        if pos + batch_size > len(perm):  # reshuffle each epoch, drop the ragged tail
            perm, pos = torch.randperm(len(input_ids), generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = model(input_ids=input_ids[idx], attention_mask=attn[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    model.eval()
    return step


@torch.no_grad()
def greedy_responses(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 512,
) -> list[str]:
    """Greedy decoding with HF generate (left padded batches)."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            for p in prompts[i : i + batch_size]
        ]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


# ---------------------------------------------------------------------------
# the build


def _world(root: Path) -> ToyWorld:
    return ToyWorld(
        root=root,
        model_dir=root / "model",
        train_path=root / "data" / "train.jsonl",
        eval_path=root / "data" / "eval.jsonl",
    )


def toy_world(seed: int = 0) -> ToyWorld:
    """The toy world of `seed` in the cache (`SPIN_RAY_CACHE`, default ~/.cache/spin-ray), built
    on first use."""
    cache = Path(os.environ.get("SPIN_RAY_CACHE", Path.home() / ".cache" / "spin-ray"))
    return build_toy_world(cache / f"toy-seed{seed}", seed=seed)


def build_toy_world(root: str | Path, seed: int = 0, *, force: bool = False) -> ToyWorld:
    """Build (or reuse) the toy world under `root`. Same seed -> byte-identical files."""
    root = Path(root)
    world = _world(root)
    marker = root / "BUILD_OK.json"
    want = {"version": TOY_VERSION, "seed": seed}
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
        train, held_out, dev = _make_splits(seed)
        _write_jsonl(world.train_path, train)
        _write_jsonl(world.eval_path, held_out)

        tokenizer = make_tokenizer()
        torch.manual_seed(seed)  # model init
        model = make_model(tokenizer)
        input_ids, labels = _sft_batches(
            [encode_example(tokenizer, r["messages"]) for r in train], tokenizer.pad_token_id
        )

        def accuracy(rows: list[dict]) -> float:
            prompts = [r["messages"][:-1] for r in rows]
            return toy_accuracy(prompts, greedy_responses(model, tokenizer, prompts))

        steps = sft(
            model,
            input_ids,
            labels,
            max_steps=SFT_MAX_STEPS,
            batch_size=SFT_BATCH,
            lr=SFT_LR,
            warmup=SFT_WARMUP,
            seed=seed,
            stop=lambda: accuracy(dev) >= SFT_TARGET_ACC,
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
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    print(build_toy_world(args.root, args.seed, force=args.force))
