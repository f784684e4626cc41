"""Built-in readiness checks, registered like any plugin's.

Every finding id here is stable: CI configs (``--fail-on``) and ``--skip``
lists name them. Each check says what breaks or wastes memory, which modules,
and the change that fixes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from peftaudit import hookimpl
from peftaudit.architecture import ModuleRole as R
from peftaudit.recommend.checks import CheckContext, FunctionCheck, check
from peftaudit.recommend.findings import Finding
from peftaudit.recommend.targets import (
    AdapterCount,
    all_linear_paths,
    compact_paths,
    fused_expert_parameters,
    name_matches,
    output_head,
    spec_matches,
)

GIB = 1024**3

#: Module classes LoRA wraps besides Linear/Conv1D (peft's dispatchers).
ADAPTABLE_TYPES = frozenset({"Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention"})

#: Role names as a user reads them in a finding.
ROLE_WORDS: dict[str, str] = {
    R.ATTENTION_Q: "attention query",
    R.ATTENTION_K: "attention key",
    R.ATTENTION_V: "attention value",
    R.ATTENTION_O: "attention output",
    R.ATTENTION_QKV: "fused attention qkv",
    R.ATTENTION_OTHER: "attention projection",
    R.MLP_GATE: "MLP gate",
    R.MLP_UP: "MLP up",
    R.MLP_GATE_UP: "MLP gate/up",
    R.MLP_DOWN: "MLP down",
    R.SHARED_EXPERT: "shared expert",
    R.ROUTER: "router",
    R.OUTPUT_HEAD: "output head",
    R.CLASSIFIER: "classifier",
    R.POOLER: "pooler",
}


def _adapted(ctx: CheckContext) -> AdapterCount | None:
    result = ctx.peft_result
    return result if isinstance(result, AdapterCount) else None


def _mode(ctx: CheckContext) -> str:
    return "peft's all-linear" if ctx.targets is None else "the targets"


# --- targets ----------------------------------------------------------------------------------------


@check("lora.fan-in-fan-out", "Conv1D layers (GPT-2) store weights as (in, out) and need fan_in_fan_out")
def fan_in_fan_out(ctx: CheckContext) -> Iterator[Finding]:
    conv = [m.path for m in ctx.inventory.modules if m.is_linear and m.type == "Conv1D"]
    if ctx.targets is None:
        if conv:
            yield Finding(
                "lora.fan-in-fan-out",
                "info",
                f"{len(conv)} Conv1D layers store their weight as (in, out)",
                fix="set fan_in_fan_out=True when targeting them (axolotl: lora_fan_in_fan_out: true); peft "
                "sets it itself with a warning, which LLaMA-Factory and TRL, having no such key, rely on",
                modules=tuple(compact_paths(conv)),
            )
        return
    adapted = _adapted(ctx)
    if adapted is None:
        return
    paths = set(adapted.module_paths)
    hit = [p for p in conv if p in paths]
    if hit and not ctx.targets.fan_in_fan_out:
        yield Finding(
            "lora.fan-in-fan-out",
            "warning",
            f"the targets include {len(hit)} Conv1D layers but fan_in_fan_out is not set",
            fix="set fan_in_fan_out=True (axolotl: lora_fan_in_fan_out: true); otherwise peft overrides it "
            "with a warning and tools that read adapter_config.json before peft fixes it merge transposed",
            modules=tuple(compact_paths(hit)),
        )
    linear = [m.path for m in ctx.inventory.modules if m.path in paths and m.is_linear and m.type != "Conv1D"]
    if ctx.targets.fan_in_fan_out and linear:
        yield Finding(
            "lora.fan-in-fan-out",
            "warning",
            f"fan_in_fan_out=True, but {len(linear)} targets are nn.Linear layers stored as (out, in)",
            fix="set fan_in_fan_out=False (peft resets it with a warning for nn.Linear)",
            modules=tuple(compact_paths(linear)),
        )


@check("targets.match", "target names that match nothing, several kinds of layer, or layers LoRA cannot wrap")
def target_matching(ctx: CheckContext) -> Iterator[Finding]:
    inv = ctx.inventory
    modules = [m for m in inv.modules if m.path]
    if ctx.targets is None:
        yield from _ambiguous_leaf_names(ctx)
        return
    spec = ctx.targets
    regex = spec.pattern is not None and spec.pattern.lower() != "all-linear"
    if regex and not spec.parameters and not any(spec_matches(spec, m.path) for m in modules):
        yield Finding(
            "targets.no-match",
            "error",
            f"target_modules pattern {spec.pattern!r} matches no module: peft raises",
            fix="peft matches a string against the whole module path (re.fullmatch); start it with '.*' "
            "or give a list of names (see `peftaudit report MODEL --tree`)",
        )
    unmatched = [n for n in spec.names if not any(name_matches(n, m.path) for m in modules)]
    if unmatched:
        everything = len(unmatched) == len(spec.names) and not spec.parameters
        yield Finding(
            "targets.no-match",
            "error" if everything else "warning",
            f"target name(s) {', '.join(unmatched)} match no module"
            + (": peft raises" if everything else ": peft ignores them silently"),
            fix="use names from `peftaudit report MODEL --tree` (peft matches the end of a module path), "
            "or `peftaudit recommend MODEL --preset ...` for names known to match",
        )
    params = [p.name for p in inv.parameters]
    lost = [t for t in spec.parameters if not any(name_matches(t, p) for p in params)]
    if lost:
        yield Finding(
            "targets.no-match",
            "error" if len(lost) == len(spec.parameters) else "warning",
            f"target_parameters {', '.join(lost)} match no parameter",
            fix="target_parameters name parameters, not modules: e.g. 'mlp.experts.gate_up_proj'",
        )
    for name in spec.names:
        roles = _roles_matched(ctx, name)
        if len(roles) > 1:
            yield Finding(
                "targets.ambiguous-name",
                "warning",
                f"'{name}' matches {len(roles)} kinds of layer: {', '.join(roles)}",
                fix=f"write the longer names if you meant one of them: {', '.join(_disambiguate(ctx, name))}",
                modules=tuple(compact_paths(m.path for m in modules if name_matches(name, m.path) and m.is_linear)),
            )
    unsupported = [
        m
        for m in modules
        if spec_matches(spec, m.path, linear_paths=all_linear_paths(inv))
        and not m.is_linear
        and m.type not in ADAPTABLE_TYPES
    ]
    if unsupported:
        types = sorted({m.type for m in unsupported})
        yield Finding(
            "targets.unsupported-layer",
            "error",
            f"the targets match {len(unsupported)} {', '.join(types)} module(s) LoRA cannot wrap: peft raises",
            fix="target their Linear children by name, or their weights through target_parameters "
            "(fused experts: 'mlp.experts.gate_up_proj', 'mlp.experts.down_proj')",
            modules=tuple(compact_paths(m.path for m in unsupported)),
        )


def _ambiguous_leaf_names(ctx: CheckContext) -> Iterator[Finding]:
    by_leaf: dict[str, list[str]] = {}
    for m in ctx.inventory.modules:
        if m.path and m.is_linear:
            by_leaf.setdefault(m.path.rpartition(".")[2], []).append(m.path)
    for leaf in sorted(by_leaf):
        roles = _roles_matched(ctx, leaf)
        if len(roles) > 1:
            yield Finding(
                "targets.ambiguous-name",
                "info",
                f"the name '{leaf}' means {len(roles)} kinds of layer here: {', '.join(roles)}",
                fix=f"in target_modules, write {', '.join(_disambiguate(ctx, leaf))} to pick one; "
                f"'{leaf}' alone adapts all of them",
                modules=tuple(compact_paths(by_leaf[leaf])),
            )


def _roles_matched(ctx: CheckContext, name: str) -> list[str]:
    roles: list[str] = []
    for m in ctx.inventory.modules:
        if m.path and m.is_linear and name_matches(name, m.path):
            word = ROLE_WORDS.get(m.role or "", m.role or "unclassified")
            if word not in roles:
                roles.append(word)
    return roles


def _disambiguate(ctx: CheckContext, name: str) -> list[str]:
    """One longer name per role, from the shortest suffix that picks only that role."""
    from peftaudit.recommend.targets import TargetSpec, names_for

    universe = [m.path for m in ctx.inventory.modules if m.path]
    groups: dict[str, list[str]] = {}
    for m in ctx.inventory.modules:
        if m.path and m.is_linear and name_matches(name, m.path):
            groups.setdefault(m.role or "", []).append(m.path)
    out: list[str] = []
    for paths in groups.values():
        names, pattern = names_for(paths, universe)
        spec = TargetSpec(names=names, pattern=pattern)
        out.append(repr(spec.pattern) if spec.pattern else "/".join(f"'{n}'" for n in names))
    return out


# --- mixture of experts ---------------------------------------------------------------------------------------


@check("moe", "fused experts and routers left untrained, and peft re-targeting MoE names")
def moe(ctx: CheckContext) -> Iterator[Finding]:
    inv = ctx.inventory
    experts = fused_expert_parameters(inv)
    adapted = _adapted(ctx)
    adapted_params = set(adapted.parameter_paths) if adapted else set()
    adapted_modules = set(adapted.module_paths) if adapted else set()
    model_type = inv.model_type or inv.architecture
    if experts:
        missing = [p for p in experts if p not in adapted_params]
        numel = sum(p.numel for p in inv.parameters if p.name in set(missing))
        names = _expert_names(experts)
        if missing:
            share = numel / inv.total if inv.total else 0.0
            yield Finding(
                "moe.experts-untrained",
                "warning",
                f"{_mode(ctx)} leave{'s' if ctx.targets is None else ''} the fused experts untrained on "
                f"{model_type}: {numel:,} parameters ({share:.0%} of the model) get no adapter",
                fix=f"add target_parameters={names!r} with lora_dropout=0 (peftaudit recommend --preset "
                "all-linear+experts writes it), or accept attention-only adaptation of the MoE layers",
                modules=tuple(compact_paths(missing)),
                detail="transformers 5 fuses each layer's experts into 3-D parameters that no Linear holds; "
                "peft 0.21 rewrites all-linear to reach them for mixtral and qwen3_moe-style models only",
            )
        elif ctx.targets is None:
            yield Finding(
                "moe.experts-by-conversion",
                "info",
                f"peft's all-linear reaches the fused experts on {model_type} only through its transformers-5 "
                "MoE conversion, which also adds the router and doubles the rank of gate_up_proj",
                fix=f"write target_parameters={names!r} explicitly so the config says what trains "
                "(peftaudit recommend --preset all-linear+experts)",
                modules=tuple(compact_paths(experts)),
            )
    routers = [m for m in inv.modules if m.path and m.role == R.ROUTER and m.own_params and not m.is_linear]
    untouched = [m.path for m in routers if m.path not in adapted_modules and f"{m.path}.weight" not in adapted_params]
    if untouched:
        yield Finding(
            "moe.router-untrained",
            "info",
            f"{len(untouched)} routers stay frozen under {_mode(ctx)}",
            fix="usually right (a frozen router keeps the experts' load balance); to adapt them anyway add "
            f"target_parameters=['{untouched[0].rpartition('.')[2]}.weight']",
            modules=tuple(compact_paths(untouched)),
        )
    if adapted is None:
        return
    # peft re-targets names on MoE models transformers 5 fused: compare plain matching with what peft does.
    plain = [
        m.path
        for m in inv.modules
        if m.path and m.is_linear and spec_matches(ctx.planned, m.path, linear_paths=all_linear_paths(inv))
    ]
    lost = [p for p in plain if p not in adapted_modules]
    if lost:
        leaves = sorted({p.rpartition(".")[2] for p in lost})
        yield Finding(
            "moe.peft-retargets",
            "warning",
            f"peft re-targets the names {', '.join(leaves)} to the fused experts on {model_type}: "
            f"{len(lost)} dense layers named so get no adapter",
            fix="no target_modules spelling avoids this in peft 0.21 (any name ending in those words is "
            "rewritten); leave them out so the config says what trains, or train them in full with "
            "modules_to_save",
            modules=tuple(compact_paths(lost)),
        )


def _expert_names(experts: list[str]) -> list[str]:
    out: list[str] = []
    for name in experts:
        short = ".".join(name.split(".")[-3:])
        if short not in out:
            out.append(short)
    return out


# --- embeddings and tokens -------------------------------------------------------------------------------------


@check("tokens", "tied embeddings saved on one side, added tokens, token ids outside the vocabulary, pad token")
def tokens(ctx: CheckContext) -> Iterator[Finding]:
    inv = ctx.inventory
    facts = ctx.facts
    adapted = _adapted(ctx)
    saved = {s.path for s in adapted.saved} if adapted else set()
    embed = _input_embedding(ctx)
    head = output_head(inv)
    if ctx.targets is not None:
        for group in inv.tied_groups:
            owners = [n.rpartition(".")[0] for n in group.names]
            kept = [o for o in owners if _saved(o, saved)]
            if kept and len(kept) < len(owners):
                other = [o for o in owners if o not in kept]
                yield Finding(
                    "tied.one-side-saved",
                    "warning",
                    f"{', '.join(kept)} is in modules_to_save but its tied twin {', '.join(other)} is not: "
                    "the two drift apart in training and the saved copy doubles the tensor",
                    fix=f"save both ({', '.join(owners)}) with ensure_weight_tying=True, or neither",
                    modules=tuple(owners),
                )
    if ctx.added_tokens > 0:
        needed = [p for p in (embed, head) if p]
        if ctx.targets is None or not all(_saved(p, saved) for p in needed):
            yield Finding(
                "tokens.added",
                "warning",
                f"{ctx.added_tokens} new tokens need trained rows in the input embedding and the output head",
                fix=f"add {', '.join(needed)} to modules_to_save (full copies), or train only the new rows "
                "with trainable_token_indices; a tied head follows the embedding",
                modules=tuple(needed),
            )
    vocab = inv.dims.vocab_size
    if vocab:
        outside = {
            name: value
            for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
            for value in _ids(facts.token_id(name))
            if value >= vocab
        }
        if outside:
            yield Finding(
                "tokens.out-of-vocab",
                "error",
                "token ids outside the vocabulary of "
                + f"{vocab:,}: {', '.join(f'{k}={v}' for k, v in outside.items())}",
                fix="resize the embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and "
                f"train the new rows ({', '.join(p for p in (embed, head) if p)} in modules_to_save)",
                modules=tuple(p for p in (embed, head) if p),
            )
    # Only models that read tokens have a pad token to miss (not a diffusion UNet, say).
    if facts.config and ctx.inventory.dims.vocab_size and facts.token_id("pad_token_id") is None:
        classification = ctx.task == "classification"
        eos = facts.token_id("eos_token_id")
        yield Finding(
            "tokens.no-pad",
            "error" if classification else "warning",
            "the config has no pad_token_id"
            + (": sequence classification cannot find the last token of a padded batch" if classification else ""),
            fix="set tokenizer.pad_token to an existing token (the eos token"
            + (f", id {eos}" if isinstance(eos, int) else "")
            + ", or a reserved one) and model.config.pad_token_id to its id; adding a new pad token forces "
            "training the embeddings",
        )


def _input_embedding(ctx: CheckContext) -> str | None:
    vocab = ctx.inventory.dims.vocab_size
    for p in ctx.inventory.parameters:
        if p.kind == "embedding" and len(p.shape) == 2 and (not vocab or p.shape[0] == vocab):
            return p.module
    return None


def _saved(path: str, saved: set[str]) -> bool:
    return any(path == s or path.startswith(s + ".") for s in saved)


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


# --- the model class -------------------------------------------------------------------------------------------


@check("model", "gradient checkpointing, attention kernels, remote code and layers LoRA cannot adapt")
def model(ctx: CheckContext) -> Iterator[Finding]:
    facts = ctx.facts
    arch = ctx.inventory.architecture
    if facts.supports_gradient_checkpointing is False:
        yield Finding(
            "model.no-gradient-checkpointing",
            "warning",
            f"{arch} does not support gradient checkpointing: every layer's activations stay in memory",
            fix="budget activations for the full depth (shorter sequences or micro-batches), or use a "
            "trainer that wraps layers itself (FSDP activation checkpointing)",
        )
    if facts.supports_sdpa is False and not facts.supports_flash_attention:
        yield Finding(
            "model.eager-attention",
            "warning",
            f"{arch} supports neither SDPA nor flash attention: eager attention keeps the full "
            "sequence x sequence score matrix per head",
            fix="keep sequences short, or port the model to a transformers version with SDPA support",
        )
    elif facts.supports_sdpa is False:
        yield Finding(
            "model.no-sdpa",
            "info",
            f"{arch} does not support SDPA; without a flash-attention kernel it falls back to eager attention",
            fix="load it with a flash-attention implementation (attn_implementation=...), not the default",
        )
    if facts.remote_code:
        yield Finding(
            "model.remote-code",
            "warning",
            f"{ctx.facts.model_id} needs trust_remote_code: training runs code from the model's repository",
            fix="read the repository's modeling code and pin its revision (revision=<commit>) in every "
            "config that loads it",
        )
    yield from _unadaptable(ctx)


def _unadaptable(ctx: CheckContext) -> Iterator[Finding]:
    inv = ctx.inventory
    experts = set(fused_expert_parameters(inv))
    types = {m.path: m for m in inv.modules}
    stuck: dict[str, list[str]] = {}
    numel: dict[str, int] = {}
    for p in inv.parameters:
        owner = types.get(p.module)
        if owner is None or len(p.shape) < 2 or p.is_bias or p.name in experts or p.kind in ("embedding", "norm"):
            continue
        if owner.role == R.ROUTER:  # the moe check speaks for routers
            continue
        if owner.is_linear or owner.type in ADAPTABLE_TYPES:
            continue
        stuck.setdefault(owner.type, []).append(p.name)
        numel[owner.type] = numel.get(owner.type, 0) + p.numel
    for module_type in sorted(stuck):
        names = stuck[module_type]
        yield Finding(
            "lora.unadaptable-layer",
            "info",
            f"{module_type} holds {numel[module_type]:,} parameters in raw weights LoRA cannot wrap as a module",
            fix=f"reach them with target_parameters (e.g. {'.'.join(names[0].split('.')[-2:])!r}) or train "
            "them in full with modules_to_save; target_modules cannot adapt them",
            modules=tuple(compact_paths(names)),
        )


# --- vocabulary --------------------------------------------------------------------------------------------------


@check("vocab", "vocabulary sizes that waste memory: unaligned, or logits larger than the layers")
def vocabulary(ctx: CheckContext) -> Iterator[Finding]:
    inv = ctx.inventory
    vocab = inv.dims.vocab_size
    if not vocab:
        return
    if vocab % 64:
        padded = -(-vocab // 64) * 64
        yield Finding(
            "vocab.unaligned",
            "info",
            f"vocabulary of {vocab:,} is not a multiple of 64: the head's matmul misses the tensor-core tiles",
            fix=f"model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64) (to {padded:,}); "
            "the padding rows are never used and need no training",
        )
    logits = vocab * ctx.seq_len * 4
    if logits >= GIB:
        yield Finding(
            "vocab.logits-memory",
            "warning",
            f"fp32 logits for one {ctx.seq_len:,}-token sequence take {logits / GIB:.1f} GiB "
            f"({vocab:,} x {ctx.seq_len:,} x 4 bytes), and their gradient as much again",
            fix="use a chunked or fused cross-entropy (Liger kernel, Cut Cross-Entropy) and keep the "
            "micro-batch small; transformers upcasts all logits to fp32 for the loss",
        )
    vocab_params = sum(p.numel for p in inv.parameters if p.kind in ("embedding", "output_head") and len(p.shape) == 2)
    if inv.total and vocab_params / inv.total >= 0.2:
        yield Finding(
            "vocab.large-share",
            "info",
            f"embeddings and head are {vocab_params / inv.total:.0%} of the model ({vocab_params:,} parameters)",
            fix="avoid modules_to_save on them (a full trainable copy plus optimizer state); to learn new "
            "tokens use trainable_token_indices",
        )


# --- LoRA settings -------------------------------------------------------------------------------------------------


@check("lora.dropout", "LoRA dropout on fused experts, which peft rejects")
def dropout(ctx: CheckContext) -> Iterator[Finding]:
    if ctx.targets is not None and ctx.targets.parameters and ctx.dropout > 0:
        yield Finding(
            "lora.dropout-experts",
            "error",
            f"lora_dropout={ctx.dropout:g} with target_parameters: peft's ParamWrapper raises",
            fix="set lora_dropout=0 (one dropout applies to every target), or drop target_parameters",
            modules=tuple(ctx.targets.parameters),
        )


BUILTIN_CHECKS: tuple[FunctionCheck, ...] = (
    target_matching,
    fan_in_fan_out,
    moe,
    tokens,
    model,
    vocabulary,
    dropout,
)


@hookimpl
def peftaudit_register_checks(register: Callable[[object], None]) -> None:
    for item in BUILTIN_CHECKS:
        register(item)
