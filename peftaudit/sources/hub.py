"""Hub ids: fetch ``config.json`` only, through huggingface_hub and its cache.

A network that is down or slow never makes a report hang. A two-second
connection probe decides whether to ask the hub at all (``HF_HUB_OFFLINE=1``
skips it and reads only the local cache), and all of hub access, probe
included, is bounded in total: :data:`DEFAULT_HUB_TIMEOUT_S` seconds, or
``PEFTAUDIT_HUB_TIMEOUT`` (a positive number of seconds). A hub that accepts
the connection and then stalls is abandoned at the bound (its retries go on in
a daemon thread that cannot delay the report or the exit). huggingface_hub's
own retry messages and progress bars are kept off stderr. When the hub cannot
answer but the bundled catalog knows the id, the catalog answers with a note
saying so; otherwise the answer is a one-line error.
"""

from __future__ import annotations

import functools
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import urlparse

from peftaudit.errors import ConfigError, PeftauditError, SourceNotFound
from peftaudit.sources.base import ResolvedModel, SourceOptions
from peftaudit.sources.build import build_resolved, read_config_file, validate_config
from peftaudit.sources.catalog import lookup, to_resolved

if TYPE_CHECKING:  # pragma: no cover
    import torch

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PROBE_TIMEOUT_S = 2.0
#: The default bound on all of one hub access (probe, metadata, download, retries).
DEFAULT_HUB_TIMEOUT_S = 15.0
HUB_TIMEOUT_ENV = "PEFTAUDIT_HUB_TIMEOUT"

T = TypeVar("T")


def hub_timeout() -> float:
    """The bound on hub access in seconds: ``PEFTAUDIT_HUB_TIMEOUT``, or :data:`DEFAULT_HUB_TIMEOUT_S`."""
    raw = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_HUB_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise PeftauditError(f"{HUB_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


class HubSource:
    """Any other ``org/name``: the hub's config.json (cached by huggingface_hub)."""

    name = "hub"
    priority = 300

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedModel | None:
        if not _REPO_ID.match(spec):
            return None
        # Bound huggingface_hub's own waits before it is imported (it reads these once).
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        bound = hub_timeout()
        deadline = time.monotonic() + bound
        offline = bool(constants.HF_HUB_OFFLINE) or not _reachable(constants.ENDPOINT, min(PROBE_TIMEOUT_S, bound))
        try:
            path = _within(
                deadline - time.monotonic(),
                lambda: hf_hub_download(
                    spec,
                    "config.json",
                    revision=options.revision,
                    token=options.token,
                    local_files_only=offline,
                    etag_timeout=min(constants.HF_HUB_ETAG_TIMEOUT, bound),
                    tqdm_class=_silent_tqdm(),
                ),
            )
        except _TimedOut:
            return self._fallback(spec, options, f"the hub did not answer within {bound:g} s ({HUB_TIMEOUT_ENV})")
        except LocalEntryNotFoundError:
            return self._fallback(spec, options, "the hub is unreachable and its cache has no copy")
        except GatedRepoError as exc:
            raise SourceNotFound(
                f"{spec}: gated on the hub; accept its licence and log in (`hf auth login`) or set HF_TOKEN"
            ) from exc
        except RevisionNotFoundError as exc:
            raise SourceNotFound(f"{spec}: the hub has no revision '{options.revision}'") from exc
        except RepositoryNotFoundError:
            return self._fallback(spec, options, "the hub has no such model (or it is private)")
        except EntryNotFoundError as exc:
            raise ConfigError(f"{spec}: the hub repository has no config.json") from exc
        except (HfHubHTTPError, OSError) as exc:
            return self._fallback(spec, options, f"the hub could not be read ({type(exc).__name__})")
        config = read_config_file(path, spec)
        validate_config(config, spec)
        where = "hub cache" if offline else "hub"
        return ResolvedModel(
            id=spec,
            source=self.name,
            config=config,
            origin=f"{where}: {path}",
            revision=options.revision,
            local_dir=os.path.dirname(path),
        )

    def _fallback(self, spec: str, options: SourceOptions, why: str) -> ResolvedModel | None:
        entry = lookup(spec)
        if entry is not None and options.revision is None:
            return to_resolved(entry, note=f"{why}; using the bundled catalog's config instead")
        if entry is not None:
            raise SourceNotFound(
                f"'{spec}': {why}; the bundled catalog has it, but not at revision '{options.revision}'"
            )
        raise SourceNotFound(
            f"'{spec}': {why}, and it is not in the bundled catalog "
            "(`peftaudit catalog` lists the models that work offline)"
        )

    def build(self, resolved: ResolvedModel, options: SourceOptions) -> torch.nn.Module:
        return build_resolved(resolved, options)


@functools.cache
def _reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds."""
    url = urlparse(endpoint)
    host = url.hostname
    if not host:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _TimedOut(Exception):
    """The hub call did not finish within the bound."""


@dataclass
class _Outcome(Generic[T]):
    value: T | None = None
    error: BaseException | None = None


def _within(seconds: float, call: Callable[[], T]) -> T:
    """``call()``'s result, or :class:`_TimedOut` once ``seconds`` have passed.

    huggingface_hub has no total timeout (each request has its own, and it
    retries), so the call runs in a daemon thread that is abandoned at the
    bound; a daemon thread never delays the interpreter's exit. The hub's
    logging is set to errors only for as long as that thread runs, so its
    retry messages cannot reach stderr even after the report has moved on.
    """
    from huggingface_hub.utils import logging as hub_logging

    outcome: _Outcome[T] = _Outcome()

    def run() -> None:
        previous = hub_logging.get_verbosity()
        hub_logging.set_verbosity_error()
        try:
            outcome.value = call()
        except BaseException as exc:  # handed to the caller's thread, raised there
            outcome.error = exc
        finally:
            hub_logging.set_verbosity(previous)

    worker = threading.Thread(target=run, name="peftaudit-hub", daemon=True)
    worker.start()
    worker.join(max(seconds, 0.0))
    if worker.is_alive():
        raise _TimedOut
    if outcome.error is not None:
        raise outcome.error
    return outcome.value  # type: ignore[return-value]


@functools.cache
def _silent_tqdm() -> type[Any]:
    """A tqdm class that never draws: huggingface_hub's progress bars are not our output."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
