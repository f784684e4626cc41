"""Bad-input rows for the CLI's own plumbing (issue 11, items 1, 7, 9, 10, 11, 15).

Where output goes (``-o`` onto a device, a FIFO, a symlink, ``/dev/fd/1``; a
full stdout), which numbers the flags and GPU files accept, that a regular
expression typed on the command line is checked where it is typed, and that
the help's defaults are the estimator's. Every row runs ``python -m
peftaudit`` in its own process; the GPU plugin row installs a real entry
point on ``PYTHONPATH`` and lets plugin autoloading find it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from bad_input_corpus import Case, run_case, strict_json

from peftaudit.memory.plan import MIB, TrainingPlan

# ---------------------------------------------------------------- item 1: -o writes through, follows links

#: A cheap command whose JSON is long enough to matter (every bundled GPU) and needs no model.
GPUS_JSON = ["gpus", "--json", "-o"]


def _bundled_gpu_names(text: str) -> set[str]:
    return {row["name"] for row in strict_json(text)}


def _char_device(tmp: Path) -> None:
    try:
        os.mknod(tmp / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # the same device as /dev/null
    except PermissionError:
        pytest.skip("creating a character device needs root (CAP_MKNOD)")
    try:
        os.close(os.open(tmp / "null", os.O_WRONLY))
    except PermissionError:
        pytest.skip("the temporary folder is mounted nodev: its device nodes cannot be opened")


def _still_char_device(tmp: Path, _: subprocess.CompletedProcess[str]) -> None:
    mode = os.lstat(tmp / "null").st_mode
    assert stat.S_ISCHR(mode), f"-o replaced the device with {stat.filemode(mode)}"
    assert os.major(os.lstat(tmp / "null").st_rdev) == 1
    assert _leftovers(tmp) == []


def _leftovers(tmp: Path) -> list[str]:
    """Temporary files write_atomic would have left (``.NAME.XXXX.tmp``)."""
    return sorted(p.name for p in tmp.iterdir() if p.name.endswith(".tmp"))


class _FifoReader:
    """Drains a FIFO in a thread. A hard link keeps the FIFO reachable if the path is replaced."""

    def __init__(self) -> None:
        self.data = b""
        self.thread: threading.Thread | None = None

    def setup(self, tmp: Path) -> None:
        os.mkfifo(tmp / "pipe")
        os.link(tmp / "pipe", tmp / "pipe-keep")

        def drain() -> None:
            with open(tmp / "pipe-keep", "rb") as handle:  # blocks until a writer opens the FIFO
                self.data = handle.read()

        self.thread = threading.Thread(target=drain, daemon=True)
        self.thread.start()

    def check(self, tmp: Path, _: subprocess.CompletedProcess[str]) -> None:
        assert self.thread is not None
        self.thread.join(timeout=10)
        if self.thread.is_alive():  # nobody wrote to the FIFO: release the reader, then fail
            os.close(os.open(tmp / "pipe-keep", os.O_WRONLY | os.O_NONBLOCK))
            self.thread.join(timeout=10)
        mode = os.lstat(tmp / "pipe").st_mode
        assert stat.S_ISFIFO(mode), f"-o replaced the FIFO with {stat.filemode(mode)}"
        assert "H100 SXM" in _bundled_gpu_names(self.data.decode())
        assert _leftovers(tmp) == []


def _symlink(tmp: Path) -> None:
    (tmp / "real").mkdir()
    (tmp / "real" / "gpus.json").write_text("old\n")
    (tmp / "link.json").symlink_to("real/gpus.json")  # relative, as `ln -s` makes it


def _link_kept_target_written(tmp: Path, _: subprocess.CompletedProcess[str]) -> None:
    link = tmp / "link.json"
    assert link.is_symlink(), "-o replaced the symlink with a plain file"
    assert os.readlink(link) == "real/gpus.json"
    assert "H100 SXM" in _bundled_gpu_names((tmp / "real" / "gpus.json").read_text())
    assert _leftovers(tmp) == [] and _leftovers(tmp / "real") == []


def _dangling_symlink(tmp: Path) -> None:
    (tmp / "real").mkdir()
    (tmp / "link.json").symlink_to(tmp / "real" / "new.json")  # absolute, and nothing there yet


def _dangling_link_target_created(tmp: Path, _: subprocess.CompletedProcess[str]) -> None:
    assert (tmp / "link.json").is_symlink()
    assert "H100 SXM" in _bundled_gpu_names((tmp / "real" / "new.json").read_text())


def _stdout_has_the_json(_: Path, result: subprocess.CompletedProcess[str]) -> None:
    assert "H100 SXM" in _bundled_gpu_names(result.stdout)


FIFO = _FifoReader()

CASES_OUTPUT = [
    Case(
        "11.1-output-char-device",
        [*GPUS_JSON, "{tmp}/null"],
        exit_code=0,
        setup=_char_device,
        check=_still_char_device,
    ),
    Case("11.1-output-fifo", [*GPUS_JSON, "{tmp}/pipe"], exit_code=0, setup=FIFO.setup, check=FIFO.check),
    Case(
        "11.1-output-symlink",
        [*GPUS_JSON, "{tmp}/link.json"],
        exit_code=0,
        setup=_symlink,
        check=_link_kept_target_written,
    ),
    Case(
        "11.1-output-dangling-symlink",
        [*GPUS_JSON, "{tmp}/link.json"],
        exit_code=0,
        setup=_dangling_symlink,
        check=_dangling_link_target_created,
    ),
    # /dev/fd/1 is our own stdout (here a pipe): written through, as a shell would.
    Case("11.1-output-dev-fd-1", [*GPUS_JSON, "/dev/fd/1"], exit_code=0, check=_stdout_has_the_json),
]


def test_output_to_dev_fd_1_appends_to_a_file_opened_for_append(tmp_path: Path) -> None:
    """``-o /dev/stdout >> log``: the log keeps what it had; replacing it (what rename does) would lose it."""
    log = tmp_path / "log"
    log.write_text("earlier line\n")
    with open(log, "a") as stdout:
        result = subprocess.run(
            [sys.executable, "-m", "peftaudit", *GPUS_JSON, "/dev/fd/1"],
            stdout=stdout,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    head, _, rest = log.read_text().partition("\n")
    assert head == "earlier line"
    assert "H100 SXM" in _bundled_gpu_names(rest)


# ---------------------------------------------------------------- item 7: regexes typed on the command line


CASES_REGEX = [
    Case("11.7-targets-regex-report", ["report", "gpt2", "--targets-regex", "(["], stderr=r"--targets-regex.*\(\["),
    Case("11.7-rank-pattern-report", ["report", "gpt2", "--rank-pattern", "([=8"], stderr=r"--rank-pattern.*\(\["),
    Case(
        "11.7-rank-pattern-fit",
        ["fit", "gpt2", "--gpu", "H100", "--rank-pattern", "([=8"],
        stderr=r"--rank-pattern.*\(\[",
    ),
    # peft matches modules_to_save literally (key.endswith(name)); we built a regex from it.
    Case("11.7-modules-to-save-paren", ["report", "gpt2", "--modules-to-save", "("], stderr=r"modules_to_save.*\("),
]


# ---------------------------------------------------------------- item 9: a full stdout


@pytest.mark.parametrize("argv", [["gpus", "--json"], ["gpus"], ["--version"]], ids=["json", "table", "version"])
def test_11_9_stdout_on_dev_full(argv: list[str], tmp_path: Path) -> None:
    """Output that cannot be written is an environment error: one line, exit 2 (1 means findings here)."""
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "peftaudit", *argv],
            stdout=full,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, "PEFTAUDIT_CACHE_DIR": str(tmp_path / "cache")},
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["peftaudit: error: cannot write to standard output: No space left on device"]


# ---------------------------------------------------------------- item 10: pickle loading stays quiet


def _pickles(protocol: int) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        import torch

        for name in ("before", "after"):
            (tmp / name).mkdir()
            torch.save(
                {"w": torch.arange(6.0).reshape(2, 3)}, tmp / name / "pytorch_model.bin", pickle_protocol=protocol
            )

    return setup


def _stderr_empty(_: Path, result: subprocess.CompletedProcess[str]) -> None:
    assert result.stderr == ""
    assert result.stdout.startswith("PASS: 1 tensors compared, 0 changed")


CASES_PICKLE = [
    # torch's weights_only unpickler loads protocol 3 but warns (UserWarning) about it, three times.
    Case(
        "11.10-pickle-protocol-3-quiet",
        ["verify", "{tmp}/before", "{tmp}/after", "--allow-pickle"],
        exit_code=0,
        setup=_pickles(3),
        check=_stderr_empty,
    ),
    # Protocol 4 it refuses: the refusal and torch's reason, without its paragraph of advice, in one line.
    Case(
        "11.10-pickle-protocol-4-one-line",
        ["verify", "{tmp}/before", "{tmp}/after", "--allow-pickle"],
        stderr=r"before/pytorch_model\.bin: refused by torch\.load\(weights_only=True\): Unsupported operand \d+\n$",
        setup=_pickles(4),
    ),
]


# ---------------------------------------------------------------- item 11: no NaN, no infinity, no negative price

PLAN = ["plan", "gpt2", "--gpu", "H100", "--tokens", "1M", "--json"]


def _gpu_file(text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / "gpus.toml").write_text(text)

    return setup


GPU_FILE = {"PEFTAUDIT_GPUS_FILE": "{tmp}/gpus.toml"}

_PLUGIN = """
import peftaudit
from peftaudit.gpus.catalog import GPU


@peftaudit.hookimpl
def peftaudit_register_gpus(register):
    register(
        GPU(
            name="Lab Card",
            vendor="lab",
            memory_gb=48.0,
            usable_bytes=46 * 2**30,
            usable_source="lab",
            bandwidth_gbs=900.0,
            tflops={"bf16": float("nan")},
            tflops_source="lab",
            origin="nanplug",
        )
    )
"""


def _plugin(tmp: Path) -> None:
    site = tmp / "site"
    (site / "nanplug-1.0.dist-info").mkdir(parents=True)
    (site / "nanplug.py").write_text(_PLUGIN)
    (site / "nanplug-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: nanplug\nVersion: 1.0\n")
    (site / "nanplug-1.0.dist-info" / "entry_points.txt").write_text("[peftaudit]\nnanplug = nanplug\n")


CASES_NUMBERS = [
    Case("11.11-alpha-nan", ["report", "gpt2", "--alpha", "nan", "--json"], stderr=r"--alpha.*nan"),
    Case("11.11-alpha-inf", ["report", "gpt2", "--alpha", "inf", "--json"], stderr=r"--alpha.*inf"),
    Case("11.11-alpha-negative", ["report", "gpt2", "--alpha", "-16", "--json"], stderr=r"--alpha.*-16"),
    Case("11.11-cuda-context-nan", ["report", "gpt2", "--cuda-context", "nan"], stderr=r"--cuda-context.*nan"),
    Case("11.11-cuda-context-inf", ["fit", "gpt2", "--gpu", "H100", "--cuda-context", "inf"], stderr="--cuda-context"),
    Case("11.11-price-nan", [*PLAN, "--price", "nan"], stderr=r"--price.*nan"),
    Case("11.11-price-inf", [*PLAN, "--price", "inf"], stderr=r"--price.*inf"),
    # The GPU file is checked like the flag: the "Cost: -11.69".
    Case(
        "11.11-gpu-file-negative-price",
        PLAN,
        stderr=r"gpus\.toml.*H100.*price_per_hour.*-1",
        setup=_gpu_file('[gpu."H100"]\nprice_per_hour = -1\n'),
        env=GPU_FILE,
    ),
    Case(
        "11.11-gpu-file-nan-price",
        ["gpus", "--json"],
        stderr=r"gpus\.toml.*price_per_hour.*nan",
        setup=_gpu_file('[gpu."H100"]\nprice_per_hour = nan\n'),
        env=GPU_FILE,
    ),
    Case(
        "11.11-gpu-file-inf-memory",
        ["gpus", "--json"],
        stderr=r"Lab Card.*memory_gb.*inf",
        setup=_gpu_file('[gpu."Lab Card"]\nmemory_gb = inf\n'),
        env=GPU_FILE,
    ),
    Case(
        "11.11-gpu-file-inf-usable",
        ["gpus", "--json"],
        stderr=r"Lab Card.*usable_gib.*inf",
        setup=_gpu_file('[gpu."Lab Card"]\nmemory_gb = 48\nusable_gib = inf\n'),
        env=GPU_FILE,
    ),
    Case(
        "11.11-gpu-file-nan-tflops",
        ["gpus", "--json"],
        stderr=r"Lab Card.*tflops\.bf16.*nan",
        setup=_gpu_file('[gpu."Lab Card"]\nmemory_gb = 48\ntflops = { bf16 = nan }\n'),
        env=GPU_FILE,
    ),
    Case(
        "11.11-gpu-file-bool-memory",
        ["gpus", "--json"],
        stderr=r"Lab Card.*memory_gb.*True",
        setup=_gpu_file('[gpu."Lab Card"]\nmemory_gb = true\n'),
        env=GPU_FILE,
    ),
    Case(
        "11.11-plugin-gpu-nan-tflops",
        ["gpus", "--json"],
        stderr=r"Lab Card.*nanplug.*tflops\.bf16.*nan",
        setup=_plugin,
        env={"PYTHONPATH": "{tmp}/site", "PEFTAUDIT_DISABLE_PLUGIN_AUTOLOAD": "0", "PEFTAUDIT_GPUS_FILE": "{tmp}/none"},
    ),
]


# ---------------------------------------------------------------- item 15: the help's defaults are the code's


def _cuda_context_help(_: Path, result: subprocess.CompletedProcess[str]) -> None:
    flat = " ".join(result.stdout.split())
    match = re.search(r"--cuda-context MIB (.*?) --allocator-margin", flat)
    assert match is not None, flat
    # docs/memory.md: "cuda_context_bytes, 1 GiB by default"; the estimator's own field says the same.
    assert TrainingPlan().cuda_context_bytes == 1024 * MIB
    assert "(default 1024)" in match.group(1), match.group(1)


CASES_HELP = [
    Case("11.15-cuda-context-help", ["report", "--help"], exit_code=0, check=_cuda_context_help),
]


CASES = [*CASES_OUTPUT, *CASES_REGEX, *CASES_PICKLE, *CASES_NUMBERS, *CASES_HELP]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    run_case(case, tmp_path)


def test_json_never_holds_nan_even_from_the_library(tmp_path: Path) -> None:
    """The one JSON writer refuses what strict parsers refuse, and says where it was."""
    from peftaudit.render.json import dumps

    assert json.loads(dumps({"a": [1.5, None]})) == {"a": [1.5, None]}
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"\$\.plans\[1\]\.cost"):
            dumps({"plans": [{}, {"cost": bad}]})


@pytest.mark.parametrize("command", ["report", "fit", "plan", "gpus"])
def test_11_15_every_default_in_the_help_is_the_plans(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each ``(default X)`` the memory flags state is TrainingPlan's field, on every command that has them."""
    from peftaudit.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    plan = TrainingPlan()
    expected = {
        "--rank R": f"(default {plan.rank})",
        "--dropout P": f"(default {plan.dropout:g})",
        "--batch-size B": f"(default {plan.batch_size})",
        "--seq-len S": f"(default {plan.seq_len})",
        "--precision {": f"(default {plan.precision})",
        "--double-quant, --no-double-quant": "(default on)" if plan.double_quant else "(default off)",
        "--cuda-context MIB": f"(default {plan.cuda_context_bytes // MIB})",
        "--allocator-margin FRACTION": "(default: learned from allocator replays)"
        if plan.allocator_fraction is None
        else f"(default {plan.allocator_fraction:.2f})",
        "--expandable-segments, --no-expandable-segments": "(default on)"
        if plan.expandable_segments
        else "(default off)",
        "--virtual-tokens N": f"(default {plan.num_virtual_tokens})",
        "--trainable-layers N": f"(default {plan.trainable_layers})",
    }
    group = flat.index("memory estimate:")  # past the usage line
    for flag, default in expected.items():
        start = flat.index(flag, group) + len(flag)
        end = flat.find(" --", start)
        assert default in flat[start:end], (flag, flat[start:end])


def test_11_11_every_json_output_goes_through_the_strict_writer() -> None:
    """No second JSON writer can come back: ``json.dumps`` appears only where nothing is output."""
    import peftaudit

    allowed = {
        "render/json.py",  # the strict writer itself
        "sources/base.py",  # a fingerprint's hash input, never shown
        "cache.py",  # the text the caches' keys are hashed from (canonical_json), never shown
        "pytest_plugin.py",  # a junit user property, for pytest's own report
        "memory/peft_config.py",  # an adapter_config.json value quoted in an error line, as the file spells it
    }
    root = Path(peftaudit.__file__).parent
    writers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"\bjson\.dumps?\(", path.read_text(encoding="utf-8"))
    )
    assert writers and set(writers) <= allowed, writers
