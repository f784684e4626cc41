"""peft's module adapters (AdaLoRA, LoHa, LoKr, VeRA, OFT, BOFT) against peft itself.

Counts and buffers: each method's ``adapt`` against ``get_peft_model(model, XConfig(...))`` on the
same meta-device model, the configs written out here by hand (peft 0.21.2). Refusals: where peft
raises, the method raises a one-line :class:`PlanError`. Memory: the estimate against the trace of
one step (the ``test_memory_trace.py`` tolerance), and MetaMathQA's recorded trainable counts on
Llama-3.2-3B (huggingface/peft ``method_comparison/MetaMathQA/results/<experiment>.json``,
``train_info.num_trainable_params``, at commit 5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40; the runs
used peft 0.19.2.dev0).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
from memory_models import build, reduced_config

from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan, estimate, trace
from peftaudit.memory.adapters import (
    DEFAULT_ADALORA_TARGETS,
    DEFAULT_TARGETS,
    DEFAULT_VERA_TARGETS,
    adjust_oft_parameters,
    factorization,
)
from peftaudit.memory.plan import PlanError
from peftaudit.memory.targets import DEFAULT_LORA_TARGETS, ModuleAdapter
from peftaudit.plugins import memory_methods
from peftaudit.sources.catalog import entries

TOLERANCE = 0.10


@pytest.fixture(autouse=True)
def _boft_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """peft builds BOFT's butterfly factor only with its CUDA extension (``get_fbd_cuda``): the counts
    here are those of a GPU that has it (building needs none of its kernels)."""
    from peft.tuners.boft import layer

    from peftaudit.memory.tracing.standins import _BlockDiagonalStandIn

    monkeypatch.setattr(layer, "_FBD_CUDA", _BlockDiagonalStandIn())


def _peft(model: Any, config_name: str, **kwargs: Any) -> tuple[int, int]:
    """(trainable parameters, bytes of the buffers peft added) of ``get_peft_model``."""
    import peft

    before = sum(b.numel() * b.element_size() for b in model.buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, getattr(peft, config_name)(**kwargs))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == peft_model.get_nb_trainable_parameters()[0]
    after = sum(b.numel() * b.element_size() for b in peft_model.buffers())
    return trainable, after - before


def _ours(inventory: Any, plan: TrainingPlan) -> tuple[int, int]:
    adaptation = memory_methods()[plan.method].adapt(inventory, plan)
    return adaptation.adapter_params, adaptation.buffer_bytes


QV = ["q_proj", "v_proj"]
#: (architecture, plan fields, peft config class, its arguments), each config written as a user would.
CASES: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    (
        "llama",
        {"method": "adalora", "targets": "default", "rank": 12},
        "AdaLoraConfig",
        {"init_r": 12, "total_step": 10},
    ),
    (
        "llama",
        {"method": "adalora", "rank": 4},
        "AdaLoraConfig",
        {"init_r": 4, "target_modules": "all-linear", "total_step": 10},
    ),
    ("gpt2", {"method": "adalora", "targets": "default", "rank": 8}, "AdaLoraConfig", {"init_r": 8, "total_step": 10}),
    ("bert", {"method": "adalora", "targets": "default", "rank": 8}, "AdaLoraConfig", {"init_r": 8, "total_step": 10}),
    ("llama", {"method": "loha", "rank": 4}, "LoHaConfig", {"r": 4, "target_modules": "all-linear"}),
    (
        "llama",
        {"method": "loha", "rank": 8, "targets": ("q_proj", "down_proj"), "rank_pattern": {"down_proj": 2}},
        "LoHaConfig",
        {"r": 8, "target_modules": ["q_proj", "down_proj"], "rank_pattern": {"down_proj": 2}},
    ),
    ("bert", {"method": "loha", "targets": "default", "rank": 8}, "LoHaConfig", {"r": 8}),
    ("llama", {"method": "lokr", "rank": 8}, "LoKrConfig", {"r": 8, "target_modules": "all-linear"}),
    (
        "llama",
        {"method": "lokr", "rank": 4, "lokr_factor": 4, "lokr_decompose_both": True},
        "LoKrConfig",
        {"r": 4, "target_modules": "all-linear", "decompose_factor": 4, "decompose_both": True},
    ),
    (
        "llama",
        {"method": "lokr", "rank": 1, "lokr_decompose_both": True},
        "LoKrConfig",
        {"r": 1, "target_modules": "all-linear", "decompose_both": True},
    ),
    ("mixtral", {"method": "lokr", "rank": 8}, "LoKrConfig", {"r": 8, "target_modules": "all-linear"}),
    ("llama", {"method": "vera", "targets": "default", "rank": 256}, "VeraConfig", {}),
    ("llama", {"method": "vera", "rank": 8}, "VeraConfig", {"r": 8, "target_modules": "all-linear"}),
    (
        "llama",
        {"method": "vera", "rank": 8, "adapter_dtype": "auto"},
        "VeraConfig",
        {"r": 8, "target_modules": "all-linear"},
    ),
    ("gpt2", {"method": "vera", "targets": "default", "rank": 16}, "VeraConfig", {"r": 16}),
    (
        "bert",
        {"method": "vera", "targets": ("query", "value"), "rank": 8, "layers_to_transform": (0,)},
        "VeraConfig",
        {"r": 8, "target_modules": ["query", "value"], "layers_to_transform": [0]},
    ),
    ("llama", {"method": "oft"}, "OFTConfig", {"target_modules": "all-linear"}),
    (
        "llama",
        {"method": "oft", "oft_block_size": 48},
        "OFTConfig",
        {"oft_block_size": 48, "target_modules": "all-linear"},
    ),
    (
        "llama",
        {"method": "oft", "oft_blocks": 6, "block_share": True},
        "OFTConfig",
        {"r": 6, "oft_block_size": 0, "block_share": True, "target_modules": "all-linear"},
    ),
    (
        "llama",
        {"method": "oft", "targets": ("q_proj", "embed_tokens"), "oft_blocks": 4},
        "OFTConfig",
        {"r": 4, "oft_block_size": 0, "target_modules": ["q_proj", "embed_tokens"]},
    ),
    (
        "bert",
        {"method": "oft", "layers_to_transform": (1,)},
        "OFTConfig",
        {"target_modules": "all-linear", "layers_to_transform": [1]},
    ),
    ("llama", {"method": "boft", "targets": "default"}, "BOFTConfig", {"boft_block_size": 4}),
    (
        "llama",
        {"method": "boft", "boft_butterfly": 2},
        "BOFTConfig",
        {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "target_modules": "all-linear"},
    ),
    (
        "llama",
        {"method": "boft", "targets": ("q_proj", "v_proj"), "boft_blocks": 8, "boft_butterfly": 3},
        "BOFTConfig",
        {"boft_block_num": 8, "boft_block_size": 0, "boft_n_butterfly_factor": 3, "target_modules": QV},
    ),
    ("qwen2_moe", {"method": "boft"}, "BOFTConfig", {"boft_block_size": 4, "target_modules": "all-linear"}),
    (
        "llama",
        {"method": "oft", "targets": ("q_proj",), "modules_to_save": ("lm_head",), "lora_bias": "all"},
        "OFTConfig",
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "bias": "all"},
    ),
]


@pytest.mark.parametrize(
    ("arch", "fields", "config", "kwargs"), CASES, ids=[f"{c[1]['method']}-{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_counts_and_buffers_equal_peft(
    inventory_of: Any, arch: str, fields: dict[str, Any], config: str, kwargs: dict[str, Any]
) -> None:
    plan = TrainingPlan(**{"targets": "all-linear", **fields})
    plan.validate()
    autocast = plan.adapter_dtype != "auto"
    model = build(arch)
    theirs = _peft_with(model, config, autocast, **kwargs)
    assert _ours(inventory_of(arch), plan) == theirs


def _peft_with(model: Any, config: str, autocast: bool, **kwargs: Any) -> tuple[int, int]:
    if autocast:
        return _peft(model, config, **kwargs)
    import peft

    before = sum(b.numel() * b.element_size() for b in model.buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, getattr(peft, config)(**kwargs), autocast_adapter_dtype=False)
    after = sum(b.numel() * b.element_size() for b in peft_model.buffers())
    return peft_model.get_nb_trainable_parameters()[0], after - before


#: Plans peft refuses to build (it raises), with the config peft gets.
REFUSED: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    ("gpt2", {"method": "loha", "targets": "default"}, "LoHaConfig", {}),  # Conv1D: LyCORIS wraps nn.Linear
    ("gpt2", {"method": "oft", "targets": ("c_attn",)}, "OFTConfig", {"target_modules": ["c_attn"]}),
    ("llama", {"method": "vera", "targets": ("embed_tokens",)}, "VeraConfig", {"target_modules": ["embed_tokens"]}),
    ("llama", {"method": "lokr", "targets": ("mlp",)}, "LoKrConfig", {"target_modules": ["mlp"]}),
    ("llama", {"method": "boft", "boft_block_size": 5}, "BOFTConfig", {"boft_block_size": 5, "target_modules": QV}),
    (
        "llama",
        {"method": "boft", "boft_block_size": 128, "boft_butterfly": 3},
        "BOFTConfig",
        {"boft_block_size": 128, "boft_n_butterfly_factor": 3, "target_modules": QV},
    ),
    ("mistral", {"method": "adalora", "targets": "default"}, "AdaLoraConfig", {"total_step": 10}),
    (
        "llama",
        {"method": "adalora", "targets": "all-linear", "layers_to_transform": (0,)},
        "AdaLoraConfig",
        {"target_modules": "all-linear", "layers_to_transform": [0], "total_step": 10},
    ),
    (
        "llama",
        {"method": "adalora", "targets": ("nothing",)},
        "AdaLoraConfig",
        {"target_modules": ["nothing"], "total_step": 10},
    ),
]


@pytest.mark.parametrize(
    ("arch", "fields", "config", "kwargs"), REFUSED, ids=[f"{c[1]['method']}-{c[0]}" for c in REFUSED]
)
def test_what_peft_refuses_is_refused(
    inventory_of: Any, arch: str, fields: dict[str, Any], config: str, kwargs: dict[str, Any]
) -> None:
    plan = TrainingPlan(**{"targets": QV, **fields})
    with pytest.raises((TypeError, ValueError)):
        _peft(build(arch), config, **kwargs)
    with pytest.raises(PlanError) as error:
        memory_methods()[plan.method].adapt(inventory_of(arch), plan)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "vera", "exclude": ("k_proj",)}, "exclude_modules"),
        ({"method": "oft", "rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"method": "loha", "lora_bias": "all"}, "bias"),
        ({"method": "adalora", "target_parameters": ("mlp.gate_proj.weight",)}, "target_parameters"),
    ],
)
def test_fields_the_peft_config_lacks_are_refused(inventory_of: Any, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        memory_methods()[fields["method"]].adapt(inventory_of("llama"), TrainingPlan(**{"targets": QV, **fields}))


def test_an_option_boft_lacks_is_refused_by_the_plan() -> None:
    with pytest.raises(PlanError, match="block_share applies to oft, not boft"):
        TrainingPlan(method="boft", block_share=True).validate()


def test_shape_rules_are_peft_s() -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization
    from peft.tuners.oft.layer import OFTLayer

    for dim in (1, 7, 64, 127, 128, 688, 3072, 8192, 11008):
        for factor in (-1, 2, 4, 8, 16, 100):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
        for params in (1, 3, 5, 16, 32, 48, 100, 5000, 20000):
            assert adjust_oft_parameters(dim, params) == OFTLayer.adjust_oft_parameters(None, dim, params)  # type: ignore[arg-type]


def test_default_targets_are_peft_s() -> None:
    from peft.utils import constants

    mappings = {
        "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING": DEFAULT_ADALORA_TARGETS,
        "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING": DEFAULT_VERA_TARGETS,
        "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING": DEFAULT_LORA_TARGETS,
        "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING": DEFAULT_LORA_TARGETS,
        "TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING": DEFAULT_LORA_TARGETS,
        "TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING": DEFAULT_LORA_TARGETS,
    }
    for name, ours in mappings.items():
        theirs = getattr(constants, name)
        for model_type in DEFAULT_LORA_TARGETS:
            if model_type in ours:
                assert list(ours[model_type]) == list(theirs[model_type]), (name, model_type)
            else:
                assert model_type not in theirs, (name, model_type)


# --- MetaMathQA's recorded counts (module docstring) ------------------------------------------

METAMATHQA: list[tuple[str, dict[str, Any], int]] = [
    # experiment, plan, recorded num_trainable_params
    ("adalora--llama-3.2-3B-rank32", {"method": "adalora", "rank": 64, "stack": {"peft": "0.19"}}, 18_353_664),
    ("loha--llama-3.2-3B-rank32", {"method": "loha", "rank": 32, "targets": QV}, 18_350_080),
    (
        "lokr--llama-3.2-3B-rank32-factor4-lr0.003",
        {"method": "lokr", "rank": 32, "lokr_factor": 4, "targets": QV},
        2_294_656,
    ),
    ("vera--llama-3.2-3B-default", {"method": "vera", "rank": 256}, 129_024),
    ("oft--llama-3.2-3B-rank32", {"method": "oft", "oft_blocks": 32, "targets": QV}, 8_171_520),
    ("boft--llama-3.2-3B-default", {"method": "boft"}, 802_816),
]


@pytest.fixture(scope="module")
def llama_3b() -> Any:
    from peftaudit.sources.build import build_from_config
    from peftaudit.sources.catalog import entries

    entry = next(e for e in entries() if e.id == "meta-llama/Llama-3.2-3B")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return take_inventory(build_from_config(dict(entry.config), model_id=entry.id))


@pytest.mark.parametrize(("experiment", "fields", "recorded"), METAMATHQA, ids=[m[0] for m in METAMATHQA])
def test_metamathqa_recorded_counts(llama_3b: Any, experiment: str, fields: dict[str, Any], recorded: int) -> None:
    plan = TrainingPlan(**{"targets": "default", **fields})
    assert memory_methods()[plan.method].adapt(llama_3b, plan).adapter_params == recorded


def test_adalora_ranknum_trains_from_peft_0_21(llama_3b: Any) -> None:
    # peft 0.21 trains ranknum (one per adapted module: q and v of 28 layers); 0.19 kept it frozen.
    from peftaudit.memory.stack_rules import active_rules

    now = TrainingPlan(method="adalora", rank=64, targets="default")
    before = now.with_(stack={"peft": "0.19"})
    adapt = memory_methods()["adalora"].adapt
    assert adapt(llama_3b, now).adapter_params - adapt(llama_3b, before).adapter_params == 56
    assert active_rules(llama_3b, before) == ("adalora-ranknum-frozen",)
    assert active_rules(llama_3b, now.with_(stack={"peft": "0.21"})) == ()


def test_bdlora_block_diagonal_storage() -> None:
    # MetaMathQA lora--llama-3.2-3B-rank14-target-mlp-bdlora: r=14, nblocks 2, gate/up with a
    # block-diagonal lora_B, down with a block-diagonal lora_A; 28 layers of 3072 -> 8192 -> 3072.
    per_layer = [
        ModuleAdapter("gate_proj", "lora", 14, 3072, 8192, b_blocks=2),
        ModuleAdapter("up_proj", "lora", 14, 3072, 8192, b_blocks=2),
        ModuleAdapter("down_proj", "lora", 14, 8192, 3072, a_blocks=2),
    ]
    assert 28 * sum(a.params for a in per_layer) == 8_429_568
    assert per_layer[0].tensors() == ((14, 3072), (8192, 7))  # BlockDiagonalLinear(r, out).weight
    assert per_layer[2].tensors() == ((14, 4096), (3072, 14))


def test_mica_freezes_lora_b() -> None:
    # MetaMathQA lora--llama-3.2-3B-rank32-mica: only lora_A trains (q and v, 28 layers): 5,505,024.
    q = ModuleAdapter("q_proj", "lora", 32, 3072, 3072, train_b=False)
    v = ModuleAdapter("v_proj", "lora", 32, 3072, 1024, train_b=False)
    assert 28 * (q.params + v.params) == 5_505_024
    assert q.frozen_tensors() == ((3072, 32),)


# --- the estimate against the trace ---------------------------------------------------------

BASE = {"seq_len": 128, "batch_size": 2, "rank": 8}
FAST_TRACED = ["loha", "vera"]


def _compare(inventory_of: Any, arch: str, **fields: Any) -> None:
    plan = TrainingPlan(**{**BASE, **fields})
    analytic = estimate(inventory_of(arch), plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(build(arch), plan)
    assert traced.source == "trace"
    assert analytic.trainable_params == traced.trainable_params
    err = analytic.allocated_bytes / traced.allocated_bytes - 1.0
    assert abs(err) <= TOLERANCE, (err, analytic.components, traced.components)


@pytest.mark.parametrize("method", FAST_TRACED)
def test_estimate_matches_trace(inventory_of: Any, method: str) -> None:
    _compare(inventory_of, "llama", method=method, targets="all-linear")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "ckpt"),
    [("adalora", False), ("lokr", False), ("oft", False), ("boft", False), ("loha", True), ("oft", True)],
)
def test_estimate_matches_trace_slow(inventory_of: Any, method: str, ckpt: bool) -> None:
    # The trace runs no AdaLoRA allocator (transformers' Trainer never calls update_and_allocate):
    # compared without it; test_adalora_allocator_equals_peft_s checks what it adds.
    fields: dict[str, Any] = {"boft_butterfly": 2} if method == "boft" else {}
    if method == "adalora":
        fields["adalora_allocator"] = False
    _compare(inventory_of, "llama", method=method, targets="all-linear", gradient_checkpointing=ckpt, **fields)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "method"), [("gpt2", "adalora"), ("gpt2", "vera"), ("bert", "oft")])
def test_estimate_matches_trace_other_architectures(inventory_of: Any, arch: str, method: str) -> None:
    allocator = {"adalora_allocator": False} if method == "adalora" else {}
    _compare(inventory_of, arch, method=method, targets="all-linear", **allocator)


def test_adalora_allocator_equals_peft_s(inventory_of: Any) -> None:
    # One real step of a tiny AdaLoRA model on the CPU, then peft's RankAllocator.update_ipt: its
    # ipt, exp_avg_ipt and exp_avg_unc statistics are what the estimate counts as the allocator.
    import peft
    import torch
    import transformers

    from peftaudit.memory.analytic.estimate import _prepare

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(config), peft.AdaLoraConfig(init_r=6, target_modules="all-linear", total_step=10)
    )
    ids = torch.randint(0, 128, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    allocator = model.base_model.rankallocator
    allocator.update_ipt(model)
    theirs = sum(
        t.numel() * t.element_size()
        for d in (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc)
        for t in d.values()
    )

    inventory = take_inventory(transformers.LlamaForCausalLM(config))
    plan = TrainingPlan(method="adalora", targets="all-linear", rank=6)
    on = _prepare(inventory, plan, "auto").static
    off = _prepare(inventory, plan.with_(adalora_allocator=False), "auto").static
    assert on.rank_allocator == theirs
    assert on.optimizer_states - off.optimizer_states == theirs
    assert off.rank_allocator == 0


# --- the bundled catalog ------------------------------------------------------------------------

_CONFIGS = {
    "adalora": ("AdaLoraConfig", {"init_r": 8, "total_step": 10}),
    "loha": ("LoHaConfig", {"r": 8}),
    "lokr": ("LoKrConfig", {"r": 8}),
    "vera": ("VeraConfig", {"r": 8}),
    "oft": ("OFTConfig", {"oft_block_size": 32}),
    "boft": ("BOFTConfig", {"boft_block_size": 4}),
}
CATALOG = sorted(e.id for e in entries())


@pytest.mark.slow
@pytest.mark.parametrize("model_id", CATALOG)
def test_catalog_counts_equal_peft(model_id: str) -> None:
    """Every bundled catalog model, cut to two layers per stack where its config says its depth (the
    rules are per module; the depth only repeats them): peft's default targets where it has them for
    the family, else every linear layer. BOFT is left out where its in x in permutations would take
    over 1 GiB of CPU memory (multimodal models whose text config keeps its full depth)."""
    from peftaudit.sources.build import build_from_config

    entry = next(e for e in entries() if e.id == model_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_from_config(reduced_config(dict(entry.config), 2), model_id=entry.id)
    inventory = take_inventory(model)
    for method, (config, kwargs) in _CONFIGS.items():
        default = (inventory.model_type or "") in DEFAULT_TARGETS[method]
        plan = TrainingPlan(method=method, rank=8, targets="default" if default else "all-linear")
        arguments = kwargs if default else {**kwargs, "target_modules": "all-linear"}
        if method == "boft" and _boft_permutations(inventory, plan) > 2**30:
            continue  # peft would fill that many bytes of permutation matrices on the CPU
        try:
            theirs: tuple[int, int] | None = _peft(copy.deepcopy(model), config, **arguments)
        except (TypeError, ValueError):
            theirs = None
        if theirs is None:
            with pytest.raises(PlanError):
                _ours(inventory, plan)
        else:
            assert _ours(inventory, plan) == theirs, (model_id, method)


def _boft_permutations(inventory: Any, plan: TrainingPlan) -> int:
    try:
        return memory_methods()["boft"].adapt(inventory, plan).buffer_bytes
    except PlanError:
        return 0
