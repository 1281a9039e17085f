"""The `productiv-watcher` command: parse, load settings, set up logging, hand over.

Exit status: 0 after a clean stop or success, 1 for any other failure, 78 (EX_CONFIG) for
invalid settings or folders, so that systemd's RestartPreventExitStatus=78 ends a restart loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .. import __version__, logs
from ..daemon.timings import DEFAULT, Timings
from ..remote.api import ApiClient
from ..remote.faults import Fault
from ..settings import FILE_TYPES, ConfigError, Settings, load

log = logging.getLogger("watcher")

EX_CONFIG = 78


def main(argv: list[str] | None = None, timings: Timings = DEFAULT) -> int:
    """`timings`: the daemon's fixed turns, for tests only."""
    args = _parser().parse_args(argv)
    args.timings = timings
    sys.stdout = logs.ScrubbedStream(sys.stdout)  # what the commands print is scrubbed too
    # Until the settings are read, log as the environment asks (json mode covers exit 78 too).
    level = os.environ.get("PRODUCTIV_LOG_LEVEL", "INFO").upper()
    logs.setup(
        level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO",
        os.environ.get("PRODUCTIV_LOG_FORMAT", "text"),
    )
    try:
        status: int = args.command(args)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            logs.event(log, "config_error", line, level=logging.ERROR)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    return status


def _settings(args: argparse.Namespace) -> Settings:
    settings = load(args.config)
    logs.setup(settings.log_level, settings.log_format)
    logs.REDACT.add(settings.secret_values())
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from ..daemon.service import Service

    service = Service(_settings(args), reload=lambda: load(args.config), timings=args.timings)
    service.handle_signals()
    return service.run()


def cmd_check(args: argparse.Namespace) -> int:
    from ..daemon.instance import active_holder
    from ..disk.access import describe_user, folder_report, service_user

    settings = _settings(args)
    print(f"settings: ok (app_id {settings.app_id}, api_url {settings.api_url})")
    user = service_user(args.as_user)
    print(f"folders: judged for {describe_user(user)}")
    problems, notes = folder_report(settings, user)
    for problem in problems:
        print(f"folders: FAIL {problem}")
    if not problems:
        print(f"folders: ok ({settings.drop_dir} -> {settings.done_dir}, {settings.failed_dir})")
    for note in notes:
        print(f"folders: {note}")
    holder = None if settings.drop_dir is None else active_holder(settings.drop_dir)
    running = (
        f"{holder.describe()} holds the drop folder"
        if holder
        else "no daemon holds the drop folder"
    )
    print(f"instance: {running}")
    api = ApiClient(settings)
    try:
        api.token()
        print(f"token: ok (from {settings.token_url})")
    except Fault as fault:
        print(f"token: FAIL {fault.reason}")
        problems.append(fault.reason)
    finally:
        api.close()
    print("all good" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def cmd_upload(args: argparse.Namespace) -> int:
    from .oneshot import upload_files

    settings = _settings(args)
    return upload_files(settings, args.files, args.type or settings.file_type)


def cmd_status(args: argparse.Namespace) -> int:
    from .admin import status

    return status(load(args.config, credentials=False), args.file, args.json)


def cmd_retry_failed(args: argparse.Namespace) -> int:
    from .admin import retry_failed

    settings = load(args.config, credentials=False)
    return retry_failed(settings, args.reason, args.older_than, args.dry_run)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from ..sandbox.productiv import serve

    serve(args.host, args.port, args.store)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.folder)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="productiv-watcher",
        description="Upload every finished file of a drop folder to Productiv's push API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, func: object, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
        sub.set_defaults(command=func)
        return sub

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--config", type=Path, help="TOML settings file (or PRODUCTIV_CONFIG)")
        return sub

    with_config(command("run", cmd_run, "run the daemon in the foreground (systemd runs this)"))
    check = with_config(command("check", cmd_check, "check settings, folders and credentials"))
    check.add_argument(
        "--as-user",
        metavar="NAME",
        help="judge the folders for this user (default, as root: the unit's productiv-watcher)",
    )
    upload = with_config(command("upload", cmd_upload, "upload the named files once (no moves)"))
    upload.add_argument("--type", choices=FILE_TYPES, help="file type (default: file_type)")
    upload.add_argument("files", nargs="+", type=Path, metavar="FILE")
    status = with_config(
        command("status", cmd_status, "what the daemon is doing, or what became of FILE")
    )
    status.add_argument("file", nargs="?", metavar="FILE", help="a file's receipt instead")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    retry = with_config(
        command("retry-failed", cmd_retry_failed, "move failed files back into the drop folder")
    )
    retry.add_argument("--reason", help="only files whose failure reason contains this text")
    retry.add_argument("--older-than", metavar="DURATION", help="only files failed before (7d)")
    retry.add_argument("--dry-run", action="store_true", help="print what would be moved")
    sandbox = command("sandbox", cmd_sandbox, "run the local sandbox of the Productiv API")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8765)
    sandbox.add_argument("--store", type=Path, default=Path("sandbox-store"))
    demo = command("demo", cmd_demo, "the sandbox plus the daemon on ./demo (what make demo runs)")
    demo.add_argument("--folder", type=Path, default=Path("demo"), help=argparse.SUPPRESS)
    return parser
