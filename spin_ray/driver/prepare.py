"""Every cheap check before anything expensive starts, in the driver: config, model, data.

`prepare()` loads the model's config and tokenizer (no weights), reads and validates every
training record (all problems at once, with file, line and field) and streams the tokenized
training set to `run.output_dir/data/train.parquet`; a dry run only counts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

from spin_ray.chat import model_stop_ids
from spin_ray.config import Config
from spin_ray.data import Example, TrainingSet, load_sft, read_sft, write_training_set
from spin_ray.driver.estimate import model_shape
from spin_ray.loop.resume import check_unchanged, files_fingerprint
from spin_ray.lora import check_targets
from spin_ray.metrics import check_tasks, load_hooks
from spin_ray.rundir import RunDir, lock
from spin_ray.serve.gateway import check_exposure, key_digest
from spin_ray.stages import Prepared
from spin_ray.toy import ToyWorld, toy_world

# vLLM's CPU attention kernels reject other head sizes, and only after ~40 s of start-up.
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 256)


def prepare(cfg: Config, dry_run: bool = False) -> Prepared:
    """A dry run checks and counts the training data without writing it anywhere."""
    from transformers import AutoConfig, AutoTokenizer

    load_hooks(cfg.eval.hooks)  # a typo in a hook's name fails now, not after the first iteration
    if lm := cfg.eval.lm_eval:
        check_tasks(lm.tasks, lm.include_path)
    toy = cfg.model.path == "toy"
    model_path, train_path, eval_path = cfg.model.path, cfg.data.train_path, cfg.data.eval_path
    if world := builtin_world(cfg):
        model_path = str(world.model_dir)
        train_path = train_path or str(world.train_path)
        eval_path = eval_path or str(world.eval_path)
    try:
        model_config = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path={model_path!r}: cannot load a Hugging Face model config/tokenizer ({e})") from e
    if tokenizer.chat_template is None:
        raise ValueError(f"model.path={model_path!r}: tokenizer has no chat_template; SPIN data is chat `messages`")
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    if cfg.generation.num_gpus == 0 and head_dim not in CPU_HEAD_DIMS:
        raise ValueError(
            f"model.path={model_path!r}: head_dim {head_dim} is not supported by vLLM on CPU {CPU_HEAD_DIMS}"
        )
    if cfg.train.lora:
        check_targets(cfg.train.lora, model_config, model_path)
    d = cfg.data
    context = cfg.generation.max_model_len or getattr(model_config, "max_position_embeddings", None)
    load = dict(
        max_prompt_tokens=d.max_prompt_tokens,
        max_response_tokens=d.max_response_tokens,
        long_prompts=d.long_prompts,
        stops=model_stop_ids(tokenizer, model_path),
        context=context,
    )
    evaluation = load_sft(eval_path, tokenizer, split=d.eval_split, **load) if eval_path else []
    held_out = hashlib.sha256(json.dumps([(e.prompt_ids, e.real_ids) for e in evaluation]).encode())
    inputs = {
        "start model files": files_fingerprint(model_path) if Path(model_path).is_dir() else model_path,
        "eval data": held_out.hexdigest()[:16],
    }
    limits: list[str] = []
    fill = partial(choose_limits, cfg, context, evaluation, limits)
    train = _training_set(
        cfg, read_sft(train_path, tokenizer, dedupe=d.dedupe, split=d.train_split, **load), inputs, dry_run, fill
    )
    g = cfg.generation
    max_model_len = g.max_model_len or d.max_prompt_tokens + max(d.max_response_tokens, g.max_tokens) + 1
    api_key = os.environ.get(cfg.serve.api_key_env)
    if cfg.serve.live:
        check_exposure(cfg.serve.host, api_key, cfg.serve.api_key_env)
    digest = key_digest(api_key)
    shape = model_shape(model_path, cfg.train.lora)
    params = (shape.trainable, shape.params)
    return Prepared(model_path, train, evaluation, toy, max_model_len, digest, inputs, params, limits)


def builtin_world(cfg: Config) -> ToyWorld | None:
    """The world `model.path` names by a word (`toy`, `smollm2`), built on first use; else None."""
    if cfg.model.path == "toy":
        return toy_world(cfg.run.seed, cfg.toy.task)
    if cfg.model.path == "smollm2":
        from spin_ray.smollm2 import smollm2_world

        return smollm2_world(cfg.run.seed)
    return None


def choose_limits(
    cfg: Config, context: int | None, evaluation: list[Example], limits: list[str], train: TrainingSet
) -> None:
    """Sets the token limits left null to what the data needs, within the model's `context`, and
    says why in `limits` (for the dry run); then refuses limits the context cannot hold."""
    d, g = cfg.data, cfg.generation
    within = f", within the model's context of {context} tokens" if context else ""
    if d.max_prompt_tokens is None:
        d.max_prompt_tokens = max([train.longest_prompt, *(len(e.prompt_ids) for e in evaluation)])
        limits.append(f"data.max_prompt_tokens={d.max_prompt_tokens}: the longest prompt in the data")
    if d.max_response_tokens is None:
        d.max_response_tokens = max([*train.real_lengths, *(len(e.real_ids) for e in evaluation)])
        limits.append(f"data.max_response_tokens={d.max_response_tokens}: the longest real answer{within}")
    if g.max_tokens is None:
        room = context - 1 - d.max_prompt_tokens if context else d.max_response_tokens
        g.max_tokens = max(1, min(d.max_response_tokens, room))
        limits.append(f"generation.max_tokens={g.max_tokens}: y' as long as the longest real answer{within}")
    longest = d.max_prompt_tokens + max(d.max_response_tokens, g.max_tokens)
    if context and longest >= context:
        raise ValueError(
            f"data.max_prompt_tokens + max(data.max_response_tokens, generation.max_tokens) = {longest} does not fit "
            f"the model's context ({context} tokens, generation.max_model_len or max_position_embeddings): lower them"
        )


def _training_set(
    cfg: Config,
    examples: Iterator[Example],
    inputs: dict[str, str],
    dry_run: bool,
    fill: Callable[[TrainingSet], None],
) -> TrainingSet:
    """Writes the training set to run.output_dir/data/train.parquet (a dry run only counts it),
    then `fill`s the token limits the config left to the data.
    Bad data, or data other than a stored run's, leaves nothing behind: the file is written
    beside the stored one and replaces it only once everything checks out."""
    out = Path(cfg.run.output_dir)
    fresh = not out.exists()
    final = RunDir(out).train_data
    tmp = None if dry_run else final.with_name(final.name + ".tmp")
    try:
        if tmp:
            lock(out)  # before anything is written: a second job on this dir is refused here
            tmp.parent.mkdir(parents=True, exist_ok=True)
        train = write_training_set(examples, tmp, cfg.data.max_examples)
        fill(train)  # before the comparison with a stored run: its config.yaml holds the limits chosen then
        check_unchanged(cfg, train.fingerprint, inputs)
    except BaseException:
        if tmp:
            tmp.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a data dir of our own making, now empty
                tmp.parent.rmdir()
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return replace(train, path=tmp.replace(final)) if tmp else train
