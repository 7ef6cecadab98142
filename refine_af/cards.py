"""The model card of a stage 4 adapter and the dataset card of stage 3's export.

Both are ``huggingface_hub`` cards: the Hub metadata is card data (``ModelCardData``,
``DatasetCardData``) and the text is a Jinja template filled from the stage's summary, so
the Hub, ``mlflow.transformers`` and ``datasets`` read them as they read any card. A card
names its inputs and itself by durable references (digests, the config hash, MLflow run
ids, the registered version), never by a path on the machine that wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refine_af import models, serving
from refine_af.config import RunConfig

SEED_SOURCE = "Self-Instruct's 175 human-written seed tasks (yizhongw/self-instruct)"
SEED_LICENSE = "apache-2.0"

# Jinja drops a template's last newline, so each ends with an empty line to keep one.
MODEL_CARD = """\
---
{{ card_data }}
---

# REFINE-AF instruction-tuned LoRA adapter ({{ policy }} policy data)

A LoRA adapter for `{{ base }}`, fine-tuned with trl's SFTTrainer on \
{{ s.train_examples }} examples that the {{ policy }} policy wrote in stage 3 of REFINE-AF \
(Roy et al., 2025); the loss covers the output only.

## Data

- examples: sha256 `{{ s.dataset_sha256 }}`
- train: {{ s.train_examples }} examples; held out: {{ s.eval_examples }} examples of \
{{ s.eval_instructions }} instructions
- prompt template: {{ s.template }}

## Training

- LoRA r={{ lora.r }}, alpha={{ lora.alpha }}, dropout={{ lora.dropout }}, \
modules={{ lora.target_modules }}
- learning rate {{ sft.learning_rate }} ({{ sft.lr_scheduler }}, warmup \
{{ sft.warmup_ratio }}), batch {{ sft.per_device_batch_size }} × \
{{ sft.gradient_accumulation_steps }} accumulation per device, max length \
{{ sft.max_length }}, bf16 {{ sft.bf16 }}
- steps: {{ s.steps }} ({{ s.epochs }} epochs)
- train loss: {{ s.train_loss }}
- eval loss: {{ s.eval_loss_before }} before → {{ s.eval_loss }} after

## Provenance

- config hash: `{{ s.config_hash }}`
- MLflow run: `{{ s.run_id }}`
{% if version -%}
- registry: `{{ name }}` version {{ version }} (`{{ model_uri }}`)
{% elif name -%}
- registry: a version of `{{ name }}`
{% else -%}
- registry: not registered
{% endif %}
## Use

{% if version -%}
```python
import mlflow
model = mlflow.pyfunc.load_model("{{ model_uri }}")
model.predict({{ request }})  # its request format: refine-af docs/serving.md
```

{% endif -%}
This folder with refine-af: `models.load_causal_lm('adapter')` (base + adapter).

"""

DATASET_CARD = """\
---
{{ card_data }}
---

# REFINE-AF instruction-tuning data ({{ s.policy }} policy)

{{ s.kept }} (instruction, input, output) examples for {{ s.instructions_with_examples }} \
of {{ s.instructions }} instructions, written by a small LLM from machine-generated \
instructions (Self-Instruct) and scored with automated feedback (REFINE-AF, Roy et al., \
2025).

## Load it

```python
from datasets import load_dataset
dataset = load_dataset("path/to/this/folder", split="train")
```

## How it was made

- model: `{{ model }}`
{% if adapter is none -%}
- LoRA adapter (stage 2 policy): none (the base model wrote the instances: the baseline)
{% else -%}
- LoRA adapter (stage 2 policy): weights sha256 `{{ adapter.sha256 }}`
{% if adapter.uri %}  - artifact: `{{ adapter.uri }}`
{% endif %}{% if adapter.mlflow_run_id %}  - MLflow run of stage 2: `{{ adapter.mlflow_run_id }}`
{% endif %}{% endif -%}
- instructions: sha256 `{{ s.instructions_sha256 }}`
- examples (examples.jsonl): sha256 `{{ s.dataset_sha256 }}`
- samples per instruction: {{ s.samples_per_instruction }}, at most \
{{ s.max_per_instruction }} kept per instruction
- reward: {{ reward }} + {{ s.reward.bias }}
- minimum reward: {{ 'none' if s.min_reward is none else s.min_reward }}
- config hash: `{{ s.config_hash }}`
- seed tasks: {{ seeds }}

## Columns

`id`, `instruction_id`, `instruction`, `input` (may be empty), `output`, `scores` (each \
automated scorer's score), `reward` (their weighted sum), `policy` (`rl`: the RL-trained \
policy wrote it; `base`: the base model did).

## Counts

{{ s.generations }} sampled completions: {{ s.kept }} kept, {{ filtered }} filtered by \
Self-Instruct's rules, {{ quarantined }} quarantined (no instance in them).

{% for title in ("filtered", "quarantined") if s[title] -%}
| {{ title }} | count |
|---|---:|
{% for reason, count in s[title].items() -%}
| {{ reason }} | {{ count }} |
{% endfor %}
{% endfor -%}
## Licence

The instructions descend from {{ seeds }} The examples were written by `{{ model }}`; its \
licence terms apply to them as well.

"""


def model_card(summary: dict[str, Any], config: RunConfig) -> str:
    """README.md of the adapter: what it was trained on, how, and how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    base = models.public_reference(config.model.base)
    name, version = summary.get("registered_model"), summary.get("registered_version")
    data = ModelCardData(
        base_model=base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["refine-af", "lora", "sft", "trl", f"policy-{summary['policy']}"],
    )
    card = ModelCard.from_template(
        data,
        template_str=MODEL_CARD,
        s=summary,
        policy=summary["policy"],
        base=base,
        sft=config.stage4,
        lora=config.stage4.lora,
        name=name,
        version=version,  # the card logged with the model is written before MLflow numbers it
        model_uri=f"models:/{name}/{version}",
        request=repr(serving.request(serving.task_for(summary["template"]), "Give me three tips.")),
    )
    return str(card)


def _size_category(count: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if count < limit:
            return label
    return "100K<n<1M"


def seed_provenance(seed_tasks: str | None) -> tuple[str, str]:
    """(licence id for the card's metadata, sentence on where the seeds come from)."""
    if seed_tasks is None:
        return SEED_LICENSE, f"{SEED_SOURCE}, licensed Apache-2.0."
    name = seed_tasks if "://" in seed_tasks else Path(seed_tasks).name
    return "unknown", f"a custom seed file, {name}; its licence is not known here."


def dataset_card(summary: dict[str, Any], seed_tasks: str | None, parquet_file: str) -> str:
    """The dataset card: metadata for the Hub, then how the data was made and what was cut."""
    from huggingface_hub import DatasetCard, DatasetCardData

    licence, seeds = seed_provenance(seed_tasks)
    data = DatasetCardData(
        license=licence,
        language=["en"],
        task_categories=["text-generation"],
        size_categories=[_size_category(summary["kept"])],
        tags=["refine-af", "self-instruct", "synthetic", f"policy-{summary['policy']}"],
        configs=[
            {"config_name": "default", "data_files": [{"split": "train", "path": parquet_file}]}
        ],
    )
    components = summary["reward"]["components"]
    card = DatasetCard.from_template(
        data,
        template_str=DATASET_CARD,
        s=summary,
        model=models.public_reference(summary["model"]),
        adapter=summary["adapter"],
        reward=", ".join(f"{c['weight']} × {c['scorer']}" for c in components),
        seeds=seeds,
        filtered=sum(summary["filtered"].values()),
        quarantined=sum(summary["quarantined"].values()),
    )
    return str(card)
