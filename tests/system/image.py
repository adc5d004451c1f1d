"""The cached Debian 12 guest image the system test boots.

Built with debootstrap from the mirror this machine's apt sources name (read
at run time, never written into the repository), turned into a raw ext4 disk
without loop devices (`mke2fs -d`), and cached outside the git tree under a
directory named by a hash of every input: the package list, the mirror, this
file and the guest runner. A changed input builds a new image; stale ones are
pruned. Everything the .deb depends on is installed here, because the guest
has no network: `apt install ./sandboxd_*.deb` resolves from what is staged.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
HERE = Path(__file__).resolve().parent
GUEST = HERE / "guest"
DISK_SIZE = "4G"

# What a Debian 12 host running sandboxd has, plus what the checks use.
PACKAGES = (
    # boot and operate: systemd as PID 1, D-Bus for pystemd, udev for /dev/virtio-ports
    "systemd", "systemd-sysv", "dbus", "udev", "linux-image-amd64", "kmod",
    # the .deb's Depends and Recommends (see packaging/debian/control)
    "python3", "python3-seccomp", "python3-pystemd", "libseccomp2", "libsystemd0",
    "adduser", "iproute2", "nftables", "nodejs", "python3-pip",
    "python3-jinja2", "python3-requests", "python3-httpx",
    "python3-numpy", "python3-pandas", "python3-matplotlib",
    # the proxied check runs its own squid (the packaged service is masked below)
    "squid",
    # the checks: HTTP client, ps/pkill, runuser (util-linux is already essential)
    "curl", "procps",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Image:
    disk: Path  # raw ext4, root of the guest; never written (boots through an overlay)
    kernel: Path
    initrd: Path


def mirror_url() -> str:
    """The Debian mirror of this machine's apt sources (deb822 or one-line format)."""
    texts = [Path(p).read_text() for p in sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", ""):
                return fields["URIs"].split()[0]
    sources_list = Path("/etc/apt/sources.list")
    if sources_list.exists():
        for line in sources_list.read_text().splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line).split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1]
    raise SystemExit(f"no '{SUITE}' deb source in /etc/apt/sources.list(.d): cannot debootstrap")


def cache_key(mirror: str) -> str:
    digest = hashlib.sha256()
    for part in (SUITE, mirror, DISK_SIZE, *PACKAGES):
        digest.update(part.encode() + b"\0")
    for path in sorted([Path(__file__), *GUEST.iterdir()]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def ensure(cache_root: Path, log: Path) -> tuple[Image, bool]:
    """The image for the current inputs, and whether it had to be built now."""
    mirror = mirror_url()
    entry = cache_root / cache_key(mirror)
    image = Image(entry / "root.raw", entry / "vmlinuz", entry / "initrd.img")
    if (entry / "complete").exists():
        return image, False
    cache_root.mkdir(parents=True, exist_ok=True)
    work = cache_root / f".build-{entry.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        _build(work, mirror, log)
        (work / "complete").write_text(mirror + "\n")
        shutil.rmtree(entry, ignore_errors=True)
        work.rename(entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for stale in cache_root.iterdir():
        if stale != entry and not stale.name.startswith(".build-"):
            shutil.rmtree(stale, ignore_errors=True)
    return image, True


def _build(work: Path, mirror: str, log: Path) -> None:
    root = work / "rootfs"
    with log.open("ab") as out:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--components=main",
             "--include=" + ",".join(PACKAGES), SUITE, str(root), mirror],
            stdout=out, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
        _configure(root)
        kernel = sorted(root.glob("boot/vmlinuz-*"))[-1]
        initrd = sorted(root.glob("boot/initrd.img-*"))[-1]
        shutil.copy(kernel, work / "vmlinuz")
        shutil.copy(initrd, work / "initrd.img")
        subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-d", str(root),
             str(work / "root.raw"), DISK_SIZE],
            stdout=out, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    shutil.rmtree(root)


def _configure(root: Path) -> None:
    (root / "etc/hostname").write_text("sandboxd-test\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 sandboxd-test\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    # Let systemd create a fresh machine id on first boot of every overlay.
    (root / "etc/machine-id").write_text("")
    # Not named sandboxd*: the checks assert that no such unit is left.
    shutil.copy(GUEST / "systemtest-runner", root / "usr/local/sbin/systemtest-runner")
    units = root / "etc/systemd/system"
    shutil.copy(GUEST / "systemtest-runner.service", units / "systemtest-runner.service")
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "systemtest-runner.service").symlink_to("../systemtest-runner.service")
    # No login prompt on the serial console: nobody logs in, and its hangup
    # would only garble the boot log the harness keeps.
    (units / "serial-getty@ttyS0.service").symlink_to("/dev/null")
    # The proxied check starts a squid of its own; the packaged one would only slow boot.
    (units / "squid.service").symlink_to("/dev/null")
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
