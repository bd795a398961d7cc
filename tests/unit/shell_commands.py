"""What bash would run if a fix block were pasted into it, found without running anything.

bash reads the block after ``shopt -s extdebug`` and a DEBUG trap that prints ``$BASH_COMMAND``
and returns false: with extdebug a failing DEBUG trap skips the command (its redirections and
command substitutions included), so each simple command is listed and none is executed. As a
second guard the shell runs with an empty PATH, and as ``nobody`` when we are root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

_PROLOGUE = 'shopt -s extdebug\ntrap \'printf "%s\\0" "$BASH_COMMAND"; false\' DEBUG\n'


def commands_bash_would_run(script: str) -> list[str]:
    """The simple commands bash would execute for ``script``, in order, as bash shows them."""
    bash, setpriv = shutil.which("bash"), shutil.which("setpriv")
    assert bash is not None and setpriv is not None, "bash and setpriv (util-linux) are needed"
    with tempfile.TemporaryDirectory(prefix="tw-shell-") as empty:
        os.chmod(empty, 0o755)
        path = os.path.join(empty, "block.sh")
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as file:
            file.write(_PROLOGUE + script + "\n")
        os.chmod(path, 0o644)
        argv = [bash, "--noprofile", "--norc", path]
        if os.geteuid() == 0:
            argv = [setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups", *argv]
        done = subprocess.run(
            argv,
            env={"PATH": empty, "LC_ALL": "C.UTF-8", "HOME": empty},
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    return [command.decode("utf-8", "surrogateescape") for command in done.stdout.split(b"\0")[:-1]]
