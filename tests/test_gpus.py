"""The GPU catalog against the published figures it was written from.

Expected values are copied from shared/reference/gpus.md (NVIDIA and AMD
datasheets, nvidia-smi totals reported in modal-labs/modal-client PR 2797),
with Lightning's throughput table for FP32.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from peftaudit.errors import PeftauditError
from peftaudit.gpus import catalog
from peftaudit.gpus.catalog import GIB, apply_user_file, bundled_gpus, find_gpu

MIB = 1024**2

# name: (vendor memory GB, usable bytes as observed, bandwidth GB/s, dense BF16 TFLOPS)
PUBLISHED = {
    "H100 SXM": (80, 81_559 * MIB, 3350, 989),
    "A100 40GB": (40, 40_960 * MIB, 1555, 312),
    "L40S": (48, 46_068 * MIB, 864, 362),
    "L4": (24, 23_034 * MIB, 300, 121),
    "A10": (24, 23_028 * MIB, 600, 125),
    "A100 80GB": (80, int(79.3 * GIB), 2039, 312),
    "T4": (16, int(14.6 * GIB), 320, None),
    "RTX 4090": (24, int(23.6 * GIB), 1008, 165),
    "H200 SXM": (141, int(139.8 * GIB), 4800, 989),
    "MI300X": (192, None, 5300, 1307),
}


@pytest.fixture(autouse=True)
def no_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTAUDIT_GPUS_FILE", str(tmp_path / "none.toml"))
    catalog.reset()


def test_every_gpu_of_the_reference_is_there() -> None:
    names = {g.name for g in bundled_gpus()}
    expected = {
        "H100 SXM",
        "H100 PCIe",
        "H100 NVL",
        "H200 SXM",
        "B200",
        "GB200",
        "A100 40GB",
        "A100 80GB",
        "L40S",
        "L4",
        "A10",
        "A10G",
        "T4",
        "V100 32GB",
        "RTX 4090",
        "RTX 3090",
        "RTX 5090",
        "RTX 6000 Ada",
        "MI300X",
        "MI325X",
    }
    assert expected <= names


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_figures(name: str) -> None:
    vendor_gb, usable, bandwidth, bf16 = PUBLISHED[name]
    gpu = find_gpu(name)
    assert gpu.memory_gb == vendor_gb
    if usable is not None:
        assert abs(gpu.usable_bytes - usable) < 0.001 * GIB
    else:
        assert gpu.usable_estimated
    assert gpu.bandwidth_gbs == bandwidth
    assert gpu.dense_tflops("bf16") == bf16


def test_traps_other_catalogs_fall_into() -> None:
    # Dense, not the 2:4-sparse figure spec sheets print.
    assert find_gpu("H100").dense_tflops("bf16") == 989
    # The A10G is not given the A10's datasheet.
    assert find_gpu("A10G").dense_tflops("bf16") is None
    # No BF16 on Turing or Volta.
    assert find_gpu("T4").dense_tflops("bf16") is None and find_gpu("V100").dense_tflops("bf16") is None
    # H100 NVL per card, not per pair.
    assert find_gpu("H100 NVL").memory_gb == 94
    # Usable memory is below the vendor figure read as GiB, never above.
    for gpu in bundled_gpus():
        assert gpu.usable_bytes <= gpu.memory_gb * GIB, gpu.name
        assert 100 <= gpu.bandwidth_gbs <= 10_000, gpu.name  # GB/s, not TB/s or MB/s
        assert gpu.price_per_hour is None, gpu.name  # no price is bundled as fact


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("h100", "H100 SXM"),
        ("RTX4090", "RTX 4090"),
        ("a100", "A100 80GB"),
        ("rtx-6000-ada", "RTX 6000 Ada"),
        ("l40s", "L40S"),
    ],
)
def test_aliases(alias: str, name: str) -> None:
    assert find_gpu(alias).name == name


def test_unknown_gpu_is_a_clear_error() -> None:
    with pytest.raises(PeftauditError, match="unknown GPU 'H1000'"):
        find_gpu("H1000")


def test_user_file_adds_prices_and_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gpus.toml"
    path.write_text(
        '[gpu."H100"]\nprice_per_hour = 2.49\n\n'
        '[gpu."Lab Card"]\nmemory_gb = 48\nusable_gib = 46.5\nbandwidth_gbs = 900\ntflops = { bf16 = 300 }\n'
    )
    monkeypatch.setenv("PEFTAUDIT_GPUS_FILE", str(path))
    catalog.reset()
    h100 = find_gpu("H100 SXM")
    assert h100.price_per_hour == 2.49 and h100.price_source == str(path)
    assert h100.usable_bytes == find_gpu("h100-sxm").usable_bytes  # other figures untouched
    lab = find_gpu("lab card")
    assert lab.usable_bytes == int(46.5 * GIB) and lab.dense_tflops("bf16") == 300 and lab.origin == str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [("[gpu\n", "GPU file"), ('[gpu."X"]\nusable_gib = 4\n', "KeyError"), ('[gpu."X"]\nmemory_gb = -1\n', "positive")],
)
def test_bad_user_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "gpus.toml"
    path.write_text(content)
    with pytest.raises(PeftauditError, match=message):
        apply_user_file({}, path)


def test_bundled_gpus_are_registered_through_the_hook_like_a_plugin_s() -> None:
    import peftaudit.builtin.gpus
    from peftaudit import plugins

    assert "peftaudit.builtin.gpus" in plugins.DEFAULT_PLUGINS
    assert [g.name for g in plugins.gpus()] == [g.name for g in bundled_gpus()]
    assert [g.name for g in catalog.gpus()] == [g.name for g in bundled_gpus()]
    # Without the built-in plugin, the catalog knows no GPU: nothing is loaded behind the hook's back.
    plugins.unregister_plugin(peftaudit.builtin.gpus)
    try:
        assert catalog.gpus() == ()
    finally:
        plugins.reset()
    assert len(catalog.gpus()) == len(bundled_gpus())
