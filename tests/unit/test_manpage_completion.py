"""tcpwatch(1) and the shell completions, generated from the parser, read by the real tools:
man(1) renders the page without a warning, bash completes from the script, zsh loads its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tcpwatch import completion, manpage
from tcpwatch.cli import build_parser
from tcpwatch.manpage import EXIT_STATUS, _subcommands

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "MANWIDTH": "200"}


def _tool(name: str) -> str:
    path = shutil.which(name, path=ENV["PATH"])
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/test installs it)")
    return path


def _man(page: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("man"), "--warnings", "-l", "-P", "cat", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )


def _all_flags() -> dict[str, set[str]]:
    parser = build_parser()
    flags = {"": {f for a in parser._actions for f in a.option_strings}}
    for name, sub in _subcommands(parser).items():
        flags[name] = {f for a in sub._actions for f in a.option_strings}
    return flags


def test_man_renders_without_warnings_and_covers_every_flag(tmp_path: Path) -> None:
    page = tmp_path / "tcpwatch.1"
    page.write_text(manpage.render(), encoding="utf-8")
    result = _man(page)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    text = result.stdout
    for section in ("NAME", "SYNOPSIS", "COMMANDS", "EXIT STATUS", "FILES", "ENVIRONMENT"):
        assert f"\n{section}\n" in text, section
    for command, flags in _all_flags().items():
        if command:
            assert f"OPTIONS OF {command.upper()}" in text
        for flag in flags:
            assert flag in text, (command, flag)
    for code, _ in EXIT_STATUS:
        assert f"\n       {code}" in text, code
    assert "/etc/tcpwatch/config.yaml" in text and "/etc/sysctl.d/*.conf" in text


def test_man_warnings_are_seen_here(tmp_path: Path) -> None:
    # Control: the same call reports a broken page, so the silence above means something.
    page = tmp_path / "broken.1"
    page.write_text(manpage.render().replace(".SH FILES", ".SHX FILES"), encoding="utf-8")
    assert "SHX" in _man(page).stderr


def test_man_date_follows_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert '.TH TCPWATCH 1 "2023-11-14"' in manpage.render()
    # Without it the page carries no build date: built twice, it is the same page.
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert '.TH TCPWATCH 1 "" ' in manpage.render()


def _sections(page: str) -> dict[str, list[str]]:
    """Section title -> the option headings (the line after each .TP) in it."""
    sections: dict[str, list[str]] = {}
    title = ""
    lines = page.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(".SH "):
            title = line[4:]
            sections[title] = []
        elif line == ".TP" and index + 1 < len(lines) and lines[index + 1].startswith("\\fB\\-"):
            sections[title].append(lines[index + 1])
    return sections


def test_each_option_is_described_once_where_it_applies() -> None:
    """Issue 22 item 7: five sections repeated seven shared options each, and GLOBAL OPTIONS
    listed only -h and --version. Now a shared option is described once, under COMMON OPTIONS
    with the commands it applies to, and a command's section holds its own options only."""
    sections = _sections(manpage.render())
    headings = [heading for found in sections.values() for heading in found]
    common = sections["COMMON OPTIONS"]
    assert len(common) == 7
    assert all(headings.count(heading) == 1 for heading in common), headings
    # Options of the same name that are not the same option stay with their command: check's
    # -w (a warning threshold) and top's -w (a width); check's and rules' --format.
    assert sum("\\fB\\-w\\fR" in h for h in headings) == 2
    for name in _subcommands(build_parser()):
        own = sections[f"OPTIONS OF {name.upper()}"]
        assert not set(own) & set(common), (name, own)
    assert any("\\-\\-netns" in heading for heading in common)
    page = manpage.render()
    assert "Commands: metrics, check, serve, top." in page and "Commands: check, rules." in page


def test_help_shows_only_the_options_a_command_takes(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    rules = _subcommands(parser)["rules"].format_help()
    assert "--netns" not in rules and "--path.procfs" not in rules and "--log.level" not in rules
    assert "--config" in rules and "--docs-url" in rules
    assert "--docs-url" not in _subcommands(parser)["metrics"].format_help()
    from tcpwatch.cli import main

    assert main(["rules", "--netns", "all"]) == 3
    assert "unrecognized arguments: --netns" in capsys.readouterr().err


def _bash_complete(script: Path, words: list[str], cwd: Path) -> list[str]:
    """COMPREPLY for the command line ``words`` (the last word is the one being completed)."""
    program = (
        f"source {script}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))\n'
        "_tcpwatch\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        [_tool("bash"), "--norc", "--noprofile", "-c", program, "bash", *words],
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
        cwd=cwd,
        check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result
    return [line for line in result.stdout.splitlines() if line]


@pytest.fixture
def bash_script(tmp_path: Path) -> Path:
    script = tmp_path / "tcpwatch.bash"
    script.write_text(completion.bash(), encoding="utf-8")
    return script


def test_bash_completes_commands_flags_and_values(bash_script: Path, tmp_path: Path) -> None:
    assert _bash_complete(bash_script, ["tcpwatch", "ch"], tmp_path) == ["check"]
    assert set(_bash_complete(bash_script, ["tcpwatch", ""], tmp_path)) >= {
        "metrics",
        "check",
        "serve",
        "rules",
        "--version",
    }
    assert _bash_complete(bash_script, ["tcpwatch", "metrics", "--ou"], tmp_path) == ["--output"]
    assert _bash_complete(bash_script, ["tcpwatch", "check", "--format", ""], tmp_path) == [
        "text",
        "json",
    ]
    assert _bash_complete(bash_script, ["tcpwatch", "serve", "--log-level", "w"], tmp_path) == [
        "warning"
    ]
    # FILE completes files, DIR only directories; free-text values complete nothing.
    (tmp_path / "config.yaml").write_text("{}\n")
    (tmp_path / "conf.d").mkdir()
    assert set(
        _bash_complete(bash_script, ["tcpwatch", "serve", "--config", "conf"], tmp_path)
    ) == {
        "config.yaml",
        "conf.d",
    }
    assert _bash_complete(bash_script, ["tcpwatch", "check", "--procfs", "conf"], tmp_path) == [
        "conf.d"
    ]
    assert _bash_complete(bash_script, ["tcpwatch", "serve", "--listen", ""], tmp_path) == []


def test_bash_completes_node_exporter_flag_names(bash_script: Path, tmp_path: Path) -> None:
    (tmp_path / "host").mkdir()
    (tmp_path / "hosts.txt").write_text("x\n")
    words = ["tcpwatch", "check", "--path.rootfs", "ho"]
    assert _bash_complete(bash_script, words, tmp_path) == ["host"]
    assert _bash_complete(bash_script, ["tcpwatch", "check", "--log.format", ""], tmp_path) == [
        "logfmt",
        "json",
    ]
    assert _bash_complete(bash_script, ["tcpwatch", "check", "--color", "a"], tmp_path) == [
        "auto",
        "always",
    ]
    offered = _bash_complete(bash_script, ["tcpwatch", "serve", "--web."], tmp_path)
    assert sorted(offered) == ["--web.config.file", "--web.listen-address"]


@pytest.mark.parametrize("command", ["metrics", "check", "serve", "rules"])
def test_bash_offers_every_flag_of_each_command(
    bash_script: Path, tmp_path: Path, command: str
) -> None:
    offered = set(_bash_complete(bash_script, ["tcpwatch", command, "-"], tmp_path))
    assert offered == _all_flags()[command]


def test_zsh_script_parses_and_registers_with_compinit(tmp_path: Path) -> None:
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "_tcpwatch").write_text(completion.zsh(), encoding="utf-8")
    zsh = _tool("zsh")
    syntax = subprocess.run(
        [zsh, "-n", str(functions / "_tcpwatch")], capture_output=True, text=True, timeout=30
    )
    assert syntax.returncode == 0 and syntax.stderr == "", syntax
    program = (
        f"fpath=({functions} $fpath); autoload -Uz compinit; "
        f"compinit -u -d {tmp_path}/zcompdump; print -r -- $_comps[tcpwatch]; "
        "autoload +X _tcpwatch && print -r -- loaded"
    )
    env = dict(ENV, HOME=str(tmp_path), ZDOTDIR=str(tmp_path))
    result = subprocess.run(
        [zsh, "-f", "-c", program], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0 and result.stderr == "", result
    assert result.stdout.split() == ["_tcpwatch", "loaded"]
    for command, flags in _all_flags().items():
        for flag in flags:
            assert flag in completion.zsh(), (command, flag)


def test_generators_run_as_modules(tmp_path: Path) -> None:
    for module, args in (("tcpwatch.manpage", []), ("tcpwatch.completion", ["bash"])):
        result = subprocess.run(
            [sys.executable, "-m", module, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=dict(os.environ),
        )
        assert result.returncode == 0 and result.stdout, result
    assert completion.main(["fish"]) == 3
