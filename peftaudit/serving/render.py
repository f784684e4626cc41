"""Showing serving answers: the terms that divide a GPU, the ranking of GPUs, Markdown. Nothing here computes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from peftaudit.units import GIB

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from peftaudit.serving.estimate import ServingEstimate


def _g(n: int) -> str:
    """Bytes as GiB, two decimals (negative: short by that much)."""
    return f"{n / GIB:,.2f}"


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def _engine(e: ServingEstimate) -> str:
    if e.engine == "vllm":
        return f"vLLM ({e.release} accounting)"
    return "transformers generate"


def headline(e: ServingEstimate) -> str:
    """``MODEL on N x GPU (GiB each), served by ENGINE: weights, KV cache``."""
    gpus = f"{e.tensor_parallel} x {e.gpu}" if e.tensor_parallel > 1 else f"one {e.gpu}"
    each = " each" if e.tensor_parallel > 1 else ""
    return (
        f"{e.model} on {gpus} ({_g(e.total_bytes)} GiB{each}), served by {_engine(e)}: "
        f"{e.weights_label} weights, {e.kv_cache_dtype} KV cache"
    )


def settings(e: ServingEstimate) -> str:
    """The engine settings the numbers follow, as vLLM's flags."""
    parts = [f"max_model_len {e.max_model_len:,}"]
    if e.engine == "vllm":
        parts += [
            f"gpu_memory_utilization {e.gpu_memory_utilization:g}",
            f"max_num_seqs {e.max_num_seqs:,}",
            f"max_num_batched_tokens {e.max_num_batched_tokens:,}",
            f"block_size {e.block_size}",
        ]
    if e.tensor_parallel > 1:
        parts.append(f"tensor_parallel_size {e.tensor_parallel}")
    return " · ".join(parts)


def terms(e: ServingEstimate) -> list[tuple[str, str, str]]:
    """(term, GiB, how) rows: the GPU's total down to the KV cache, as the engine takes them."""
    rows: list[tuple[str, str, str]] = [("GPU total", _g(e.total_bytes), "as the driver reports it")]
    if e.engine == "vllm":
        rows.append(("usable", _g(e.requested_bytes), f"x {e.gpu_memory_utilization:g} (--gpu-memory-utilization)"))
    rows.append(("- weights", _g(e.weights_bytes), e.weights_label))
    if e.adapters is not None:
        rows.append(("- LoRA slots", _g(e.lora_bytes), f"{e.adapters.max_loras} x rank {e.adapters.max_lora_rank}"))
    if e.engine == "vllm":
        how = (
            f"profile run: forward {_g(e.forward_bytes)} ({e.max_num_batched_tokens:,} tokens), "
            f"sampler {_g(e.sampler_bytes)} ({e.max_num_seqs:,} sequences)"
        )
        rows.append(("- activation peak", _g(e.activation_bytes), how))
        rows.append(("- non-torch memory", _g(e.non_torch_bytes), "NCCL, cuBLAS, attention buffers"))
        if e.graphs_budgeted and e.cuda_graph_bytes > 0:
            rows.append(("- CUDA graphs", _g(e.cuda_graph_bytes), "estimated at start-up"))
        rows.append(("= KV cache", _g(e.kv_cache_bytes), f"{e.blocks:,} blocks of {e.block_size} tokens"))
        if not e.graphs_budgeted and e.cuda_graph_bytes > 0:
            rows.append(("CUDA graphs", _g(e.cuda_graph_bytes), "captured afterwards, outside the usable share"))
    else:
        rows.append(("- CUDA context", _g(e.non_torch_bytes), "what the CUDA runtime takes first"))
        rows.append(("- prefill", _g(e.activation_bytes), "every prompt at once, then the last logits"))
        rows.append(("= KV cache", _g(e.kv_cache_bytes), "for the sequences' dynamic caches"))
    return rows


def verdict(e: ServingEstimate) -> list[str]:
    """What fits, in sentences."""
    lines = [
        f"KV cache: {_kib(e.kv_bytes_per_token)} per token, {_g(e.sequence_bytes)} GiB per {e.max_model_len:,}-token "
        f"sequence (KV heads per GPU: {e.kv_heads_per_gpu})"
    ]
    if e.engine == "vllm":
        lines.append(f"GPU KV cache size: {e.kv_cache_tokens:,} tokens")
        lines.append(f"Maximum concurrency for {e.max_model_len:,} tokens per request: {e.max_concurrency:.2f}x")
    else:
        lines.append(f"sequences of {e.max_model_len:,} tokens at once: {int(e.max_concurrency):,}")
    if not e.starts:
        lines.append(
            f"does not start: the KV cache cannot hold one {e.max_model_len:,}-token sequence "
            "(lower --context, quantize, or add GPUs)"
        )
    elif e.concurrency is not None:
        if e.fits:
            lines.append(
                f"fits: {e.concurrency:,} sequences of {e.max_model_len:,} tokens, "
                f"{_g(e.headroom_bytes)} GiB of KV cache to spare"
            )
        else:
            lines.append(f"does not fit: {e.concurrency:,} sequences of {e.max_model_len:,} tokens")
        if e.max_context is not None:
            longest = f"{e.max_context:,} tokens" if e.max_context else "none"
            lines.append(f"longest context for {e.concurrency:,} sequences: {longest}")
    else:
        n = e.served_concurrency
        lines.append(f"serves {n:,} sequence{'s' if n != 1 else ''} of {e.max_model_len:,} tokens at once")
    return lines


def adapter_lines(e: ServingEstimate) -> list[str]:
    a = e.adapters
    if a is None:
        return []
    return [
        f"adapters: {a.count} to serve; unmerged {_g(a.slot_bytes)} GiB of slots per GPU "
        f"({a.max_loras} x rank {a.max_lora_rank}), {_g(a.host_bytes)} GiB in host memory "
        f"({a.max_cpu_loras} cached); merged {_g(a.merged_bytes)} GiB ({a.count} full copies of "
        f"{_g(a.merged_bytes // a.count)} GiB per GPU)",
        f"merged copies take more memory than one base with slots from {a.break_even} adapters on",
        *a.notes,
    ]


def estimate_view(e: ServingEstimate, out: Console) -> None:
    """The full answer for one GPU: headline, settings, the terms table, the verdict, adapters, notes."""
    from rich import box
    from rich.table import Table

    out.print(headline(e), markup=False)
    out.print(settings(e), markup=False)
    table = Table(box=box.SIMPLE_HEAD, title="per GPU", title_justify="left")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    table.add_column("how")
    for term, value, how in terms(e):
        table.add_row(term, value, how)
    out.print(table)
    for line in (*verdict(e), *adapter_lines(e), *e.notes):
        out.print(line, markup=False)


def ranking_table(rows: Sequence[ServingEstimate], out: Console) -> None:
    """GPUs ranked for one serving plan: how many, and what each holds."""
    from rich import box
    from rich.table import Table

    if not rows:
        return
    first = rows[0]
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"serving {first.model} at {first.max_model_len:,} tokens ({_engine(first)})",
        title_justify="left",
    )
    for name, justify in (
        ("GPU", "left"),
        ("GPUs", "right"),
        ("weights GiB", "right"),
        ("KV cache GiB", "right"),
        ("KV tokens", "right"),
        ("sequences", "right"),
        ("fits", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for e in rows:
        table.add_row(
            e.gpu,
            str(e.tensor_parallel),
            _g(e.weights_bytes),
            _g(max(0, e.kv_cache_bytes)),
            f"{e.kv_cache_tokens:,}",
            f"{e.served_concurrency:,}" if e.starts else "-",
            "yes" if e.fits else "no",
        )
    out.print(table)


def markdown(e: ServingEstimate) -> str:
    """The one-GPU answer as Markdown: headline, settings, the terms table, the verdict."""
    lines = [f"**{headline(e)}**", "", settings(e), "", "| term | GiB | how |", "|---|---:|---|"]
    lines += [f"| {t} | {v} | {h} |" for t, v, h in terms(e)]
    lines.append("")
    lines += [f"- {line}" for line in (*verdict(e), *adapter_lines(e), *e.notes)]
    return "\n".join(lines) + "\n"


def ranking_markdown(rows: Sequence[ServingEstimate]) -> str:
    """GPUs ranked for one serving plan, as a Markdown table."""
    lines = [
        "| GPU | GPUs | weights GiB | KV cache GiB | KV tokens | sequences | fits |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in rows:
        seqs = f"{e.served_concurrency:,}" if e.starts else "-"
        lines.append(
            f"| {e.gpu} | {e.tensor_parallel} | {_g(e.weights_bytes)} | {_g(max(0, e.kv_cache_bytes))} | "
            f"{e.kv_cache_tokens:,} | {seqs} | {'yes' if e.fits else 'no'} |"
        )
    return "\n".join(lines) + "\n"
