"""What `make systemd-test` does in the machine, step by step, as an operator and a producer.

Each step checks its promises with `report.check` (one line each, the journal lines that show a
failure); a step the rest depends on (install, start) raises `Broken` instead.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from collections.abc import Callable

from driver import (
    BASE,
    CONFIG,
    ETC,
    PRODUCER,
    PROGRAM,
    UNIT,
    Driver,
    event_lines,
    tail,
    wait_until,
)
from machine import Broken

SOURCE = "/usr/src/productiv-watcher"  # where the machine binds the clone, read-only
GROUP = "productiv-drop"
TYPES = ("users", "contracts", "other")
INSTANCE = "acme"
INSTANCE_UNIT = f"productiv-watcher@{INSTANCE}.service"
SANDBOX = {"app_id": "sandbox-app", "client_id": "sandbox-client"}
SECRET = "sandbox-secret-0000"  # the sandbox's fixed client secret
# Shorter than the defaults to keep the run within its budget; every other setting is the
# example config's.
QUICK = {"settle_seconds": 0.5, "rescan_seconds": 5, "status_seconds": 0.5}
SHUTDOWN_SECONDS = 3  # shutdown_timeout_seconds: how long a stop waits for a PUT in flight
DROP_IN = f"/etc/systemd/system/{UNIT}.d/50-systemd-test.conf"
RESTART_SECONDS = 1
DROP_IN_TEXT = f"""\
# Written by make systemd-test, only for its watchdog and invalid-settings steps: a short
# watchdog so that a frozen daemon is caught in seconds (it pings every WatchdogSec/2), and a
# short RestartSec so that a restart loop would show at once. Nothing else is changed.
[Service]
WatchdogSec=4s
RestartSec={RESTART_SECONDS}s
"""


class Scenario(Driver):
    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("install with deploy/install.sh, as the README says", self.install),
            ("configure for the sandbox, then `check` before the first start", self.configure),
            ("systemctl enable --now productiv-watcher", self.start),
            ("a producer (umask 0027) makes the type folders and drops files", self.produce),
            ("systemctl reload", self.reload),
            ("systemctl stop during an upload", self.stop_during_upload),
            ("the watchdog restarts a frozen daemon", self.watchdog),
            ("invalid settings", self.invalid_settings),
            (f"a template instance, productiv-watcher@{INSTANCE}", self.template_instance),
            ("a type folder the producer made with umask 0027", self.producer_folder),
            ("a second `productiv-watcher run` by hand on the same config", self.second_daemon),
            ("upgrade: deploy/install.sh again, with both units running", self.upgrade),
            ("deploy/install.sh --uninstall", self.uninstall),
        ]

    def install(self) -> None:
        secret = self.m.path("/root/client_secret")
        secret.write_text(SECRET + "\n")
        secret.chmod(0o600)
        done = self.m.run(
            "sh", "-c", f"cd {SOURCE} && deploy/install.sh --secret-file /root/client_secret",
            check=False, timeout=240,
        )  # fmt: skip
        if done.returncode != 0:
            output = (done.stdout + done.stderr).splitlines()
            raise Broken(
                f"deploy/install.sh exited with {done.returncode}:\n" + "\n".join(output[-20:])
            )
        modes = self.m.sh(f"cd {BASE}/drop && stat -c '%n %a %G' {' '.join(TYPES)} || true")
        expected = [f"{name} 2770 {GROUP}" for name in TYPES]
        self.report.check(
            f"install.sh creates drop/{{{','.join(TYPES)}}} (2770, group {GROUP})",
            modes.split("\n")[: len(TYPES)] == expected,
            f"expected {expected}, found:",
            modes.splitlines() or ["(none)"],
        )
        self.m.run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                   "--groups", GROUP, PRODUCER)  # fmt: skip

    def configure(self) -> None:
        port = self.sandbox.rsplit(":", 1)[1]
        self.m.run(
            "systemd-run", "--unit=productiv-sandbox", "--property=StateDirectory=productiv-sandbox",
            PROGRAM, "sandbox", "--port", port, "--store", "/var/lib/productiv-sandbox",
        )  # fmt: skip
        if not wait_until(self._sandbox_answers, 20):
            raise Broken(
                "the sandbox did not answer:\n" + "\n".join(self.m.journal("productiv-sandbox"))
            )
        url = self.sandbox
        self.edit_config(**SANDBOX, api_url=url, token_url=f"{url}/oauth2/token", **QUICK,
                         shutdown_timeout_seconds=SHUTDOWN_SECONDS)  # fmt: skip
        done = self.m.run(
            PROGRAM, "check", "--config", CONFIG, env={"CREDENTIALS_DIRECTORY": ETC}, check=False
        )
        self.report.check(
            "`check` passes right after install.sh, before the first start",
            done.returncode == 0,
            f"exit {done.returncode}:",
            (done.stdout + done.stderr).splitlines(),
        )

    def _sandbox_answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.sandbox}/_sandbox/requests", timeout=2).close()
        except OSError:
            return False
        return True

    def start(self) -> None:
        self.mark()
        self.m.run("systemctl", "enable", "--now", UNIT, check=False)
        if not self.wait_active():
            raise Broken(f"{UNIT} did not start: {self.show()}\n" + "\n".join(tail(self.log())))
        status = self.m.run("systemctl", "status", UNIT, "--no-pager", check=False).stdout
        self.report.check(
            "`systemctl status` shows the daemon's STATUS line",
            '    Status: "' in status,
            "no `Status:` line in:",
            status.splitlines()[:12],
        )
        pid = self.show()["MainPID"]
        proc = dict(
            line.split(":\t", 1) for line in self.m.sh(f"cat /proc/{pid}/status").splitlines()
        )
        found = {name: proc.get(name) for name in ("NoNewPrivs", "Seccomp", "CapEff")}
        found["/"], found[BASE] = self.m.sh(
            f"findmnt -N {pid} -no OPTIONS / && findmnt -N {pid} -no OPTIONS {BASE}"
        ).split()
        self.report.check(
            f"the unit's confinement is in force (no new privileges, seccomp, no capabilities, "
            f"/ read-only, {BASE} writable)",
            found["NoNewPrivs"] == "1"
            and found["Seccomp"] == "2"
            and found["CapEff"] == "0000000000000000"
            and found["/"].startswith("ro,")
            and found[BASE].startswith("rw,"),
            f"the daemon (pid {pid}) runs with {found}",
        )

    def produce(self) -> None:
        self.mark()
        files = [f"{kind}/{PRODUCER}-{i}.csv" for kind in TYPES for i in (1, 2, 3)]
        files += ["loose-1.csv", "loose-2.csv"]  # directly in drop/
        self.drop(files, mkdir=TYPES)  # `mkdir -p`, as a producer's script would
        self.all_done("the producer's files", files, BASE, UNIT)
        counted = wait_until(lambda: f"{len(files)} uploaded" in self.show()["StatusText"], 12)
        self.report.check(
            "STATUS counts them", counted, f"StatusText={self.show()['StatusText']!r}"
        )
        # Where the producer had to make a type folder (install.sh made none), the operator
        # repairs it, so that the next steps check their own promises, not this one again.
        unwritable = self.m.sh(f"cd {BASE}/drop && find {' '.join(TYPES)} -maxdepth 0 ! -perm -g+w")
        if unwritable.split():
            print(
                f"{'':15}(made {', '.join(unwritable.split())} group-writable for the next steps)"
            )
            self.m.sh(f"cd {BASE}/drop && chmod g+w {unwritable.replace(chr(10), ' ')}")
            wait_until(lambda: not self.missing(files, f"{BASE}/done"), 15)

    def reload(self) -> None:
        self.mark()
        self.edit_config(log_level="DEBUG")
        self.m.run("systemctl", "reload", UNIT)
        reloaded = wait_until(lambda: event_lines(self.log(), "reloaded"), 10)
        self.report.check(
            "`reloaded` is logged and lists log_level as applied",
            bool(reloaded) and "log_level" in reloaded[0],
            "the journal says:",
            reloaded or tail(self.log()),
        )
        self.drop(["users/after-reload.csv"])
        queued = wait_until(lambda: event_lines(self.log(), "queued", "after-reload.csv"), 15)
        self.report.check(
            "the new level is live: a DEBUG `queued` line for the next file",
            bool(queued),
            "no `queued` line for users/after-reload.csv:",
            tail(self.log()),
        )
        self.mark()
        self.edit_config(log_level="INFO")
        self.m.run("systemctl", "reload", UNIT)
        wait_until(lambda: event_lines(self.log(), "reloaded"), 10)

    def stop_during_upload(self) -> None:
        self.mark()
        self.inject(endpoint="put", count=1, delay=60)  # the next PUT hangs for a minute
        self.drop(["contracts/slow.csv"])
        uploading = wait_until(lambda: "1 uploading" in self.show()["StatusText"], 15)
        self.report.check(
            "STATUS shows the upload in flight",
            uploading,
            f"StatusText={self.show()['StatusText']!r}",
        )
        began = time.monotonic()
        self.m.run("systemctl", "stop", UNIT, check=False)
        took, state, lines = time.monotonic() - began, self.show(), self.log()
        self.report.check(
            f"the stop ends cleanly within shutdown_timeout_seconds ({SHUTDOWN_SECONDS} s) + 5 s",
            state["Result"] == "success" and took < SHUTDOWN_SECONDS + 5,
            f"took {took:.1f} s, Result={state['Result']}, ExecMainStatus={state['ExecMainStatus']}",
            tail(lines),
        )
        kept = [
            f"{d}/contracts/slow.csv"
            for d in ("drop", "done")
            if self.m.path(f"{BASE}/{d}/contracts/slow.csv").exists()
        ]
        self.report.check(
            "the file in flight is kept (in drop/ or done/)",
            bool(kept),
            "it is in neither:",
            tail(lines),
        )
        self.mark()
        self.m.run("systemctl", "start", UNIT)
        arrived = wait_until(lambda: self.m.path(f"{BASE}/done/contracts/slow.csv").exists(), 20)
        self.report.check(
            "after the next start it reaches done/", arrived, "not in done/:", tail(self.log())
        )

    def watchdog(self) -> None:
        drop_in = self.m.path(DROP_IN)
        drop_in.parent.mkdir(parents=True, exist_ok=True)
        drop_in.write_text(DROP_IN_TEXT)
        self.m.run("systemctl", "daemon-reload")
        self.m.run("systemctl", "restart", UNIT)
        if not self.wait_active():
            raise Broken(f"{UNIT} did not restart with the drop-in: {self.show()}")
        self.mark()
        frozen = self.show()["MainPID"]
        self.m.run("kill", "-STOP", frozen)
        restarted = wait_until(
            lambda: (
                (s := self.show())["MainPID"] not in (frozen, "0") and s["ActiveState"] == "active"
            ),
            30,
        )
        lines = self.log()
        self.report.check(
            "SIGSTOPped, it is killed by the watchdog (WatchdogSec=4s) and restarted",
            bool(restarted) and any("Watchdog timeout" in line for line in lines),
            f"pid {frozen} frozen; now {self.show()}",
            tail(lines),
        )

    def invalid_settings(self) -> None:
        # systemd counts every start (this test's included) against StartLimitBurst=5.
        self.m.run("systemctl", "reset-failed", UNIT)
        good = self.m.path(CONFIG).read_text()
        self.edit_config(batch_size=0)
        self.mark()
        self.m.run("systemctl", "restart", UNIT, check=False)
        first = self.show()
        self.report.check(
            "invalid settings: the unit ends `failed` with exit status 78",
            first["ActiveState"] == "failed" and first["ExecMainStatus"] == "78",
            f"ActiveState={first['ActiveState']} SubState={first['SubState']} "
            f"ExecMainStatus={first['ExecMainStatus']}",
            tail(self.log()),
        )
        time.sleep(3 * RESTART_SECONDS)  # a restart loop would have begun by now
        later = self.show()
        self.report.check(
            "no restart loop (RestartPreventExitStatus=78)",
            later["ActiveState"] == "failed" and later["NRestarts"] == first["NRestarts"],
            f"{3 * RESTART_SECONDS} s later: ActiveState={later['ActiveState']}, "
            f"NRestarts {first['NRestarts']} -> {later['NRestarts']}",
            tail(self.log()),
        )
        self.m.path(CONFIG).write_text(good)
        self.m.path(DROP_IN).unlink()  # back to the unit as shipped
        self.m.run("systemctl", "daemon-reload")
        self.m.run("systemctl", "reset-failed", UNIT)
        self.m.run("systemctl", "start", UNIT, check=False)
        if not self.wait_active():
            raise Broken(f"{UNIT} did not start again with valid settings: {self.show()}")

    def template_instance(self) -> None:
        """Set up with docs/deployment.md's commands (Several apps on one host): its folders (all but
        drop/users, which the next step has a producer make), a copy of config.toml, then its
        own drop_dir and state_dir, its secret, and `check` with the secret from the shell."""
        base = f"{BASE}/{INSTANCE}"
        config = f"{ETC}/{INSTANCE}.toml"
        self.m.sh(
            f"install -d -m 2770 -o productiv-watcher -g {GROUP} {base}/drop"
            f" {base}/drop/contracts {base}/drop/other {base}/done {base}/failed\n"
            f"install -m 0640 -g productiv-watcher {CONFIG} {config}\n"
            f"install -m 0600 /root/client_secret {ETC}/{INSTANCE}.client_secret\n"
        )
        self.edit_config(config, drop_dir=f"{base}/drop")
        self.mark()  # a copy keeps the main unit's state_dir: the README says it stops with 78
        self.m.run("systemctl", "start", INSTANCE_UNIT, check=False)
        first = self.show(INSTANCE_UNIT)
        self.report.check(
            "with the main unit's state_dir, the instance stops with exit 78 (as the README says)",
            first["ActiveState"] == "failed" and first["ExecMainStatus"] == "78",
            f"{first}",
            tail(self.log(INSTANCE_UNIT)),
        )
        self.m.run("systemctl", "reset-failed", INSTANCE_UNIT, check=False)
        self.edit_config(config, state_dir=f"/var/lib/productiv-watcher/{INSTANCE}/state")
        secret = f"{ETC}/{INSTANCE}.client_secret"
        done = self.m.run(
            "sh", "-c", f"PRODUCTIV_CLIENT_SECRET=$(cat {secret}) exec {PROGRAM} check --config {config}",
            check=False,
        )  # fmt: skip
        self.report.check(
            f"the documented `check` for {INSTANCE} passes before its first start",
            done.returncode == 0,
            f"exit {done.returncode}:",
            (done.stdout + done.stderr).splitlines(),
        )
        self.mark()
        self.m.run("systemctl", "enable", "--now", INSTANCE_UNIT, check=False)
        running = self.wait_active(INSTANCE_UNIT) and self.show()["ActiveState"] == "active"
        if not self.report.check(
            f"{INSTANCE_UNIT} runs beside {UNIT}",
            running,
            f"{INSTANCE_UNIT}: {self.show(INSTANCE_UNIT)}; {UNIT}: {self.show()}",
            tail(self.log(INSTANCE_UNIT)),
        ):
            return
        self.drop([f"{INSTANCE}-loose.csv"], base=base)
        self.all_done("the instance's file", [f"{INSTANCE}-loose.csv"], base, INSTANCE_UNIT)

    def producer_folder(self) -> None:
        """The instance's drop/ has no type folders (install.sh made none for it): the producer
        makes drop/users with umask 0027, so the service can read the files but not move them."""
        base = f"{BASE}/{INSTANCE}"
        folder, file = f"{base}/drop/users", f"users/{INSTANCE}-user.csv"
        if self.show(INSTANCE_UNIT)["ActiveState"] != "active":
            self.report.check("the instance runs", False, "it did not start: see above")
            return
        self.mark()
        self.drop([file], base=base, mkdir=("users",))
        notice = wait_until(
            lambda: event_lines(self.log(INSTANCE_UNIT), "folder_not_writable", folder), 15
        )
        self.report.check(
            f"`folder_not_writable` names {folder}",
            bool(notice),
            "no such line:",
            tail(self.log(INSTANCE_UNIT)),
        )
        time.sleep(QUICK["rescan_seconds"])  # and the file stays put across a rescan
        lines, puts = self.log(INSTANCE_UNIT), self.puts(file)
        retrying = event_lines(lines, "retrying")
        self.report.check(
            "a file that could not be moved is not uploaded (no PUT, no `retrying` line)",
            puts == 0 and not retrying,
            f"{puts} PUT(s), {len(retrying)} `retrying` line(s); the first ones:",
            retrying[:5] or tail(lines),
        )
        self.mark()
        self.m.sh(f"chmod g+w {folder}", user=PRODUCER)  # what the message should tell them
        arrived = wait_until(lambda: self.m.path(f"{base}/done/{file}").exists(), 20)
        puts = self.puts(file)
        self.report.check(
            "made group-writable, the folder's file reaches done/, PUT once in all",
            arrived and puts == 1,
            f"in done/: {bool(arrived)}, PUTs: {puts}",
            tail(self.log(INSTANCE_UNIT)),
        )

    def second_daemon(self) -> None:
        """An operator debugging runs the daemon by hand (as root) beside the service."""
        self.mark()
        output = self.m.base / "by-hand.log"
        by_hand = self.m.start(
            PROGRAM, "run", "--config", CONFIG, env={"CREDENTIALS_DIRECTORY": ETC}, output=output
        )
        lines = lambda: output.read_text(errors="replace").splitlines()  # noqa: E731
        try:
            standby = wait_until(lambda: event_lines(lines(), "standby"), 15)
            self.report.check(
                "the second daemon logs `standby`", bool(standby), "its output:", tail(lines())
            )
            files = [f"users/standby-{i}.csv" for i in (1, 2, 3, 4)]
            self.drop(files)
            self.all_done("beside a standby", files, BASE, UNIT)
            uploaded = event_lines(lines(), "uploaded")
            self.report.check(
                "the standby logs no `uploaded` line",
                not uploaded,
                f"it logged {len(uploaded)} `uploaded` line(s):",
                uploaded[:5],
            )
            self.report.check(
                f"{UNIT} is still the active one",
                self.show()["ActiveState"] == "active",
                str(self.show()),
            )
        finally:
            pid = self.m.run("cat", "/run/background.pid", check=False).stdout.strip()
            if pid:
                self.m.run("kill", "-TERM", pid, check=False)
            try:
                by_hand.wait(timeout=15)
            except subprocess.TimeoutExpired:
                by_hand.kill()
                by_hand.wait()

    def upgrade(self) -> None:
        """The README: run install.sh again to upgrade. The units that run must go on with the
        new program, not the old one from files pip replaced under them."""
        units = (UNIT, INSTANCE_UNIT)
        before = {unit: self.show(unit)["MainPID"] for unit in units}
        # A newer checkout (a copy of the read-only one with a source file changed), so that
        # pip replaces the program's files: from the same checkout install.sh keeps the venv.
        newer = "/root/newer-checkout"
        self.m.run(
            "sh", "-c", f"cp -R {SOURCE} {newer} && echo '# newer' >> {newer}/watcher/__init__.py"
        )
        output = self.install_again(newer)
        self.report.check(
            "install.sh rebuilt the program from the changed checkout",
            "already built" not in output and re.search(r"-m pip .*install ", output) is not None,
            output[-500:],
        )
        restarted = wait_until(
            lambda: all(
                (s := self.show(unit))["ActiveState"] == "active" and s["MainPID"] != before[unit]
                for unit in units
            ),
            20,
        )
        self.report.check(
            "both units were restarted onto the new program, and run",
            bool(restarted),
            f"MainPID before {before}; now "
            + str({unit: self.show(unit)["MainPID"] for unit in units}),
        )
        self.mark()
        self.drop(["users/after-upgrade.csv"])
        self.all_done("after the upgrade", ["users/after-upgrade.csv"], BASE, UNIT)

    def install_again(self, source: str = SOURCE) -> str:
        done = self.m.run(
            "sh", "-c", f"cd {source} && deploy/install.sh", check=False, timeout=120
        )  # fmt: skip
        if done.returncode != 0:
            raise Broken(
                f"deploy/install.sh (again) exited with {done.returncode}:\n"
                + "\n".join((done.stdout + done.stderr).splitlines()[-20:])
            )
        return done.stdout

    def uninstall(self) -> None:
        """Nothing of the program may be left running or enabled: the template's instance
        included (without its program it would restart in a loop)."""
        self.m.run("sh", "-c", f"cd {SOURCE} && deploy/install.sh --uninstall", check=False)
        states = {unit: self.show(unit)["ActiveState"] for unit in (UNIT, INSTANCE_UNIT)}
        links = self.m.sh(
            "find /etc/systemd/system -name 'productiv-watcher*.service' ! -type d 2>/dev/null || true"
        )
        self.report.check(
            "--uninstall stops both units and leaves no unit file or enablement link",
            set(states.values()) <= {"inactive"} and not links.strip(),
            f"ActiveState {states}; left in /etc/systemd/system:",
            links.splitlines(),
        )
        kept = self.m.path(f"{BASE}/done/users/after-upgrade.csv").exists()
        self.report.check("--uninstall keeps the files in the folders", kept, "done/ lost a file")
