"""tcpwatch/escape.py over arbitrary text and bytes (hypothesis): a terminal line or a comment
keeps no control character and no newline, and a shell word is one word with the same bytes in
bash and one word in dash; then the fix text of the rules with hostile process, namespace and
file names: bash would run exactly the commands it runs for plain names (issue 21 item 2)."""

from __future__ import annotations

import os
import shutil
import subprocess

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tcpwatch.escape import shell_comment, shell_word, terminal
from tcpwatch.model import PersistedSysctl, ProcessRef
from tcpwatch.rules import evaluate
from tcpwatch.rules.fixes import comment, run_in
from tests.unit.shell_commands import commands_bash_would_run
from tests.unit.snapshots import listener, snapshot, socket_table, window

# What a host can hold: any text, and any bytes as os.fsdecode gives them (surrogateescape).
NAMES = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40).map(os.fsdecode),
    st.sampled_from(["x\nrm -rf ~;#", "\x1b[2J\x1b]0;pwned\x07", "a'b\\c$(id)`id`", "\u202e\x85"]),
)
# Process names and file names never hold NUL (C strings), nor surrogates os.fsdecode does not
# produce; everything else may be there.
HOST_NAMES = NAMES.filter(
    lambda name: (
        "\0" not in name
        and not any(0xD800 <= ord(c) < 0xDC80 or 0xDD00 <= ord(c) < 0xE000 for c in name)
    )
)
QUICK = settings(max_examples=300, deadline=None, database=None)
SHELLS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ATTACK = "x\nrm -rf ~;#"  # the name of issue 21 item 2 (12 bytes: prctl takes 15)


@QUICK
@given(NAMES)
@example("\x1b[2J\x1b]0;title\x07")
@example("\udcff\udc80")
def test_terminal_text_is_one_printable_line(text: str) -> None:
    shown = terminal(text)
    assert shown.isprintable()  # no C0/C1 control, no DEL, no line separator, no bidi override
    assert terminal(shown) == shown  # escaping twice changes nothing
    if text.isprintable():
        assert shown == text
    assert shell_comment(text) == shown


def test_escapes_name_the_character() -> None:
    assert terminal("a\nb\x1b[2J\x07") == "a\\nb\\x1b[2J\\x07"
    assert terminal("\u202eevil\x85") == "\\u202eevil\\u0085"
    assert terminal(os.fsdecode(b"caf\xe9")) == "caf\\xe9"  # the byte that was not UTF-8


@SHELLS
@given(NAMES)
@example(ATTACK)
def test_a_comment_line_cannot_end_early(text: str) -> None:
    block = comment(f"{text} is not calling accept() fast enough") + "\necho after"
    assert block.count("\n") == 1
    assert commands_bash_would_run(block) == ["echo after"]


def _in_shell(shell: str, word: str) -> bytes:
    """What ``shell`` makes of ``word``: the number of words, a colon, the first word's bytes."""
    path = shutil.which(shell)
    assert path is not None, f"{shell} is needed"
    done = subprocess.run(
        [path, "-c", f'set -- {word}; printf \'%s:%s\' "$#" "$1"'],
        env={"PATH": "/nonexistent", "LC_ALL": "C.UTF-8"},
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr, done
    return done.stdout


@SHELLS
@given(HOST_NAMES)
@example(ATTACK)
@example("pid:1;reboot")
@example("a'b\\c$(id)`id`\x1b")
@example("\udcff\u2028")
def test_a_shell_word_is_one_word_holding_the_same_bytes(text: str) -> None:
    word = shell_word(text)
    assert word.isprintable()
    expected = text.encode("utf-8", "surrogateescape")
    assert _in_shell("bash", word) == b"1:" + expected
    # dash has no $'...': a name with unprintable characters becomes a literal word there,
    # naming nothing; it is still one word, and nothing runs.
    number, _, value = _in_shell("dash", word).partition(b":")
    assert number == b"1"
    assert value == expected or not text.isprintable()


def test_a_namespace_name_is_one_word_of_the_command() -> None:
    assert run_in("pid:1;reboot", "ss") == "ip netns exec 'pid:1;reboot' ss"
    assert run_in("pid:42", "ss") == "nsenter --net=/proc/42/ns/net ss"
    assert run_in("host", "ss") == "ss"
    # One command, the name one quoted word of it (bash shows it with the newline inside).
    assert commands_bash_would_run(run_in(ATTACK, "ss -ltn")) == [
        "ip netns exec 'x\nrm -rf ~;#' ss -ltn"
    ]


# -- the rules' fix text ------------------------------------------------------------------------


def _fix_blocks(process: str, netns: str, file: str) -> str:
    """Every remediation of a namespace where Q01, S01 and P02 fire for a process named
    ``process`` in a namespace named ``netns``, and of the host where K03 and a persisted
    setting name the sysctl file ``file``."""
    owner = ProcessRef(4321, process)
    table = socket_table(
        [
            listener(8080, queue_length=129, queue_max=128, inode=7001),
            listener(40000, inode=7002),
        ],
        close_wait_inodes=range(9000, 9060),
    )
    owners = {7001: owner, 7002: owner} | dict.fromkeys(range(9000, 9060), owner)
    named = snapshot(
        netns=netns,
        sockets=table,
        owners=owners,
        sysctl_overrides={"net.core.somaxconn": (128,)},
    )
    host = snapshot(sockets=table, owners=owners, sysctl_overrides={"net.core.somaxconn": (128,)})
    persisted = (
        PersistedSysctl(f"/etc/sysctl.d/{file}.conf", 3, "net.ipv4.tcp_tw_recycle", "1"),
        PersistedSysctl(f"/etc/sysctl.d/{file}.conf", 4, "net.core.somaxconn", file),
    )
    findings = evaluate(window(named), {}) + evaluate(window(host, persisted=persisted), {})
    return "\n".join(finding.remediation for finding in findings)


PLAIN = _fix_blocks("app-server", "blue", "99-tuning")


def _shape(commands: list[str]) -> list[str]:
    return [command.split()[0] for command in commands]


def test_the_plain_blocks_hold_what_the_hostile_ones_are_checked_for() -> None:
    for rule_text in (
        "is not calling accept()",
        "does not close()",
        "while app-server[4321] is restarting",
    ):
        assert rule_text in PLAIN
    commands = commands_bash_would_run(PLAIN)
    assert any(c.startswith("ip netns exec blue ss") for c in commands)
    assert any(c.startswith("sed -i") and "99-tuning.conf" in c for c in commands)
    assert "# /etc/sysctl.d/99-tuning.conf:4 sets net.core.somaxconn = 99-tuning" in PLAIN


@SHELLS
@given(HOST_NAMES, HOST_NAMES.filter(lambda n: n not in ("", "host")), HOST_NAMES)
@example(ATTACK, ATTACK, ATTACK)
@example("\x1b[2J\x1b]0;t\x07", "pid:1;reboot", "x;reboot")
def test_hostile_names_add_no_command_to_a_fix(process: str, netns: str, file: str) -> None:
    blocks = _fix_blocks(process, netns, file)
    assert all(line.isprintable() for line in blocks.split("\n"))
    assert len(blocks.split("\n")) == len(PLAIN.split("\n"))
    ours = commands_bash_would_run(blocks)
    assert _shape(ours) == _shape(commands_bash_would_run(PLAIN))
