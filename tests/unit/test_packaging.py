"""Packaging hygiene: license, version in one place, project metadata, container and Kubernetes
manifests that agree with each other."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

import tcpwatch

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def _documents(path: Path) -> dict[str, dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return {document["kind"]: document for document in yaml.safe_load_all(handle)}


def test_license_is_an_spdx_string_matching_the_license_file() -> None:
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    # PEP 639 license expressions need setuptools 77 or later.
    [requirement] = _pyproject()["build-system"]["requires"]
    assert requirement == "setuptools>=77"


def test_version_is_written_only_in_the_package() -> None:
    pyproject = _pyproject()
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tcpwatch.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", tcpwatch.__version__)
    assert metadata.version("tcpwatch") == tcpwatch.__version__


def test_project_metadata_names_no_home_it_does_not_have() -> None:
    project = _pyproject()["project"]
    # No published home yet: no Homepage, Source or Issues URL rather than placeholders.
    assert "urls" not in project
    classifiers = project["classifiers"]
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    # SPDX license expressions replace license classifiers (PEP 639): setuptools rejects both.
    assert not [c for c in classifiers if c.startswith("License ::")]


def test_containerfile_is_multi_stage_on_a_base_pinned_by_digest_with_oci_labels() -> None:
    text = (KUBERNETES / "Containerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    # A release tag (3.11.16-slim-bookworm), not a moving one, and its digest (issue 16 item 5).
    assert re.search(r":3\.\d+\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}$", base.group(1))
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert stages == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert "COPY --from=build /opt/tcpwatch /opt/tcpwatch" in text
    labels = set(re.findall(r"org\.opencontainers\.image\.([a-z]+)=", text))
    assert {"title", "version", "revision", "licenses", "description"} <= labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in text
    # The pinned dependencies, hash-checked; tcpwatch's wheel built with the pinned setuptools.
    installs = " ".join(text.split("\\\n")).splitlines()
    runtime = [line for line in installs if "requirements/runtime.txt" in line and "pip" in line]
    assert runtime and all("--require-hashes" in line for line in runtime)
    assert any("--no-build-isolation" in line for line in installs)
    # The rule pages the image serves at /rules/ID come along with the package.
    assert "COPY docs/rules /src/docs/rules" in text


def test_daemonset_names_the_image_the_containerfile_builds() -> None:
    text = (KUBERNETES / "Containerfile").read_text(encoding="utf-8")
    built = re.search(r"-t (\S+) \.$", text, re.MULTILINE)
    assert built is not None
    spec = _documents(KUBERNETES / "tcpwatch-daemonset.yml")["DaemonSet"]["spec"]["template"]
    [container] = spec["spec"]["containers"]
    assert container["image"] == built.group(1) == f"tcpwatch:{tcpwatch.__version__}"
    # A bare name would be pulled from Docker Hub, where no tcpwatch of ours is published.
    assert container["imagePullPolicy"] == "Never"
    fleet = (ROOT / "docs" / "fleet.md").read_text(encoding="utf-8")
    assert f"docker push REGISTRY/tcpwatch:{tcpwatch.__version__}" in fleet


def test_daemonset_has_a_priority_class_that_exists() -> None:
    documents = _documents(KUBERNETES / "tcpwatch-daemonset.yml")
    priority = documents["PriorityClass"]
    spec = documents["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == priority["metadata"]["name"]
    # Above ordinary pods (0), below system-cluster-critical (2000000000).
    assert 0 < priority["value"] < 1_000_000_000
    assert priority["globalDefault"] is False


def test_podmonitor_selects_the_daemonset_pods_and_their_port() -> None:
    daemonset = _documents(KUBERNETES / "tcpwatch-daemonset.yml")
    pod = daemonset["DaemonSet"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    [port] = container["ports"]
    monitor = _documents(KUBERNETES / "tcpwatch-podmonitor.yml")["PodMonitor"]
    spec = monitor["spec"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["namespaceSelector"]["matchNames"] == [daemonset["Namespace"]["metadata"]["name"]]
    assert monitor["metadata"]["namespace"] == daemonset["Namespace"]["metadata"]["name"]
    [endpoint] = spec["podMetricsEndpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == pod["metadata"]["annotations"]["prometheus.io/path"]
    # Same job and instance labels as the annotation-based scrape job.
    assert {"targetLabel": "job", "replacement": "tcpwatch"} in endpoint["relabelings"]
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_node_name"],
        "targetLabel": "instance",
    } in endpoint["relabelings"]


def test_debian_package_version_is_the_package_version() -> None:
    first = (ROOT / "debian" / "changelog").read_text(encoding="utf-8").splitlines()[0]
    match = re.fullmatch(r"tcpwatch \(([^)]+)\) \S+; urgency=\w+", first)
    assert match is not None, first
    # A native package: the Debian version is the upstream version, possibly with a +debN suffix.
    assert match.group(1).split("+")[0] == tcpwatch.__version__


def test_daemonset_reads_the_nodes_sysctl_files_through_rootfs() -> None:
    # Issue 11: K03 and the persisted-sysctl notes must describe the node, not the image.
    pod = _documents(KUBERNETES / "tcpwatch-daemonset.yml")["DaemonSet"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    (rootfs,) = [arg for arg in container["args"] if arg.startswith("--path.rootfs=")]
    mount_path = rootfs.split("=", 1)[1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["path"] == "/"
    from tcpwatch.cli import build_parser

    args = build_parser().parse_args(container["args"])
    assert args.rootfs == mount_path


# -- nothing shipped points nowhere (issue 22 item 1) ---------------------------------------------

SHIPPED = ("tcpwatch", "deploy", "debian", "docs", "requirements", "scripts")
SHIPPED_FILES = ("README.md", "config.example.yaml", "pyproject.toml")
# A repository owner left as a placeholder (github.com/OWNER/..., ghcr.io/OWNER/...).
OWNER_PLACEHOLDER = re.compile(r"\bOWNER/|/OWNER\b")
URL_HOST = re.compile(r"\b(?:https?|ftp)://([^/\s\"'`<>)\]|]+)")
EMAIL_HOST = re.compile(r"[\w.+-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")


def placeholder_host(host: str) -> bool:
    """A name reserved never to resolve (RFC 2606 and 6761: example.com, .example, .invalid,
    .test) or another example name (web-1.example.internal).

    >>> [placeholder_host(h) for h in ("example.com:443", "x.example.internal", "localhost:9477")]
    [True, True, False]
    """
    name = host.rsplit("@", 1)[-1].split(":", 1)[0].lower().rstrip(".")
    labels = name.split(".")
    return "example" in labels or labels[-1] in ("invalid", "test")


def shipped_text_files() -> list[Path]:
    files = [ROOT / name for name in SHIPPED_FILES]
    for directory in SHIPPED:
        for path in sorted((ROOT / directory).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".png":
                files.append(path)
    return files


def followed_lines(text: str, markdown: bool) -> list[tuple[int, str]]:
    """(line number, text) of every line a reader or a program follows: for Markdown, outside
    fenced code blocks (those are configuration to adapt, `targets: [web-1...]`)."""
    lines: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if markdown and line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def placeholders(text: str, markdown: bool = False) -> list[str]:
    """What in ``text`` points at a placeholder: "OWNER", or "LINE: host" for each example host
    in a URL or an e-mail address."""
    found = ["OWNER"] if OWNER_PLACEHOLDER.search(text) else []
    for number, line in followed_lines(text, markdown):
        hosts = URL_HOST.findall(line) + EMAIL_HOST.findall(line)
        found += [f"{number}: {host}" for host in hosts if placeholder_host(host)]
    return found


def links_in(path: Path) -> list[tuple[int, str]]:
    return followed_lines(path.read_text(encoding="utf-8"), path.suffix == ".md")


def test_nothing_shipped_points_at_a_placeholder() -> None:
    problems = []
    files = shipped_text_files()
    assert any(path.name == "tcpwatch-alerts.yml" for path in files)
    for path in files:
        text = path.read_text(encoding="utf-8")
        found = placeholders(text, markdown=path.suffix == ".md")
        problems += [f"{path.relative_to(ROOT)}:{where}" for where in found]
    assert problems == []


def test_the_placeholder_check_catches_what_it_is_for(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "See https://github.com/OWNER/tcpwatch/blob/main/x.md and https://docs.example.com/x\n"
        "```yaml\nurl: https://mimir.example.internal/push\n```\nmail root@localhost\n"
    )
    text = page.read_text()
    assert OWNER_PLACEHOLDER.search(text)
    hosts = [h for _, line in links_in(page) for h in URL_HOST.findall(line)]
    assert [h for h in hosts if placeholder_host(h)] == ["docs.example.com"]
    assert not placeholder_host("localhost")
    assert EMAIL_HOST.findall("Maintainer: x <tcpwatch@example.invalid>") == ["example.invalid"]
    assert placeholder_host("example.invalid")


# -- pinned dependencies for the Debian package and the image (issue 16 item 5) -------------------

PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)")


def pins(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) in a pip-compile --generate-hashes file."""
    found: dict[str, tuple[str, int]] = {}
    current = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line)
        if match:
            current = match.group(1).lower().replace("_", "-")
            found[current] = (match.group(2), 0)
        elif "--hash=sha256:" in line and current:
            version, hashes = found[current]
            found[current] = (version, hashes + 1)
    return found


def test_locked_dependencies_are_exact_hashed_and_within_pyprojects_ranges() -> None:
    from packaging.requirements import Requirement

    requirements = [Requirement(text) for text in _pyproject()["project"]["dependencies"]]
    locked = pins(ROOT / "requirements" / "runtime.txt")
    assert set(locked) == {r.name.lower() for r in requirements}  # none transitive, none extra
    for requirement in requirements:
        version, hashes = locked[requirement.name.lower()]
        assert requirement.specifier.contains(version), (requirement, version)
        assert hashes >= 1, requirement.name
    [(name, (version, hashes))] = pins(ROOT / "requirements" / "build.txt").items()
    [build_requirement] = _pyproject()["build-system"]["requires"]
    assert name == "setuptools" and Requirement(build_requirement).specifier.contains(version)
    assert hashes >= 1


def test_debian_rules_builds_from_the_locked_requirements() -> None:
    rules = (ROOT / "debian" / "rules").read_text(encoding="utf-8")
    commands = " ".join(rules.split("\\\n")).splitlines()
    pip_lines = [line for line in commands if "$(PIP)" in line]
    runtime = [line for line in pip_lines if "requirements/runtime.txt" in line]
    build = [line for line in pip_lines if "requirements/build.txt" in line]
    assert runtime and all("--require-hashes" in line and "--no-deps" in line for line in runtime)
    assert build and all("--require-hashes" in line for line in build)
    # tcpwatch's own wheel: pinned setuptools, never its dependencies from the index.
    wheel = [line for line in pip_lines if " wheel " in line]
    assert wheel and all("--no-build-isolation" in line and "--no-deps" in line for line in wheel)
    assert all("--no-deps" in line or "-r requirements/" in line for line in pip_lines)
