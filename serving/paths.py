"""Where the project keeps its run-time state (git-ignored)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def state_dir() -> Path:
    """RC_STATE_DIR, or .run/ in the repository: private PostgreSQL, TorchServe logs and pid files."""
    return Path(os.environ.get("RC_STATE_DIR") or REPO_ROOT / ".run").resolve()
