"""`mlflow server` in one process: MLflow's own CLI checks the options, prepares the stores and the
environment, then the uvicorn server it would start as a child takes this process's place (exec).
The CLI process otherwise stays alive only to wait for its child, holding ~0.25 GB at rest.

    python -m ray_apps.mlflow_server --backend-store-uri=sqlite:///... --host=127.0.0.1 --port=5000

Same arguments as `mlflow server`. Where MLflow starts its server another way than the one hook
used here, it runs as `mlflow server` does (child process and all).
"""

from __future__ import annotations

import os
import sys


def _in_place(cmd, *args, extra_env=None, **kwargs):
    """MLflow's `_exec_cmd` for the server command: exec it instead of spawning it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], list(cmd), {**os.environ, **(extra_env or {})})


def main(argv: list[str] | None = None) -> None:
    import mlflow.server
    from mlflow.cli import cli

    if hasattr(mlflow.server, "_exec_cmd"):
        mlflow.server._exec_cmd = _in_place
    cli.main(args=["server", *(sys.argv[1:] if argv is None else argv)], prog_name="mlflow")


if __name__ == "__main__":
    main()
