"""The export's README.md: a Hugging Face model card (YAML metadata through huggingface_hub's
ModelCardData, then prose) saying what was trained on what, how it reads a record, how well it did
against the baseline, and how to load it.

Everything comes from the checkpoint's trainer state (configuration, data digest, labels,
thresholds) and, where the run directory holds them for the exported step, eval_results.json and
the baseline (eval/baseline.json).
"""

from __future__ import annotations

from pathlib import Path

from ..core.base import file_digest, load_json, write_text
from ..tasks.base import Task
from .checkpoints import STATE, read_json, step_of


def final_results(run_dir: Path, step: int) -> dict:
    """The run's eval_results.json when it evaluated exactly the exported step, else {}."""
    path = run_dir / "eval_results.json"
    results = load_json(path) if path.is_file() else {}
    return results if results.get("step") == step else {}


def baseline_of(run_dir: Path, results: dict) -> dict:
    """The baseline's scores: eval_results.json's "baseline", else RUN_DIR/eval/baseline.json, else {}."""
    path = run_dir / "eval" / "baseline.json"
    return results.get("baseline") or (load_json(path) if path.is_file() else {})


def metrics_table(task: Task, results: dict, baseline: dict) -> str:
    """Final dev/test metrics, beside the baseline's where there is one."""
    header = ["split", "metric", "this model", *([f"baseline ({baseline['name']})"] if baseline else [])]
    rows = []
    for split in ("dev", "test"):
        for metric in task.metric_names:
            if metric in results.get(split, {}):
                cells = [split, metric, f"{results[split][metric]:.4f}"]
                if baseline:
                    reference = baseline.get(split, {}).get(metric)
                    cells.append(f"{reference:.4f}" if isinstance(reference, (int, float)) else "")
                rows.append(cells)
    if not rows:
        return "No final evaluation of this step was found in its run directory."
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def data_lines(cfg: dict, state: dict) -> list[str]:
    """Each data file with its SHA-256: the training file's as it was read, dev and test as they are now."""
    lines = [
        f"- train: `{Path(cfg['train_file']).name}`, {state['train_data'].get('train records', '?')} records, "
        f"sha256 `{state['train_data'].get('train file content (sha256)', '?')}`"
    ]
    for split in ("dev", "test"):
        path = cfg.get(f"{split}_file")
        if path and Path(path).is_file():
            lines.append(f"- {split}: `{Path(path).name}`, sha256 `{file_digest(path)}` (at export)")
    return lines


def label_lines(names: list[str], results: dict, thresholds: dict | None) -> list[str]:
    """Each label with its dev and test record counts (the evaluation's support) and, multi-label, its threshold."""
    lines = []
    for name in names:
        counts = [
            f"{split} {results[split]['per_class'][name]['support']}"
            for split in ("dev", "test")
            if name in results.get(split, {}).get("per_class", {})
        ]
        threshold = f", threshold {thresholds[name]:.3f}" if thresholds and name in thresholds else ""
        lines.append(f"- `{name}`" + (f": {', '.join(counts)} records" if counts else "") + threshold)
    return lines


def reading_line(cfg: dict) -> str:
    if cfg["long_records"] == "chunks":
        return (
            f"overlapping windows of {cfg['max_length']} tokens (stride {cfg['stride']}), their logits pooled per "
            f"record by {cfg['pool'] or 'mean'}"
        )
    return (
        f"the first {cfg['max_length']} tokens"
        if cfg["truncation"] == "head"
        else f"{cfg['truncation']} truncation to {cfg['max_length']} tokens"
    )


def model_card(task: Task, state: dict, step: int, run_dir: Path, thresholds: dict | None) -> str:
    """The README.md of an export of step `step` of the run in `run_dir` (`state`: its trainer state)."""
    from huggingface_hub import EvalResult, ModelCardData

    cfg, ds = state["train_config"], state["ds_config"]
    results = final_results(run_dir, step)
    baseline = baseline_of(run_dir, results)
    evaluated = [
        EvalResult(
            task_type="text-classification",
            dataset_type="json",
            dataset_name=Path(cfg[f"{split}_file"]).name,
            dataset_split=split,
            metric_type=metric,
            metric_value=results[split][metric],
        )
        for split in ("dev", "test")
        for metric in task.metric_names
        if metric in results.get(split, {})
    ]
    data = ModelCardData(
        model_name=run_dir.name,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["text-classification", "deepspeed", "zero-pipeline", task.name],
        eval_results=evaluated or None,
    )
    zero = ds.get("zero_optimization", {}).get("stage")
    precision = next((p for p in ("fp16", "bf16") if ds.get(p, {}).get("enabled")), "fp32")
    names = state["label_names"]
    labels = (
        f"Labels ({len(names)}; counts are the evaluation sets' records):\n\n"
        + "\n".join(label_lines(names, results, thresholds))
        if names
        else "One number per record (regression)."
    )
    special = []
    if cfg["long_records"] == "chunks" or cfg["truncation"] != "head":
        special.append(f"reads each record as {reading_line(cfg)}")
    if thresholds:
        special.append("decides each label by its threshold in `thresholds.json`, not at 0.5")
    caveat = (
        f'`pipeline("text-classification", truncation=True, max_length={cfg["max_length"]})` reads the first tokens of a '
        + (
            "record and "
            + (
                "gives each label's sigmoid score"
                if thresholds
                else "gives the softmax over the labels"
                if names
                else "gives the one output as it is (problem_type regression)"
            )
        )
        + (
            "; this model " + " and ".join(special) + ", which it does not: `python -m pipeline predict --model DIR` does."
            if special
            else ", as this model was trained."
        )
    )
    body = f"""
# {run_dir.name}

A {task.name.replace("_", "-")} text classifier fine-tuned with zero-pipeline (DeepSpeed ZeRO) from
`{Path(cfg["model"]).name}` (`{cfg["model"]}`), exported at optimizer step {step}.

## Data

Text column `{cfg["text_column"]}`, label column `{cfg["label_column"]}`.

{chr(10).join(data_lines(cfg, state))}

{labels}

Reading: {reading_line(cfg)}.

## Training

{cfg["epochs"]} epoch(s){f", at most {cfg['max_steps']} steps" if cfg["max_steps"] else ""}, seed {cfg["seed"]}; a global batch of
{state["train_batch_size"]} ({ds.get("train_micro_batch_size_per_gpu")} per rank x {ds.get("gradient_accumulation_steps")}
accumulation x {state["world_size"]} ranks); DeepSpeed ZeRO stage {zero}, {precision}; optimizer
{ds.get("optimizer", {}).get("type", "?")} {ds.get("optimizer", {}).get("params", {})}; class weights
{state["class_weights"] or "none"}; vocabulary {cfg["vocabulary"]}. The full configuration is in the run directory's
`train_config.json` and `ds_config.json`.

## Results

{metrics_table(task, results, baseline)}

## How to use

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIRECTORY")
model = AutoModelForSequenceClassification.from_pretrained("PATH/TO/THIS/DIRECTORY")
inputs = tokenizer(["..."], truncation=True, max_length={cfg["max_length"]}, return_tensors="pt")
logits = model(**inputs).logits  # labels: model.config.id2label
```

{caveat}
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def write_model_card(directory: Path, ckpt: Path, task: Task, thresholds: dict | None) -> None:
    """README.md in `directory`, the export of checkpoint `ckpt` (RUN_DIR/checkpoints/step-N)."""
    state = read_json(ckpt / STATE)
    write_text(directory / "README.md", model_card(task, state, step_of(ckpt), ckpt.parent.parent, thresholds))
