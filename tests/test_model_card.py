"""The export's model card (README.md): Hugging Face's format, read back with huggingface_hub."""

from __future__ import annotations

import json

import pytest

from pipeline.checkpoint.model_card import model_card
from pipeline.core.options import TrainConfig
from pipeline.tasks.multi_label import MULTI_LABEL


@pytest.mark.ranks
def test_every_export_has_a_model_card_with_data_digests_labels_metrics_and_the_baseline(tracked_run):
    from huggingface_hub import ModelCard

    run_dir, _ = tracked_run
    card = ModelCard.load(run_dir / "export" / "README.md")
    results = json.loads((run_dir / "eval_results.json").read_text())
    state = json.loads((run_dir / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results} == {
        ("dev", metric): results["dev"][metric] for metric in ("accuracy", "macro_f1", "weighted_f1")
    }
    assert state["train_data"]["train file content (sha256)"] in card.text
    for label, row in results["dev"]["per_class"].items():
        assert f"- `{label}`: dev {row['support']} records" in card.text
    baseline = results["baseline"]  # the run's own TF-IDF baseline, beside the model's metrics
    assert f"| dev | macro_f1 | {results['dev']['macro_f1']:.4f} | {baseline['dev']['macro_f1']:.4f} |" in card.text
    assert "exported at optimizer step 6" in card.text and "AutoModelForSequenceClassification" in card.text


def test_the_card_of_a_chunked_multi_label_model_says_what_a_transformers_pipeline_does_not_do(tmp_path):
    cfg = TrainConfig(task="multi_label", long_records="chunks", stride=16, pool="max", max_length=64)
    state = {
        "train_config": vars(cfg),
        "ds_config": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
        "train_data": {"train records": 10, "train file content (sha256)": "ab" * 32},
        "label_names": ["a", "b"],
        "class_weights": {},
        "train_batch_size": 8,
        "world_size": 2,
    }
    text = model_card(MULTI_LABEL, state, 6, tmp_path / "run", {"a": 0.25, "b": 0.5})
    assert "- `a`, threshold 0.250" in text and "ZeRO stage 3, bf16" in text
    assert "overlapping windows of 64 tokens (stride 16), their logits pooled per record by max" in text
    assert "threshold in `thresholds.json`" in text and "python -m pipeline predict" in text
    assert "No final evaluation of this step" in text
