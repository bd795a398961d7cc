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


def test_project_metadata_names_where_it_lives() -> None:
    project = _pyproject()["project"]
    assert {"Homepage", "Source", "Issues", "Documentation"} <= set(project["urls"])
    for url in project["urls"].values():
        assert url.startswith("https://github.com/OWNER/tcpwatch"), url
    classifiers = project["classifiers"]
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    # SPDX license expressions replace license classifiers (PEP 639): setuptools rejects both.
    assert not [c for c in classifiers if c.startswith("License ::")]


def test_containerfile_is_multi_stage_on_a_pinned_base_with_oci_labels() -> None:
    text = (KUBERNETES / "Containerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    # A release tag (3.11.11-slim-bookworm), not a moving one (3.11-slim, latest).
    assert re.search(r":3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?$", base.group(1))
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert stages == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert "COPY --from=build /opt/tcpwatch /opt/tcpwatch" in text
    labels = set(re.findall(r"org\.opencontainers\.image\.([a-z]+)=", text))
    assert {"title", "version", "revision", "licenses", "source", "description"} <= labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in text


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
