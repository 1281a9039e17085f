"""`make demo`: the sandbox and the daemon on ./demo, with a few sample files to show the way."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr

from ..daemon.service import Service
from ..sandbox.productiv import Sandbox
from ..settings import Settings

SAMPLES = {
    "users/people.csv": "email,name\nada@example.com,Ada Lovelace\nalan@example.com,Alan Turing\n",
    "contracts/acme-2026.csv": "vendor,start,end,amount\nAcme,2026-01-01,2026-12-31,12000\n",
    "readme-first.txt": "Files directly in the drop folder are uploaded with file_type.\n",
}


def run_demo(base: Path) -> int:
    base = base.absolute()
    for name in ("drop/users", "drop/contracts", "drop/other", "done", "failed"):
        (base / name).mkdir(parents=True, exist_ok=True)
    # The demo must never reach a real tenant: ignore any PRODUCTIV_* settings of this shell.
    for name in [n for n in os.environ if n.startswith("PRODUCTIV_")] + ["CREDENTIALS_DIRECTORY"]:
        os.environ.pop(name, None)
    with Sandbox(base / "sandbox-store") as sandbox:
        settings = Settings(
            app_id=sandbox.app_id,
            client_id=sandbox.client_id,
            client_secret=SecretStr(sandbox.client_secret),
            api_url=sandbox.url,
            token_url=f"{sandbox.url}/oauth2/token",
            drop_dir=base / "drop",
            file_type="other",
            settle_seconds=1.0,
            rescan_seconds=10.0,
        )
        service = Service(settings)
        service.handle_signals()
        for rel, text in SAMPLES.items():
            (base / "drop" / rel).write_text(text)
        print(  # noqa: T201 - the demo talks to the person who started it
            f"\nproductiv-watcher demo: sandbox API on {sandbox.url}\n"
            f"  drop files into   {base / 'drop'}  (or its users/, contracts/, other/)\n"
            f"  uploaded files go {base / 'done'}, refused ones to {base / 'failed'}\n"
            f"  the sandbox keeps what it received in {sandbox.store}\n"
            "  Ctrl-C stops it.\n",
            flush=True,
        )
        return service.run()
