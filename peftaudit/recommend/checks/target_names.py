"""Target names: names and patterns that match nothing, several kinds of layer, or layers LoRA cannot wrap."""

from __future__ import annotations

from collections.abc import Iterator

from peftaudit.architecture import ModuleRole as R
from peftaudit.matching import all_linear, name_matches
from peftaudit.recommend.checks import CheckContext, check
from peftaudit.recommend.checks.lora import ADAPTABLE_TYPES
from peftaudit.recommend.findings import Finding
from peftaudit.recommend.targets import compact_paths, spec_matches

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
    linear = frozenset(all_linear(inv))  # once, not once per module
    unsupported = [
        m
        for m in modules
        if spec_matches(spec, m.path, linear_paths=linear) and not m.is_linear and m.type not in ADAPTABLE_TYPES
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
