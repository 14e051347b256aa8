"""scripts/host_pip_conf.py: the host's pip configuration, carried into the container-test build."""

from __future__ import annotations

from pathlib import Path

import pytest

# This machine's `pip config list`, as it prints it (files, then PIP_* variables as `:env:`).
MIRRORS = "file:///opt/pypi/simple file:///opt/pypi-more/simple"
HOST = f"""\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='{MIRRORS}'
global.find-links='/opt/wheels'
"""


@pytest.mark.parametrize(
    ("listed", "options"),
    [
        # The host: variables and files agree; one [global] section results.
        (
            HOST,
            {
                ("global", "cert"): "/etc/ssl/certs/ca-certificates.crt",
                ("global", "default-timeout"): "180",
                ("global", "find-links"): "/opt/wheels",
                ("global", "constraint"): "/etc/xdg/pip/constraints.txt",
                ("global", "extra-index-url"): MIRRORS,
            },
        ),
        # A variable wins over every file's option of that name, in any section (as in pip).
        (
            "install.find-links='/from/file'\n:env:.find-links='/from/env'\n",
            {("global", "find-links"): "/from/env"},
        ),
        # Options of other sections stay in them; double quotes are Python reprs too.
        ('install.no-binary="x"\n', {("install", "no-binary"): "x"}),
        # Lines that are not `section.option=value` (pip's warnings) are ignored.
        ("WARNING: something\n\n", {}),
    ],
)
def test_config_list_to_options(host_pip_conf, listed, options):
    assert host_pip_conf.parse_config_list(listed) == options


@pytest.mark.parametrize(
    ("option", "value", "mounted"),
    [
        ("find-links", "/opt/wheels", ["/opt/wheels"]),  # a folder of wheels
        ("find-links", "file:///srv/links/index.html", ["/srv/links"]),  # a page: its folder
        # A PEP 503 index links ../../files/...: its parent holds both.
        ("extra-index-url", "file:///opt/a/simple file:///opt/b/simple", ["/opt/a", "/opt/b"]),
        ("index-url", "https://pypi.org/simple", []),  # reached over the network
        ("constraint", "/etc/xdg/pip/constraints.txt", ["/etc/xdg/pip/constraints.txt"]),
        ("find-links", "wheels", []),  # relative to pip's working directory: meaningless there
        ("cert", "/etc/ssl/certs/ca-certificates.crt", []),  # the base's own bundle (below)
        ("find-links", "file:///opt/my%20wheels", ["/opt/my wheels"]),
    ],
)
def test_local_paths_to_mount(host_pip_conf, option, value, mounted):
    paths = host_pip_conf.mounts({("global", option): value})
    assert paths == [Path(p) for p in mounted]


def test_rendered_conf_points_cert_at_the_containers_bundle(host_pip_conf):
    """The base trusts the host's CAs, so pip there uses the system bundle, wherever the host's
    `cert` lies (a file the build cannot see)."""
    listed = "global.cert='/home/me/proxy-ca.pem'\ninstall.no-compile='1'\n" + HOST.replace(
        ":env:.cert='/etc/ssl/certs/ca-certificates.crt'\n", ""
    ).replace("global.cert='/etc/ssl/certs/ca-certificates.crt'\n", "")
    text = host_pip_conf.render(host_pip_conf.parse_config_list(listed))
    assert text.splitlines() == [
        "[global]",
        "cert = /etc/ssl/certs/ca-certificates.crt",
        "constraint = /etc/xdg/pip/constraints.txt",
        "default-timeout = 180",
        f"extra-index-url = {MIRRORS}",
        "find-links = /opt/wheels",
        "[install]",
        "no-compile = 1",
    ]
