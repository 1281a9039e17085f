#!/bin/sh
# Install productiv-watcher as a systemd service on a Debian/Ubuntu/RHEL-like host. Idempotent:
# run it again to upgrade (the units that run are restarted); it never overwrites a config or
# secret that is already there.
#
#   sudo deploy/install.sh [--secret-file FILE] [--base DIR] [--group NAME] [--dry-run]
#   sudo deploy/install.sh --uninstall [--dry-run]
#
#   --secret-file FILE  copy the Productiv client secret to /etc/productiv-watcher/client_secret (0600)
#   --base DIR          the folders' parent (default /srv/productiv): DIR/drop, DIR/done, DIR/failed
#   --group NAME        the group producers join to drop files (default productiv-drop)
#   --python PATH       the Python of the virtual environment, whose pip installs into it
#                       when it is 22.3 or later (default python3)
#   --root DIR          install below DIR instead of / (packaging, tests): no users, no systemctl
#   --dry-run           print what would be done, change nothing
#   --uninstall         stop and disable the service and its @instances, remove the program and
#                       units; keep config, secret and every folder's files
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
user=productiv-watcher
group=productiv-drop
base=/srv/productiv
python=python3
root=
secret=
dry=0
uninstall=0

while [ $# -gt 0 ]; do
    case "$1" in
        --secret-file) secret=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --group) group=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --root) root=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --uninstall) uninstall=1; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

opt=$root/opt/productiv-watcher
etc=$root/etc/productiv-watcher
units=$root/etc/systemd/system
state=$root/var/lib/productiv-watcher
folders=$root$base

say() { printf '%s\n' "$*"; }
run() {
    say "+ $*"
    [ "$dry" = 1 ] || "$@"
}
system() { [ -z "$root" ]; }  # touching the real system: users, ownership, systemctl
systemd_running() { system && [ -d /run/systemd/system ]; }

if [ "$dry" = 0 ] && system && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or with --dry-run / --root DIR)" >&2
    exit 1
fi

if [ "$uninstall" = 1 ]; then
    if systemd_running; then
        # The template's instances too (running, or only enabled): left behind, they would
        # restart in a loop without their program, and their links would point at nothing.
        instances=$( (systemctl list-units --all --plain --no-legend 'productiv-watcher@*.service'
                      cd "$units" && ls -- */productiv-watcher@?*.service) 2>/dev/null \
                    | awk '{ for (i = 1; i <= NF; i++) { n = $i; sub(".*/", "", n)
                             if (n ~ /^productiv-watcher@.+[.]service$/) print n } }' | sort -u)
        # shellcheck disable=SC2086  # one word per instance
        run systemctl disable --now productiv-watcher.service $instances || true
    fi
    # What disable removes, for a tree with no systemd running (--root, an image): the
    # enablement links of the service and of every instance.
    run rm -f "$units/productiv-watcher.service" "$units/productiv-watcher@.service" \
        "$units"/*.wants/productiv-watcher.service "$units"/*.wants/productiv-watcher@?*.service
    run rm -rf "$opt"
    if systemd_running; then run systemctl daemon-reload; fi
    say "removed the program and its units; kept $etc and the files in $folders"
    exit 0
fi

# 1. The service's user, and the group producers join to drop files.
if system; then
    getent group "$group" >/dev/null || run groupadd --system "$group"
    if ! getent passwd "$user" >/dev/null; then
        nologin=$(command -v nologin || echo /usr/sbin/nologin)
        run useradd --system --user-group --home-dir /nonexistent --no-create-home \
            --shell "$nologin" --comment "productiv-watcher daemon" "$user"
    fi
    run usermod --append --groups "$group" "$user"
fi

# 2. The program, in its own virtual environment, built from this checkout. A re-run from the same
# checkout (same sources, same constraints) keeps it: the fingerprint beside it says what it was
# built from, and is written only once pip has finished.
if ! command -v "$python" >/dev/null; then
    echo "install.sh: no Python $python (set --python to a Python 3.10 or later)" >&2
    exit 1
fi
run mkdir -p "$opt"
fingerprint=$(cd "$here" && find pyproject.toml constraints.txt README.md watcher deploy/install.sh \
    -type f ! -name '*.pyc' -exec sha256sum {} + | LC_ALL=C sort -k2 | sha256sum | cut -d' ' -f1)
if [ "${#fingerprint}" -ne 64 ]; then
    echo "install.sh: cannot fingerprint the checkout in $here (sha256sum?)" >&2
    exit 1
fi
if [ -x "$opt/venv/bin/python" ] && [ "$(cat "$opt/built-from" 2>/dev/null)" = "$fingerprint" ]; then
    say "keeping $opt/venv: already built from this checkout"
else
    run rm -f "$opt/built-from"  # until pip has finished: an interrupted upgrade is no build
    # The venv is made without pip, and the pip of $python installs into it (pip 22.3 or later:
    # --python): ensurepip costs 6 s, and Debian leaves it out unless python3-venv is there.
    # Where $python has no such pip, the venv gets its own (ensurepip), also a venv kept from
    # an earlier install that has none. Never an upgrade of pip itself, which would need the
    # package index for nothing.
    [ -x "$opt/venv/bin/python" ] || run "$python" -m venv --without-pip "$opt/venv"
    exe=$("$python" -c 'import sys; print(sys.executable)')
    if "$python" -m pip --python "$exe" --version >/dev/null 2>&1; then
        say "installing with the pip of $exe"
        pip() { run "$python" -m pip --python "$opt/venv/bin/python" "$@"; }
    else
        say "installing with the venv's own pip ($exe has no pip 22.3 or later)"
        "$opt/venv/bin/python" -m pip --version >/dev/null 2>&1 ||
            run "$opt/venv/bin/python" -m ensurepip
        pip() { run "$opt/venv/bin/python" -m pip "$@"; }
    fi
    # pip builds in the source folder, where a build backend may write: build from a copy, so
    # that the checkout (read-only, or someone else's) is left untouched.
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    run cp -R "$here/pyproject.toml" "$here/README.md" "$here/watcher" "$src/"
    # The versions tested (constraints.txt), not whatever is newest today.
    pip install --quiet --upgrade -c "$here/constraints.txt" "$src[metrics]"
    [ "$dry" = 1 ] || printf '%s\n' "$fingerprint" >"$opt/built-from"
fi

# 3. Settings and secret: created once, never overwritten.
run mkdir -p "$etc"
run chmod 0755 "$etc"
if [ ! -e "$etc/config.toml" ]; then
    run install -m 0640 "$here/deploy/config.example.toml" "$etc/config.toml"
    run sed -i "s#^drop_dir = .*#drop_dir = \"$base/drop\"#" "$etc/config.toml"
    if system; then run chgrp "$user" "$etc/config.toml"; fi
else
    say "keeping $etc/config.toml"
fi
if [ -n "$secret" ]; then
    if [ -e "$etc/client_secret" ]; then
        say "keeping $etc/client_secret (remove it first to replace it)"
    else
        run install -m 0600 "$secret" "$etc/client_secret"  # root only: systemd hands it over
    fi
fi

# 4. The folders: producers (group $group) write into drop/ and its type folders, made here so
#    that producers need not make them with their own umask (a 0750 folder the service cannot
#    move files out of); setgid keeps the group on their files. Run again, it repairs them.
for name in drop drop/users drop/contracts drop/other done failed; do
    run mkdir -p "$folders/$name"
    if system; then run chown "$user:$group" "$folders/$name"; fi
    run chmod 2770 "$folders/$name"
done
run chmod 0755 "$folders"
# What the unit's StateDirectory= would make at the first start (the state folder's parent),
# made now so that `check` passes before it.
run mkdir -p "$state"
if system; then run chown "$user:$user" "$state"; fi
run chmod 0755 "$state"

# 5. The units.
run mkdir -p "$units"
for unit in productiv-watcher.service productiv-watcher@.service; do
    run install -m 0644 "$here/systemd/$unit" "$units/$unit"
done
if [ "$base" != /srv/productiv ]; then
    run sed -i "s#/srv/productiv#$base#" "$units/productiv-watcher.service" "$units/productiv-watcher@.service"
fi
if [ "$group" != productiv-drop ]; then
    run sed -i "s#^SupplementaryGroups=.*#SupplementaryGroups=$group#" "$units/productiv-watcher.service" "$units/productiv-watcher@.service"
fi
if systemd_running; then
    run systemctl daemon-reload
    # An upgrade: the units that run go on with the new program (a restart loses nothing: what
    # was not moved yet stays in drop/ and goes again). Units that do not run stay stopped.
    run systemctl try-restart productiv-watcher.service 'productiv-watcher@*.service'
elif system; then
    say "systemd is not running here: run 'systemctl daemon-reload' on the real host"
fi

say ""
say "installed. Next:"
say "  1. edit $etc/config.toml (app_id, client_id)"
[ -n "$secret" ] || say "  2. put the client secret in $etc/client_secret (mode 0600, owner root)"
say "  3. CREDENTIALS_DIRECTORY=$etc $opt/venv/bin/productiv-watcher check --config $etc/config.toml"
say "     (as root it judges the folders for the service's user $user)"
say "  4. systemctl enable --now productiv-watcher; systemctl status productiv-watcher"
say "  producers join the group $group and write into $base/drop/{users,contracts,other}"
