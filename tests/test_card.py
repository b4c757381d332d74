"""Every exported checkpoint's README.md is a Hugging Face model card: front matter the Hub reads,
the settings, p_0 ... p_t's held-out metrics, the command that makes it again."""

from huggingface_hub import ModelCard

from spin_ray.card import card, summary
from spin_ray.config import load_config


def test_card_is_a_model_card_with_metrics_up_to_its_iteration(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# the SFT model\n")
    paths = [f"model.path={base}", f"data.train_path={tmp_path / 'sft.jsonl'}", f"run.output_dir={tmp_path / 'run'}"]
    cfg = load_config(None, [*paths, "spin.beta=0.2"])
    rows = [
        {"iteration": 0, "eval/accuracy": 0.5, "eval/reward_acc": 0.5},
        {"iteration": 1, "step": 3, "train/loss": 0.6},  # a training line: no held-out metric
        {"iteration": 1, "eval/accuracy": 0.625, "eval/lm_eval/arc_easy/acc": 0.25},
        {"iteration": 2, "eval/accuracy": 0.75},  # p_2 is not part of p_1's card
    ]
    model = tmp_path / "run" / "iter_1" / "model"
    model.mkdir(parents=True)
    (model / "README.md").write_text(card(cfg, str(base), 1, rows, "abc123"))
    loaded = ModelCard.load(model / "README.md")
    assert loaded.data.base_model == str(base)
    assert loaded.data.library_name == "transformers"
    assert loaded.data.tags == ["spin", "self-play", "spin-ray"]
    assert loaded.data.license == "apache-2.0"  # from the base model's own card
    text = loaded.text
    assert "| metric | p_0 | p_1 |" in text
    assert "| eval/accuracy | 0.5 | 0.625 |" in text and "| eval/lm_eval/arc_easy/acc |  | 0.25 |" in text
    assert "0.75" not in text and "train/loss" not in text
    assert "- `spin.beta`: 0.2" in text and "fingerprint `abc123`" in text
    assert f"python jobs/spin.py --config {tmp_path / 'run' / 'config.yaml'}" in text
    assert summary(model) == f"Iteration 1 of SPIN (self-play fine-tuning): {base}, trained on {cfg.data.train_path}."


def test_lora_adapter_card_says_peft_and_no_license_without_one(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "train.lora.r=8"])
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    for d, is_merged in ((adapter, False), (merged, True)):
        d.mkdir()
        (d / "README.md").write_text(card(cfg, "org/base-7b", 1, [], "f", merged=is_merged))
    a, m = ModelCard.load(adapter / "README.md"), ModelCard.load(merged / "README.md")
    assert (a.data.library_name, m.data.library_name) == ("peft", "transformers")
    assert "lora" in a.data.tags and a.data.license is None and a.data.base_model == "org/base-7b"
    assert "No held-out evaluation was logged" in a.text and "LoRA adapter of" in summary(adapter)
    assert summary(tmp_path) is None  # no card
    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n\nPEFT's\n")
    assert summary(tmp_path) is None  # a card, not one of ours
