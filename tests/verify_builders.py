"""Real checkpoints for the verifier's bad-input rows: peft adapters, merges, hub cache layouts.

Everything here is built by the real libraries: the base model is a tiny
random-init Llama from transformers (tests/tiny.py), the adapter comes from
peft's ``get_peft_model`` + ``save_pretrained`` and the merged model from
``merge_and_unload``; the hub cache layout is written by huggingface_hub's own
``hf_hub_download`` talking to :class:`LocalHub`, an HTTP server on 127.0.0.1
standing in for the Hub. Builds are cached per process and copied, so a dozen
rows cost one build.
"""

from __future__ import annotations

import atexit
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_BUILT: dict[str, Path] = {}
_WORKSPACE: list[Path] = []


def _workspace() -> Path:
    if not _WORKSPACE:
        _WORKSPACE.append(Path(tempfile.mkdtemp(prefix="peftaudit-builders-")))
        atexit.register(shutil.rmtree, _WORKSPACE[0], ignore_errors=True)
    return _WORKSPACE[0]


def lora_checkpoints(folder: Path, *, seed: int = 0, **config: Any) -> tuple[Path, Path, Path]:
    """``folder``/base, /adapter and /merged: a tiny Llama, a peft LoRA adapter on it, and its merge.

    ``config`` goes to ``peft.LoraConfig`` (default: r=4 on q_proj and v_proj,
    peft's default lora_alpha 8). ``init_lora_weights=False`` gives lora_B
    random values (peft's documented option), so the merge changes every
    target without a training loop. The base model is the same for every
    call; ``seed`` draws other adapter weights.
    """
    options = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **config}
    key = json.dumps([seed, options], sort_keys=True)
    if key not in _BUILT:
        built = _workspace() / f"lora-{len(_BUILT)}"
        _build_lora(built, options, seed)
        _BUILT[key] = built
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("base", "adapter", "merged"):
        shutil.copytree(_BUILT[key] / part, folder / part)
    return folder / "base", folder / "adapter", folder / "merged"


def _build_lora(where: Path, options: Mapping[str, Any], seed: int) -> None:
    import peft
    import torch
    from tiny import TINY
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in TINY["llama"].items() if k != "architectures"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec)).eval()
    model.save_pretrained(where / "base")
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**options))
    wrapped.save_pretrained(where / "adapter")
    wrapped.merge_and_unload().save_pretrained(where / "merged")


def scale_merge(base: Path, merged: Path, factor: float) -> list[str]:
    """Rewrite ``merged`` so every changed tensor differs from ``base`` by ``factor`` times its delta.

    Returns the names of the tensors rewritten (the merge's targets).
    """
    from safetensors.torch import load_file, save_file

    original = load_file(base / "model.safetensors")
    state = load_file(merged / "model.safetensors")
    changed = sorted(name for name, tensor in state.items() if not tensor.equal(original[name]))
    for name in changed:
        state[name] = original[name] + factor * (state[name] - original[name])
    save_file(state, merged / "model.safetensors", metadata={"format": "pt"})
    return changed


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Load a JSON object, let ``edit`` change it in place, write it back."""
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def sharded_checkpoint(folder: Path, shards: int = 2) -> Path:
    """``folder`` with a real sharded checkpoint, at least ``shards`` files, from transformers' ``save_pretrained``."""
    import torch
    from tiny import TINY
    from transformers import AutoConfig, AutoModelForCausalLM

    key = f"sharded-{shards}"
    if key not in _BUILT:
        built = _workspace() / key
        spec = {k: v for k, v in TINY["llama"].items() if k != "architectures"}
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec))
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(built, max_shard_size=total // shards + 1)
        assert len(list(built.glob("model-*.safetensors"))) >= shards, "transformers wrote fewer shards"
        _BUILT[key] = built
    shutil.copytree(_BUILT[key], folder)
    return folder


class LocalHub:
    """An HTTP server on 127.0.0.1 that answers huggingface_hub's file requests like the Hub.

    It serves ``HEAD``/``GET /{repo}/resolve/{revision}/{filename}`` with the
    headers the client reads (``X-Repo-Commit``, ``X-Linked-Etag``,
    ``X-Linked-Size``, ``ETag``), for files held in memory.
    """

    def __init__(self, repo: str, files: Mapping[str, bytes], commit: str) -> None:
        self.repo, self.files, self.commit = repo, dict(files), commit
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, *, body: bool) -> None:
                prefix = f"/{hub.repo}/resolve/"
                name = self.path.split("?", 1)[0].removeprefix(prefix).partition("/")[2]
                data = hub.files.get(name) if self.path.startswith(prefix) else None
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = hashlib.sha256(data).hexdigest()
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[LocalHub]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()


#: The commit the local hub reports: any 40 hex digits.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_download(cache: Path, repo: str, source: Path) -> Path:
    """Download every file of ``source`` into the hub cache ``cache`` with huggingface_hub itself.

    Returns the snapshot folder (``cache/models--org--name/snapshots/COMMIT``),
    whose files are symlinks into ``../../blobs/`` exactly as on a user's machine.
    The download runs in a child process: this test process keeps HF_HUB_OFFLINE=1.
    """
    files = {str(p.relative_to(source)): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
    script = (
        "import sys\nfrom huggingface_hub import hf_hub_download\n"
        "for name in sys.argv[3:]:\n"
        "    hf_hub_download(sys.argv[1], name, cache_dir=sys.argv[2])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with LocalHub(repo, files, COMMIT).running() as hub:
        env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        subprocess.run(
            [sys.executable, "-c", script, repo, str(cache), *files],
            check=True,
            capture_output=True,
            env=env,
            timeout=120,
        )
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
