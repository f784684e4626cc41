"""Hub ids: fetch ``config.json`` only, through huggingface_hub and its cache.

A network that is down or slow never makes a report hang: a two-second probe
decides whether to ask the hub at all, and otherwise only the local cache is
read (``HF_HUB_OFFLINE=1`` skips the probe). When the hub cannot answer but the
bundled catalog knows the id, the catalog answers with a note saying so.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from peftaudit.errors import ConfigError, SourceNotFound
from peftaudit.sources.base import ResolvedModel, SourceOptions
from peftaudit.sources.build import build_from_config, read_config_file, validate_sizes
from peftaudit.sources.catalog import lookup, to_resolved

if TYPE_CHECKING:  # pragma: no cover
    import torch

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PROBE_TIMEOUT_S = 2.0


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

        offline = bool(constants.HF_HUB_OFFLINE) or not _reachable(constants.ENDPOINT)
        try:
            path = hf_hub_download(
                spec,
                "config.json",
                revision=options.revision,
                token=options.token,
                local_files_only=offline,
            )
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
        validate_sizes(config, spec)
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
        return build_from_config(
            resolved.config,
            model_id=resolved.id,
            trust_remote_code=options.trust_remote_code,
            local_dir=resolved.local_dir,
        )


@functools.cache
def _reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub opens within :data:`PROBE_TIMEOUT_S`."""
    url = urlparse(endpoint)
    host = url.hostname
    if not host:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
