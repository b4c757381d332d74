from pathlib import Path

import pytest
import yaml

from spin_ray.config import Config, ConfigError, GenerationConfig, load_config, reference_markdown


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-6\n  zero_stage: 3\nspin:\n  loss_type: hinge\n")
    cfg = load_config(path, ["train.lr=2e-7", "generation.num_engines=4", "data.eval_path=null", "run.seed=7"])
    assert cfg.train.lr == 2e-7  # the override wins over the file
    assert cfg.train.zero_stage == 3 and cfg.spin.loss_type == "hinge"
    assert cfg.generation.num_engines == 4 and cfg.data.eval_path is None and cfg.run.seed == 7
    assert cfg.spin.beta == 0.1 and cfg.spin.mix_previous == 1  # paper defaults
    assert Config.model_validate(load_config(None).model_dump()) == Config()


def test_an_override_fills_a_section_a_stored_config_left_null(tmp_path):
    """jobs/evaluate.py on a run trained without lm-eval: its config.yaml has `lm_eval: null`."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(Config().model_dump(mode="json")))
    assert "lm_eval: null" in path.read_text()
    cfg = load_config(path, ["eval.lm_eval.tasks=[arc_easy]", "eval.lm_eval.limit=5"])
    assert cfg.eval.lm_eval is not None and cfg.eval.lm_eval.tasks == ["arc_easy"] and cfg.eval.lm_eval.limit == 5


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lr_rate=1e-5", "train.lr_rate"),  # unknown key
        ("train.epochs=two", "train.epochs"),  # wrong type
        ("train.zero_stage=4", "train.zero_stage"),  # impossible value
        ("spin.beta=-1", "spin.beta"),
        ("spin.loss_type=kto", "spin.loss_type"),
        ("generation.top_p=1.5", "generation.top_p"),
        ("bogus.key=1", "bogus"),
        ("model.path=/some/model", "data.train_path"),  # a real model needs data
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert named in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=0", "train.batch_size=0", "spin.iterations=-1"])
    assert all(k in str(e.value) for k in ("train.lr", "train.batch_size", "spin.iterations"))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.lr"])


def test_reference_lists_every_key():
    table = reference_markdown()
    for key in (
        "model.path",
        "model.dtype",
        "data.train_path",
        "data.eval_path",
        "data.max_prompt_tokens",
        "generation.temperature",
        "generation.top_p",
        "generation.max_tokens",
        "generation.num_engines",
        "spin.iterations",
        "spin.beta",
        "spin.loss_type",
        "spin.mix_previous",
        "train.lr",
        "train.epochs",
        "train.batch_size",
        "train.zero_stage",
        "train.num_workers",
        "run.output_dir",
        "run.seed",
    ):
        assert f"`{key}`" in table


def test_readme_config_reference_is_current():
    page = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    assert reference_markdown() in page, "regenerate docs/config.md's table: python -m spin_ray.config"


def test_jobs_default_config_follows_model_path():
    """No --config: the toy's file for the toy, smollm2's for smollm2, and spin_ray/config.py's
    defaults for any other model (the toy's token limits and lr are no real model's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "spin_job", Path(__file__).resolve().parent.parent / "jobs" / "spin.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.default_config([]).name == "toy.yaml"
    assert job.default_config(["train.lr=1e-3", "model.path=smollm2"]).name == "smollm2.yaml"
    assert job.default_config(["model.path=smollm2", "model.path=/models/zephyr"]) is None


def test_a_cpu_engine_gets_a_thread_per_cpu_it_asks_for():
    """OMP threads follow generation.num_cpus (at least one), so that an engine alone on a machine
    (configs/smollm2.yaml: phases one at a time) uses every core, and engines beside training use
    only their share."""
    from spin_ray.engines.engine import engine_env

    threads = {cpus: engine_env(GenerationConfig(num_cpus=cpus))["OMP_NUM_THREADS"] for cpus in (0.5, 1, 2, 2.5)}
    assert threads == {0.5: "1", 1: "1", 2: "2", 2.5: "2"}
    assert "OMP_NUM_THREADS" not in engine_env(GenerationConfig(num_gpus=1))
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "smollm2.yaml")
    assert (cfg.generation.num_cpus, cfg.train.num_cpus, cfg.spin.stream, cfg.eval.beside) == (2, 2, False, False)
