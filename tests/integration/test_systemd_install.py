"""Install and unit checks, no manager needed:

- `meson install --destdir` of the build: every file lands where the system's
  pkg-config files (systemd, dbus-1, polkit-gobject-1, bash-completion) say,
  binaries under prefix,
  and the installed units and activation file name the installed binaries.
- A fresh configure with every location option overridden installs there instead.
- `systemd-analyze verify` passes, without a single warning, on every unit.
- `systemd-analyze security` rates loopd.service at 2.5 or better.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import harness
from harness import run
from test_systemd_manager import BUILD, SRC, generate

EXPOSURE_LIMIT = 2.5


class TempEnv:
    def __enter__(self):
        self.tmp = tempfile.mkdtemp(dir="/var/tmp", prefix="loopd-install-")
        return self

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def __exit__(self, *exc):
        subprocess.run(["rm", "-rf", self.tmp], check=False)
        return False


def pkg(module, variable):
    return run("pkg-config", f"--variable={variable}", module).stdout.strip()


def build_options(build):
    options = json.loads(run("meson", "introspect", "--buildoptions", build).stdout)
    return {o["name"]: o["value"] for o in options}


def expected_files(options):
    """Where each file must land, worked out here from pkg-config and the options,
    independently of meson.build."""
    prefix = options["prefix"]
    under = lambda d: os.path.join(prefix, d)  # noqa: E731 (absolute d stays as is)
    units = options["systemdsystemunitdir"] or pkg("systemd", "systemdsystemunitdir")
    services = options["dbus_system_services_dir"] or pkg("dbus-1", "system_bus_services_dir")
    policy = options["dbus_system_policy_dir"] or os.path.join(pkg("dbus-1", "datadir"), "dbus-1/system.d")
    interfaces = options["dbus_interfaces_dir"] or pkg("dbus-1", "interfaces_dir")
    polkit = options["polkit_actions_dir"] or pkg("polkit-gobject-1", "policydir")
    images = options["images_config_dir"] or os.path.join(under(options["sysconfdir"]), "loopd/images")
    completions = options["bash_completions_dir"] or pkg("bash-completion", "completionsdir")
    generators = options["systemdsystemgeneratordir"] or pkg("systemd", "systemdsystemgeneratordir")
    udev = options["udev_rules_dir"] or os.path.join(pkg("udev", "udevdir"), "rules.d")
    return {
        "loopd": os.path.join(under(options["sbindir"]), "loopd"),
        "loopctl": os.path.join(under(options["bindir"]), "loopctl"),
        "loopd.service": os.path.join(units, "loopd.service"),
        "loopd-image@.service": os.path.join(units, "loopd-image@.service"),
        "activation": os.path.join(services, "org.loopd1.service"),
        "policy": os.path.join(policy, "org.loopd1.conf"),
        "interface": os.path.join(interfaces, "org.loopd1.xml"),
        "polkit": os.path.join(polkit, "org.loopd1.policy"),
        "images": images,
        "completion": os.path.join(completions, "loopctl"),
        "udev rule": os.path.join(udev, "90-loopd.rules"),
        "generator": os.path.join(generators, "loopd-image-generator"),
    }


def check_installed(destdir, files, data_only=False):
    for what, path in files.items():
        if data_only and what in ("loopd", "loopctl"):
            continue
        landed = destdir + path
        if what == "images":
            assert os.path.isdir(landed), f"{what}: no directory {path}"
        elif what in ("loopd", "loopctl", "generator"):
            assert os.access(landed, os.X_OK), f"{what}: no executable {path}"
        else:
            assert os.path.isfile(landed), f"{what}: {path} not installed (in {destdir})"

    def read(what):
        return harness.read_text(destdir + files[what])
    assert f"ExecStart={files['loopd']} " in read("loopd.service"), read("loopd.service")
    assert f"Exec={files['loopd']}\n" in read("activation") + "\n", read("activation")
    assert "SystemdService=loopd.service" in read("activation")
    image_unit = read("loopd-image@.service")
    assert f"ExecStart={files['loopctl']} attach --hold --ref=%i --config={files['images']}/%i.conf" \
        in image_unit, image_unit
    assert f'confdir="${{LOOPD_IMAGES_DIR:-{files["images"]}}}"' in read("generator"), read("generator")
    for what in ("loopd.service", "loopd-image@.service", "activation", "generator"):
        left = re.findall(r"@[A-Za-z_]+@", read(what))
        assert not left, f"{what} has unsubstituted {left}"


def test_install_to_pkg_config_dirs(env):
    destdir = env.path("root")
    run("meson", "install", "-C", BUILD, "--destdir", destdir, "--no-rebuild", "--quiet")
    options = build_options(BUILD)
    check_installed(destdir, expected_files(options))
    # The man pages (scdoc is one of scripts/deps.sh's packages; -Dman=auto).
    if options["man"] != "disabled" and shutil.which("scdoc"):
        mandir = os.path.join(options["prefix"], options["mandir"])
        for page in ("man8/loopd.8", "man1/loopctl.1"):
            path = destdir + os.path.join(mandir, page)
            assert os.path.isfile(path) and harness.read_text(path).startswith(".\\\" Generated by scdoc"), \
                f"{page} not installed in {mandir}"


def test_install_locations_can_be_overridden(env):
    overrides = {
        "prefix": "/opt/loopd",
        "systemdsystemunitdir": "/x/units",
        "dbus_system_services_dir": "/x/dbus/services",
        "dbus_system_policy_dir": "/x/dbus/policy",
        "dbus_interfaces_dir": "/x/dbus/interfaces",
        "polkit_actions_dir": "/x/polkit",
        "images_config_dir": "/x/images",
        "bash_completions_dir": "/x/completions",
        "udev_rules_dir": "/x/udev",
        "systemdsystemgeneratordir": "/x/generators",
    }
    build = env.path("build")
    run("meson", "setup", build, SRC, *[f"-D{k}={v}" for k, v in overrides.items()], timeout=300)
    destdir = env.path("root")
    # Only the configured files: no need to compile anything for where they land.
    run("meson", "install", "-C", build, "--destdir", destdir, "--no-rebuild", "--quiet",
        "--tags", "systemd,dbus,polkit,config,completion,udev")
    options = build_options(build)
    assert all(options[k] == v for k, v in overrides.items()), options
    files = expected_files(options)
    assert files["loopd"] == "/opt/loopd/sbin/loopd" and files["images"] == "/x/images", files
    check_installed(destdir, files, data_only=True)
    # Nothing went to the pkg-config locations.
    assert not os.path.exists(destdir + pkg("systemd", "systemdsystemunitdir")), \
        "units installed to systemd.pc's directory despite -Dsystemdsystemunitdir"


def units_with_build_paths(env):
    """The units as installed, but naming the built binaries (verify checks that
    ExecStart= programs exist)."""
    d = env.path("units")
    os.makedirs(d)
    generate(os.path.join(SRC, "systemd-units/loopd.service.in"), os.path.join(d, "loopd.service"),
             sbindir=BUILD)
    generate(os.path.join(SRC, "systemd-units/loopd-image@.service.in"),
             os.path.join(d, "loopd-image@.service"), bindir=BUILD, imagesdir="/etc/loopd/images")
    return d


def test_systemd_analyze_verify_every_unit(env):
    d = units_with_build_paths(env)
    units = [os.path.join(d, "loopd.service"), os.path.join(d, "loopd-image@foo.service")]
    # loopd-image-generator is a program, not a unit (test_systemd.py runs it).
    assert sorted(f for f in os.listdir(os.path.join(SRC, "systemd-units")) if not f.endswith("-generator.in")) == \
        ["loopd-image@.service.in", "loopd.service.in"], "a new unit needs verifying here too"
    p = run("systemd-analyze", "verify", *units, check=False)
    # verify exits 0 on many problems (unknown settings, bad values): any output fails.
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), \
        f"systemd-analyze verify ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}"


def test_security_exposure(env):
    d = units_with_build_paths(env)
    out = run("systemd-analyze", "security", "--offline=yes", "--no-pager",
              os.path.join(d, "loopd.service")).stdout
    score = float(re.search(r"Overall exposure level for loopd.service: ([0-9.]+)", out).group(1))
    print(f"# systemd-analyze security --offline loopd.service: {score}")
    assert score <= EXPOSURE_LIMIT, f"loopd.service exposure {score} > {EXPOSURE_LIMIT}:\n{out}"


if __name__ == "__main__":
    from test_systemd_manager import main
    main(globals(), env_factory=TempEnv)
