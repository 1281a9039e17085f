import os, signal, sys, subprocess
from pathlib import Path
from tests.conftest import Child, wait_for
from tests.test_fates_field import field, child_env, puts_per_object
from tests.test_by_hand import installed_layout
from tests.test_pipeline import done_soon


def test_unlistable(sandbox, as_nobody):
    with field(as_nobody) as f:
        installed_layout(f)
        other = f.folders.drop / "other"; other.mkdir(); os.chown(other, f.producer, f.drop_gid); other.chmod(0o2700)
        f.produce(other / "x.csv", b"x"); (other / "x.csv").chmod(0o600)
        f.produce(f.folders.drop / "users" / "y.csv", b"y"); (f.folders.drop / "users" / "y.csv").chmod(0o600)
        f.start(sandbox, PRODUCTIV_RESCAN_SECONDS="1")
        import time; time.sleep(4)
        print("\n".join(l[:400] for l in f.child.lines[1:]))
        print(f.status())
        out = subprocess.run([sys.executable, "-m", "watcher", "check", "--as-user", "nobody"], env={**child_env(), **sandbox.env(), "PRODUCTIV_DROP_DIR": str(f.folders.drop)}, capture_output=True, text=True)
        print(out.stdout, out.stderr)
        f.stop()
