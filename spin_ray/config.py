"""The one typed config tree: defaults here, YAML on top, `key.sub=value` overrides last.

Every field's default and meaning lives in this file; the README's config reference is generated
from it (`python -m spin_ray.config`). Validation runs before Ray or any engine starts, and every
error names the dotted key to fix.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]  # vLLM 0.32's LoRAConfig.max_lora_rank


class ConfigError(ValueError):
    """A config problem, worded so the user knows which key to change."""


class Section(BaseModel):
    # extra="forbid" turns a typo such as `train.lr_rate` into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = Field("toy", description="HF model dir or hub id; `toy` or `smollm2`: a built-in model and task.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for engines and training."
    )


class DataConfig(Section):
    # Records hold chat `messages` (or the official SPIN data's `real`); toy and smollm2 bring their own.
    train_path: str | None = Field(None, description="SFT data: JSONL, Parquet, a `datasets` dir or a Hub id.")
    eval_path: str | None = Field(None, description="Held-out SFT data, same format (optional).")
    train_split: str = Field("train", description="train_path's split (a Hub dataset or a DatasetDict).")
    eval_split: str = Field("test", description="eval_path's split (a Hub dataset or a DatasetDict).")
    max_prompt_tokens: int | None = Field(None, gt=0, description="Longest prompt in tokens; null: the data's.")
    max_response_tokens: int | None = Field(None, gt=0, description="Real answers are cut there; null: the data's.")
    long_prompts: Literal["error", "skip"] = Field(
        "error", description="Prompts over max_prompt_tokens: error or skip."
    )
    dedupe: Literal["none", "records"] = Field("none", description="Keep every record, or drop exactly equal ones.")
    max_examples: int | None = Field(None, gt=0, description="Use only the first N training examples.")


class GenerationConfig(Section):
    temperature: float = Field(1.0, ge=0, description="Sampling temperature for y' (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for y'.")
    max_tokens: int | None = Field(None, gt=0, description="Most new tokens of y'; null: data.max_response_tokens.")
    num_engines: int = Field(1, gt=0, description="Long-lived vLLM engine actors.")
    tensor_parallel_size: int = Field(1, gt=0, description="Tensor-parallel ranks per engine: GPUs, or CPU processes.")
    num_gpus: float = Field(0, ge=0, description="GPUs per tensor-parallel rank (an engine asks TP x this); 0 = CPU.")
    num_cpus: float = Field(
        0.5, gt=0, description="Logical CPUs per engine actor (on CPU: per tensor-parallel rank; its threads, >= 1)."
    )
    resource: str | None = Field(None, description="Custom Ray resource each engine asks 1 of (generation nodes).")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache per engine process (TP rank) in GiB (CPU).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM GPU memory share.")
    max_model_len: int | None = Field(None, gt=0, description="vLLM's context, the data's bound (null: what it needs).")
    enforce_eager: bool = Field(True, description="Skip graph capture/compile (start-up cost, no gain on CPU).")
    batch_size: int = Field(
        256, gt=0, description="Prompts per request to an engine; >= vLLM's max_num_seqs (256 on CPU, 1024 on H100)."
    )
    max_in_flight: int = Field(2, gt=0, description="Requests in flight per engine.")
    start_timeout_s: float = Field(900, gt=0, description="Fail if engines are not up by then (resources).")
    health_timeout_s: float = Field(60, gt=0, description="An engine silent to a health ping this long is replaced.")
    max_restarts: int = Field(8, ge=0, description="Engine replacements allowed per job, all engines together.")
    batch_timeout_s: float = Field(
        1800, gt=0, description="A batch (with its wait in the engine's queue) not done by then: engine replaced."
    )
    max_lora_rank: LoraRank | None = Field(
        None, description="vLLM's LoRA slot size; null = no LoRA, or with train.lora the smallest that holds its r."
    )

    @property
    def cpus_per_engine(self) -> float:
        """What an engine asks Ray for in CPUs: on CPU each tensor-parallel rank is a process."""
        return self.num_cpus * (self.tensor_parallel_size if self.num_gpus == 0 else 1)


class SpinConfig(Section):
    objective: Literal["spin", "sft"] = Field(
        "spin", description="`sft`: the same-compute baseline, NLL of the real answers, same steps, data and schedule."
    )
    iterations: int = Field(3, gt=0, description="SPIN iterations.")
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the SPIN loss.")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field("sigmoid", description="SPIN loss.")
    mix_previous: int = Field(1, ge=0, description="Earlier iterations whose pairs are mixed in (paper: 1).")
    reference: Literal["model", "engines"] = Field(
        "model", description="Reference log-probs from a frozen copy of p_t in the trainer, or scored by the engines."
    )
    stream: bool = Field(
        True,
        description="Train on the pairs as the engines make them (mixed with earlier iterations' through a "
        "shuffle window) instead of after all are made; needs train.epochs=1.",
    )
    shuffle_window: int = Field(
        256, gt=0, description="Pairs held to shuffle the stream (spin.stream); training starts once it is full."
    )

    @property
    def streams(self) -> bool:
        """Whether iterations stream: the SFT baseline has no generated pairs to stream."""
        return self.stream and self.objective == "spin"


class LoraConfig(Section):
    r: int = Field(16, gt=0, le=512, description="LoRA rank (vLLM takes up to 512).")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (the update is alpha/r * B A).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Linear layers that get an adapter (names as in the model, e.g. q_proj)."
    )
    export_merged: bool = Field(False, description="Also write iter_<t>/merged: base + adapter as one full checkpoint.")


class TrainConfig(Section):
    lr: float = Field(5e-7, gt=0, description="Peak learning rate.")
    epochs: int = Field(1, gt=0, description="Epochs over each iteration's pairs.")
    batch_size: int = Field(8, gt=0, description="Pairs per worker per step (micro batch).")
    grad_accum: int = Field(1, gt=0, description="Micro batches per optimizer step.")
    optimizer: Literal["adamw", "rmsprop"] = Field("rmsprop", description="Official SPIN uses RMSprop.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Linear warmup share of each iteration's steps.")
    schedule: Literal["linear", "constant"] = Field(
        "linear", description="After warmup: linear decay to 0 (official SPIN) or constant."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on GPU clusters).")
    use_gpu: bool = Field(False, description="Train on GPUs.")
    num_cpus: float = Field(1.0, gt=0, description="Logical CPUs per training worker.")
    resource: str | None = Field(None, description="Custom Ray resource each worker asks 1 of.")
    log_every: int = Field(10, gt=0, description="Steps between training log lines.")
    max_restarts: int = Field(
        3, ge=0, description="Worker-group restarts per Ray Train run, and new runs after errors it does not retry."
    )
    start_timeout_s: float = Field(900, gt=0, description="Fail if a worker group is not up by then.")
    stall_timeout_s: float = Field(1800, gt=0, description="Fail if a train rank shows no progress this long.")
    lora: LoraConfig | None = Field(None, description="A LoRA adapter on frozen base weights; null = full fine-tuning.")


class LmEvalConfig(Section):
    tasks: list[str] = Field(min_length=1, description="lm-evaluation-harness tasks or groups, e.g. arc_challenge.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt (None: each task's own).")
    limit: int | None = Field(None, gt=0, description="Score only the first N documents of each task.")
    include_path: str | None = Field(None, description="A dir of task YAMLs of your own (local data).")
    chat_template: bool = Field(False, description="Wrap each prompt in the model's chat template.")
    batch_size: int = Field(64, gt=0, description="Requests per engine call.")


class EvalConfig(Section):
    hooks: list[str] = Field(
        [],
        description="`pkg.module:function`s called with (checkpoint dir, iteration) after each iteration; "
        "their dict is logged under eval/<function>/.",
    )
    lm_eval: LmEvalConfig | None = Field(None, description="lm-eval tasks run on p_0 and each p_t by the engines.")
    beside: bool = Field(
        True,
        description="Evaluate p_t beside iteration t+1 (false: before it, where engines and trainer share CPU cores).",
    )


class SyncConfig(Section):
    method: Literal["object_store", "broadcast"] = Field("object_store", description="Weight transfer path.")
    bucket_mb: float = Field(32, gt=0, description="Bucket size of the broadcast path, in MiB.")
    timeout_s: float = Field(120, gt=0, description="A broadcast step that stalls this long fails the sync.")
    max_logprob_mismatch: float = Field(
        0.1,
        gt=0,
        description="Stop when the engines' log-probs of their sampled tokens differ from training's p_{t-1} by "
        "more than this per token, on average (stale engine weights; ~0 in fp32, ~0.01 in bf16).",
    )


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address the OpenAI endpoint binds (0.0.0.0 exposes it).")
    port: int = Field(8000, gt=0, lt=65536, description="Its port.")
    api_key_env: str = Field(
        "SPIN_SERVE_API_KEY", description="Environment variable holding the bearer key; unset = no key asked."
    )
    min_replicas: int = Field(1, ge=0, description="Replicas per served model, at least.")
    max_replicas: int = Field(1, gt=0, description="Replicas per served model, at most (autoscaling).")
    max_tokens: int = Field(256, gt=0, description="Most new tokens a request may ask for (also its default).")
    max_prompt_tokens: int | None = Field(None, gt=0, description="Longest prompt (default: data.max_prompt_tokens).")
    max_body_kb: int = Field(256, gt=0, description="Largest request body.")
    max_concurrency: int = Field(64, gt=0, description="Requests in flight; more get 429.")
    live: bool = Field(False, description="During a SPIN job, serve the engines' current weights (model spin-live).")
    direct_ingress: bool | None = Field(
        None, description="jobs/serve.py's gateway listens on serve.port, no proxy hop; null = on a Ray it starts."
    )


class RunConfig(Section):
    output_dir: str = Field("runs/spin", description="Where pairs, checkpoints and metrics go.")
    seed: int = Field(0, description="Seeds data order, sampling and initialisation.")
    ray_address: str | None = Field(None, description="Ray cluster to join; None starts a local one.")
    wandb_project: str = Field("spin-ray", description="W&B project.")
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto = online when WANDB_API_KEY is set, else offline."
    )
    verbose: bool = Field(
        False, description="Show every library's output on the console (default: in output_dir/logs/ only)."
    )
    allow_config_change: bool = Field(
        False, description="Resume a run dir whose results-changing settings or data differ (else refused)."
    )


class ToyConfig(Section):
    task: Literal["addition", "working"] = Field(
        "addition", description="model.path=toy: sums, or sums with the working written out (longer answers)."
    )


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    generation: GenerationConfig = GenerationConfig()
    spin: SpinConfig = SpinConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    sync: SyncConfig = SyncConfig()
    serve: ServeConfig = ServeConfig()
    run: RunConfig = RunConfig()
    toy: ToyConfig = ToyConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.model.path not in ("toy", "smollm2") and self.data.train_path is None:
            raise ValueError("data.train_path is required unless model.path is toy or smollm2")
        if self.spin.streams and self.train.epochs > 1:
            raise ValueError(
                "spin.stream=true trains on each pair as it is made, once: set train.epochs=1 or spin.stream=false"
            )
        if self.sync.method == "broadcast" and self.train.use_gpu != (self.generation.num_gpus > 0):
            raise ValueError(
                "sync.method=broadcast needs engines and trainer on the same kind of device (NCCL between GPUs, "
                "gloo between CPUs): set train.use_gpu and generation.num_gpus alike, or use sync.method=object_store"
            )
        if self.model.path == "toy" and self.toy.task == "working" and (self.generation.max_tokens or 24) < 24:
            raise ValueError("toy.task=working answers take up to 19 tokens: set generation.max_tokens=24")
        if lora := self.train.lora:
            g = self.generation
            g.max_lora_rank = g.max_lora_rank or min(r for r in get_args(LoraRank) if r >= lora.r)
            if lora.r > g.max_lora_rank:
                raise ValueError(
                    f"train.lora.r={lora.r} is above generation.max_lora_rank={g.max_lora_rank}: the engines could "
                    "not load the adapter; raise generation.max_lora_rank or lower train.lora.r"
                )
            if self.sync.method == "broadcast":
                raise ValueError(
                    "train.lora syncs only the adapter, through the object store: sync.method=object_store"
                )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


# Keys that change where and how fast a run goes, never what it computes (a prefix ending in "."
# names a whole section: eval only adds metrics).
OPERATIONAL = tuple(
    """
    spin.iterations generation.num_engines generation.num_gpus generation.num_cpus generation.resource
    generation.kv_cache_gib generation.gpu_memory_utilization generation.enforce_eager generation.batch_size
    generation.max_in_flight generation.start_timeout_s generation.health_timeout_s generation.max_restarts
    generation.batch_timeout_s generation.max_lora_rank train.num_cpus train.resource train.log_every
    train.max_restarts train.stall_timeout_s sync. eval. serve. run.output_dir run.ray_address run.wandb_project
    run.wandb_mode run.verbose run.allow_config_change
    """.split()
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b=value` in a nested dict; the value is parsed as YAML (so 1e-5, true, null work)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        node[part] = {} if node.get(part) is None else node[part]  # `null`: an optional section left empty
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- overrides, validated; raises ConfigError naming every bad key."""
    tree: dict[str, Any] = {}
    source = "defaults" if path is None else str(path)
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    for override in overrides:
        apply_override(tree, override)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(config)"
            given = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            problems.append(f"  {key}: {err['msg']}{given}")
        raise ConfigError(f"invalid config ({source} + overrides):\n" + "\n".join(problems)) from None


def reference_markdown() -> str:
    """The config reference table for the README, generated so docs and defaults never drift."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    sections = [(name, field.annotation) for name, field in Config.model_fields.items()]
    sections.insert(5, ("train.lora", LoraConfig))  # sub-sections: after their section's own keys
    sections.insert(7, ("eval.lm_eval", LmEvalConfig))
    for section_name, section in sections:
        for name, field in section.model_fields.items():  # type: ignore[union-attr]
            default = "(required)" if field.is_required() else f"`{field.default!r}`"
            lines.append(f"| `{section_name}.{name}` | {default} | {field.description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown() + "\n")
