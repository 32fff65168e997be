"""Publishing IDR-LMM rounds to the Hub: one model branch per round and the round's dataset config.

``round-<i>`` holds the model of round ``i``; ``main`` always holds the latest round. Each push is
retried with backoff; a push that still fails raises :class:`PublishError` after the local files
are complete (they are written before any upload), so nothing is lost and the next run retries.

The Hub API object is injectable (tests pass a recording fake of ``huggingface_hub.HfApi``). The
token comes from the environment (``HF_TOKEN``) unless given, and is never written anywhere.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["RoundPublisher", "PublishError", "round_branch"]


class PublishError(RuntimeError):
    """A Hub upload failed after all retries (the local result is complete and kept)."""


def round_branch(round_index: int) -> str:
    return f"round-{int(round_index)}"


class RoundPublisher:
    """Pushes each IDR round's model (and optionally its dataset config) to the Hub.

    Args:
        model_repo: the model repo id, e.g. ``"me/product2img"``.
        dataset_repo: the dataset repo id for the exported EPBD configs (optional).
        api: an ``HfApi``-like object; default ``huggingface_hub.HfApi(token=...)``.
        token: Hub token; default the ``HF_TOKEN`` environment variable.
        private: visibility of newly created repos.
        retries / backoff: attempts per upload and the first wait in seconds (doubled each time).
    """

    def __init__(
        self,
        model_repo: str,
        dataset_repo: str | None = None,
        api: Any = None,
        token: str | None = None,
        private: bool | None = None,
        retries: int = 3,
        backoff: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token if token is not None else os.environ.get("HF_TOKEN"))
        self.api = api
        self.model_repo = model_repo
        self.dataset_repo = dataset_repo
        self.private = private
        self.retries = max(1, retries)
        self.backoff = backoff
        self._sleep = sleep
        self._created: set[tuple[str, str]] = set()

    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except Exception as err:  # network, 5xx, rate limits: the Hub client raises many kinds
                if attempt == self.retries:
                    raise PublishError(f"{what} failed after {attempt} attempts: {err.__class__.__name__}: {err}") from err
                wait = self.backoff * 2 ** (attempt - 1)
                logger.warning("%s failed (%s), retrying in %.1fs", what, err.__class__.__name__, wait)
                self._sleep(wait)
        raise AssertionError("unreachable")

    def _ensure_repo(self, repo_id: str, repo_type: str) -> None:
        if (repo_id, repo_type) in self._created:
            return
        self._retry(f"create {repo_type} repo {repo_id}", lambda: self.api.create_repo(
            repo_id, repo_type=repo_type, private=self.private, exist_ok=True))
        self._created.add((repo_id, repo_type))

    def publish_model(self, round_index: int, model_dir: str | os.PathLike, *, update_main: bool = True) -> str:
        """Upload a round's model folder to branch ``round-<i>`` (and to ``main``). Returns the branch."""
        model_dir = Path(model_dir)
        if not (model_dir / "model_index.json").is_file():
            raise PublishError(f"{model_dir} is not a complete pipeline folder (no model_index.json)")
        branch = round_branch(round_index)
        self._ensure_repo(self.model_repo, "model")
        self._retry(f"create branch {branch}", lambda: self.api.create_branch(
            self.model_repo, branch=branch, repo_type="model", exist_ok=True))
        from ..training.model_card import OUTPUT_IGNORE_PATTERNS

        message = f"IDR-LMM round {round_index}"
        for revision, text in [(branch, message)] + ([("main", f"{message} (latest)")] if update_main else []):
            self._retry(f"upload round {round_index} to {revision}", lambda r=revision, t=text: self.api.upload_folder(
                repo_id=self.model_repo, folder_path=str(model_dir), repo_type="model", revision=r,
                commit_message=t, ignore_patterns=OUTPUT_IGNORE_PATTERNS))
        return branch

    def publish_dataset_config(self, exported_dir: str | os.PathLike, config_name: str) -> None:
        """Upload one config of an exported EPBD folder (plus its card) to the dataset repo."""
        if not self.dataset_repo:
            return
        from ..data.export import push_epbd_to_hub

        self._retry(f"push dataset config {config_name}", lambda: push_epbd_to_hub(
            exported_dir, self.dataset_repo, api=self.api, private=self.private, configs=[config_name]))
