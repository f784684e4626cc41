"""Rank, alpha, dropout and rsLoRA from the task, the training tokens and the model, with reasons.

The rules, each with its source (keys of :data:`~peftaudit.recommend.references.REFERENCES`):

* **Rank by task.** Instruction tuning r=16, classification r=8, RL r=8,
  continued pre-training r=256 (``lllf``: CPT needs high ranks and still
  learns less than full fine-tuning; ``lwr``: RL carries about one bit per
  episode, so even rank 1 matches full fine-tuning).
* **Capacity.** The adapter should have at least as many parameters as the
  training (completion) tokens; below that LoRA is capacity-limited and falls
  behind full fine-tuning (``lwr``). The rank is raised, by powers of two up to
  512, until it does. Not applied to RL, whose tokens carry far less information.
* **Alpha and rsLoRA.** Up to r=32: alpha = 2r, a scale of 2 (``defaults``).
  From r=64: rsLoRA's alpha/sqrt(r) scaling (``rslora``: with alpha/r, higher
  ranks stop learning faster) with alpha=16, the same scale of 2 at r=64.
* **MoE experts.** Each fused expert gets its own adapter, so expert weights
  get rank / experts-per-token (at least 1), which keeps the adapter's share of
  expert parameters like the dense layers' (``lwr``).
* **Dropout.** 0.1 up to 13B parameters, 0.05 above (``qlora``); 0 for 100M+
  tokens, CPT and RL (plenty of data, nothing to regularise); 0 whenever fused
  experts are targeted, because peft rejects dropout there (``peft``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftaudit.errors import PeftauditError

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory
    from peftaudit.recommend.targets import AdapterCount, TargetSelection

TASKS: tuple[str, ...] = ("instruct", "cpt", "classification", "rl")

TASK_HELP: dict[str, str] = {
    "instruct": "instruction tuning / chat SFT on prompt-completion pairs",
    "cpt": "continued pre-training on raw domain text",
    "classification": "sequence classification with a new head",
    "rl": "reinforcement learning (RLHF, GRPO, DPO and relatives)",
}

#: The ranks considered, as people use them.
RANKS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BASE_RANK: dict[str, int] = {"instruct": 16, "cpt": 256, "classification": 8, "rl": 8}
RSLORA_FROM_RANK = 64
RSLORA_ALPHA = 16
#: From this many training tokens on, dropout has little left to regularise.
LARGE_DATA_TOKENS = 100_000_000
#: QLoRA's boundary: dropout 0.1 for models up to 13B parameters, 0.05 for 33B and 65B.
LARGE_MODEL_PARAMS = 13_500_000_000


class RankError(PeftauditError):
    """A rank, alpha or dropout that cannot work."""


@dataclass(frozen=True)
class Reason:
    """One step of the reasoning: a stable rule id, what it concluded, and its sources."""

    rule: str
    text: str
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoraHyperparameters:
    """The numbers that go into a LoRA config besides the targets."""

    rank: int
    alpha: int
    dropout: float
    use_rslora: bool
    rank_pattern: tuple[tuple[str, int], ...] = ()
    """Per-target ranks (peft's ``rank_pattern``): regular expressions over the end of a path."""
    alpha_pattern: tuple[tuple[str, int], ...] = ()

    @property
    def scale(self) -> float:
        """What the adapter's output is multiplied by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def rank_patterns(self) -> dict[str, int]:
        return dict(self.rank_pattern)

    def alpha_patterns(self) -> dict[str, int]:
        return dict(self.alpha_pattern)


@dataclass(frozen=True)
class RankChoice:
    """The chosen hyperparameters, why, and what peft creates with them."""

    hyper: LoraHyperparameters
    reasons: tuple[Reason, ...]
    count: AdapterCount


def alpha_for(rank: int, use_rslora: bool | None = None) -> tuple[int, bool]:
    """(alpha, use_rslora) for a rank: alpha = 2r up to r=32, rsLoRA with alpha=16 from r=64.

    ``use_rslora`` forces the scaling; alpha follows it (16 with rsLoRA, 2r without).
    """
    rslora = rank >= RSLORA_FROM_RANK if use_rslora is None else use_rslora
    return (RSLORA_ALPHA if rslora else 2 * rank), rslora


def expert_rank(rank: int, experts_per_token: int) -> int:
    """The rank each fused expert gets: the layer's rank split across the experts a token uses."""
    return max(1, rank // max(1, experts_per_token))


def hyperparameters_at(
    inventory: Inventory,
    selection: TargetSelection,
    rank: int,
    *,
    alpha: int | None = None,
    use_rslora: bool | None = None,
    dropout: float = 0.0,
) -> LoraHyperparameters:
    """The hyperparameters the rules give at ``rank`` (alpha, rsLoRA and expert ranks follow it)."""
    if rank < 1:
        raise RankError(f"rank must be a positive integer, got {rank}")
    rule_alpha, rslora = alpha_for(rank, use_rslora)
    alpha = rule_alpha if alpha is None else alpha
    rank_pattern: list[tuple[str, int]] = []
    alpha_pattern: list[tuple[str, int]] = []
    moe = inventory.moe
    if selection.parameters and moe is not None:
        per_expert = expert_rank(rank, moe.experts_per_token)
        if per_expert != rank:
            for key in _expert_keys(selection.parameters):
                rank_pattern.append((key, per_expert))
                if not rslora:
                    # Standard scaling divides by r: keep each expert's scale equal to the layer's.
                    alpha_pattern.append((key, max(1, round(alpha * per_expert / rank))))
    return LoraHyperparameters(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        use_rslora=rslora,
        rank_pattern=tuple(rank_pattern),
        alpha_pattern=tuple(alpha_pattern),
    )


def choose(
    inventory: Inventory,
    selection: TargetSelection,
    *,
    task: str = "instruct",
    tokens: int | None = None,
    rank: int | None = None,
    alpha: int | None = None,
    dropout: float | None = None,
    use_rslora: bool | None = None,
) -> RankChoice:
    """Rank, alpha, dropout and rsLoRA for ``selection`` by the rules above; explicit values win."""
    from peftaudit.recommend.targets import count_adapters

    if task not in TASKS:
        raise RankError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    if tokens is not None and tokens < 0:
        raise RankError(f"training tokens must be >= 0, got {tokens}")
    reasons: list[Reason] = []
    spec = selection.spec
    experts = bool(selection.parameters)

    def params_at(r: int) -> int:
        hp = hyperparameters_at(inventory, selection, r, use_rslora=use_rslora)
        return count_adapters(inventory, spec, r, rank_pattern=hp.rank_patterns()).lora_params

    if rank is not None:
        chosen = rank
        reasons.append(Reason("rank.given", f"rank {rank} as given"))
    else:
        chosen = BASE_RANK[task]
        reasons.append(_task_reason(task, chosen))
        if tokens and task != "rl":
            chosen = _capacity(chosen, tokens, params_at, reasons)
        elif tokens and task == "rl":
            reasons.append(
                Reason(
                    "rank.capacity",
                    "the capacity rule is not applied to RL: a reward carries about one bit per episode, "
                    "far below one token's worth, so even rank 1 has room",
                    ("lwr",),
                )
            )

    hyper = hyperparameters_at(inventory, selection, chosen, alpha=alpha, use_rslora=use_rslora)
    reasons.append(_alpha_reason(hyper, given=alpha is not None or use_rslora is not None))
    if hyper.rank_pattern:
        per_expert = hyper.rank_pattern[0][1]
        reasons.append(
            Reason(
                "rank.experts",
                f"fused experts get rank {per_expert} each (rank {chosen} / "
                f"{inventory.moe.experts_per_token if inventory.moe else 1} experts per token): every expert "
                "has its own adapter, and this keeps the adapter's share of expert weights like the dense layers'",
                ("lwr",),
            )
        )

    drop, drop_reason = _dropout(inventory, task, tokens, experts, dropout)
    reasons.append(drop_reason)
    hyper = LoraHyperparameters(
        rank=hyper.rank,
        alpha=hyper.alpha,
        dropout=drop,
        use_rslora=hyper.use_rslora,
        rank_pattern=hyper.rank_pattern,
        alpha_pattern=hyper.alpha_pattern,
    )
    count = count_adapters(inventory, spec, hyper.rank, rank_pattern=hyper.rank_patterns(), dropout=drop)
    return RankChoice(hyper=hyper, reasons=tuple(reasons), count=count)


def neighbours(rank: int) -> tuple[int | None, int | None]:
    """The next rank down and up on the usual ladder (``None`` past either end)."""
    lower = [r for r in RANKS if r < rank]
    higher = [r for r in RANKS if r > rank]
    return (lower[-1] if lower else None, higher[0] if higher else None)


# --- rules -------------------------------------------------------------------------------------


def _task_reason(task: str, rank: int) -> Reason:
    if task == "cpt":
        return Reason(
            "rank.task",
            f"continued pre-training starts at rank {rank}: new knowledge needs high-rank updates, and even "
            "rank 256 learns less than full fine-tuning (it also forgets less)",
            ("lllf",),
        )
    if task == "rl":
        return Reason(
            "rank.task",
            f"RL starts at rank {rank}: policy-gradient training learns little per episode and rank 1 already "
            "matches full fine-tuning; rank 8 costs next to nothing and leaves headroom",
            ("lwr",),
        )
    if task == "classification":
        return Reason(
            "rank.task",
            f"classification starts at rank {rank}: LoRA matched full fine-tuning on GLUE at ranks 1 to 8, "
            "and spreading those parameters over more matrices beat raising the rank",
            ("lora",),
        )
    return Reason(
        "rank.task",
        f"instruction tuning starts at rank {rank}: with every linear layer adapted the rank matters little "
        "(QLoRA found r unrelated to quality once all layers are adapted; small ranks learn as fast early on)",
        ("qlora", "lwr"),
    )


def _capacity(start: int, tokens: int, params_at: Callable[[int], int], reasons: list[Reason]) -> int:
    have = params_at(start)
    if have >= tokens:
        reasons.append(
            Reason(
                "rank.capacity",
                f"rank {start} gives {have:,} adapter parameters for {tokens:,} training tokens: "
                "at least one parameter per token, so capacity is not the limit",
                ("lwr",),
            )
        )
        return start
    for r in (r for r in RANKS if r > start):
        count = params_at(r)
        if count >= tokens:
            reasons.append(
                Reason(
                    "rank.capacity",
                    f"raised to rank {r}: rank {start} gives {have:,} adapter parameters for {tokens:,} training "
                    f"tokens, and LoRA falls behind full fine-tuning once the data holds more than its "
                    f"parameters can take in; rank {r} gives {count:,}",
                    ("lwr",),
                )
            )
            return r
    top = RANKS[-1]
    reasons.append(
        Reason(
            "rank.capacity",
            f"even rank {top} gives only {params_at(top):,} adapter parameters for {tokens:,} training tokens: "
            "this run is beyond LoRA's low-regret regime; consider full fine-tuning or fewer tokens. "
            f"Rank {top} is the most this recommends",
            ("lwr", "lllf"),
        )
    )
    return top


def _alpha_reason(hyper: LoraHyperparameters, *, given: bool) -> Reason:
    if given:
        return Reason(
            "alpha.given",
            f"alpha {hyper.alpha}{' with rsLoRA' if hyper.use_rslora else ''} as given: scale {hyper.scale:.3g}",
        )
    if hyper.use_rslora:
        return Reason(
            "alpha.rslora",
            f"rsLoRA with alpha {hyper.alpha}: at rank {hyper.rank} the usual alpha/r scaling shrinks the update "
            f"so far that higher ranks stop helping; alpha/sqrt(r) keeps it at {hyper.scale:.3g} "
            f"(2 at rank {RSLORA_FROM_RANK}, where the two rules meet)",
            ("rslora",),
        )
    return Reason(
        "alpha.default",
        f"alpha {hyper.alpha} = 2 x rank, a scale of 2: LLaMA-Factory's default and TRL's (16, 32); "
        f"rsLoRA only pays from rank {RSLORA_FROM_RANK} up",
        ("defaults", "rslora"),
    )


def _dropout(
    inventory: Inventory, task: str, tokens: int | None, experts: bool, given: float | None
) -> tuple[float, Reason]:
    if given is not None:
        if not 0.0 <= given < 1.0:
            raise RankError(f"dropout must be in [0, 1), got {given}")
        if experts and given > 0:
            raise RankError(
                "peft cannot apply LoRA dropout to fused expert weights (target_parameters): use dropout 0 "
                "or leave the experts out (preset all-linear)"
            )
        return given, Reason("dropout.given", f"dropout {given:g} as given")
    if experts:
        return 0.0, Reason(
            "dropout.experts",
            "dropout 0: fused experts are adapted through target_parameters, and peft's ParamWrapper "
            "rejects any LoRA dropout (one lora_dropout applies to every target)",
            ("peft",),
        )
    if task in ("cpt", "rl") or (tokens is not None and tokens >= LARGE_DATA_TOKENS):
        why = "continued pre-training" if task == "cpt" else "RL" if task == "rl" else f"{tokens:,} training tokens"
        return 0.0, Reason(
            "dropout.data", f"dropout 0: with {why} there is little overfitting for dropout to prevent", ()
        )
    big = inventory.total > LARGE_MODEL_PARAMS
    value = 0.05 if big else 0.1
    return value, Reason(
        "dropout.qlora",
        f"dropout {value:g}: QLoRA used 0.1 for models up to 13B parameters and 0.05 for 33B and 65B "
        f"(this model: {inventory.total / 1e9:.1f}B)",
        ("qlora",),
    )


def _expert_keys(parameters: tuple[str, ...]) -> list[str]:
    """rank_pattern keys for expert parameters: their last two path parts, escaped.

    ``experts\\.gate_up_proj`` and not just ``gate_up_proj``: rank_pattern also
    applies to modules, and a dense layer may be called ``gate_up_proj`` (Phi-3).
    """
    keys: list[str] = []
    for name in parameters:
        parts = name.split(".")
        key = r"\.".join(re.escape(p) for p in parts[-2:]) if len(parts) > 1 else re.escape(name)
        if key not in keys:
            keys.append(key)
    return keys
