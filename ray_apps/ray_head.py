"""`ray start` for the local head, with what it starts at rest cut to what the platform uses.

    python -m ray_apps.ray_head --dashboard-modules=JobHead,ServeHead,ReportHead --no-client-server -- start --head ...

Ray's own CLI runs in this process, with two changes to what it starts:

- the dashboard loads only the modules named. Ray starts every module it has, each a process of
  its own (~90 MB RSS; the Serve module's ~0.2 GB). The dashboard takes `--modules-to-load`, but
  `ray start` never passes it: it is added to the dashboard's command line here, where Ray builds it;
- with --no-client-server, no Ray Client server (`ray://`, ~90 MB). `ray start` always starts one
  when Ray Client is installed (port 0 is refused).

Nothing else differs: Ray's own checks, processes and session. Worker nodes start no dashboard and
no client server, so they are started by Ray's plain CLI.
"""

from __future__ import annotations

import argparse
import sys


def patch_ray_start(dashboard_modules: list[str] | None, client_server: bool) -> None:
    """Change what Ray's `ray start` starts in this process (see the module's docstring)."""
    from ray._private import node, ray_constants, services

    if dashboard_modules is not None:
        start_process = services.start_ray_process

        def start_ray_process(command, process_type, *args, **kwargs):
            if process_type == ray_constants.PROCESS_TYPE_DASHBOARD:
                command = [*command, f"--modules-to-load={','.join(dashboard_modules)}"]
            return start_process(command, process_type, *args, **kwargs)

        services.start_ray_process = start_ray_process
    if not client_server:
        node.Node.start_ray_client_server = lambda self: None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_apps.ray_head", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dashboard-modules", default=None,
                        help="comma-separated dashboard modules to load (default: all of Ray's)")
    parser.add_argument("--no-client-server", action="store_true", help="start no Ray Client server")
    parser.add_argument("ray_args", nargs=argparse.REMAINDER, help="-- then `ray`'s own arguments")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    ray_args = args.ray_args[1:] if args.ray_args[:1] == ["--"] else args.ray_args
    modules = [m for m in (args.dashboard_modules or "").split(",") if m] or None
    patch_ray_start(modules, client_server=not args.no_client_server)
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *ray_args]
    return ray_main()


if __name__ == "__main__":
    sys.exit(main())
