"""One boot of the test guest under QEMU, software-emulated.

TCG only: /dev/kvm exists on the CI machines but nested KVM hangs at kernel
start. The cached image is never written: the guest's root is a per-run qcow2
overlay backed by it. The .deb and checks.sh arrive on a second, read-only
disk; results leave through virtio-serial ports that QEMU writes to files the
host follows while the guest runs (the serial console is only a boot log: its
getty hangs it up). The guest's network is QEMU's user mode with
restrict=on and no port forwards: nothing leaves the guest, nothing enters.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from image import Image

RESULTS_PORT = "org.sandboxd.results"
JOURNAL_PORT = "org.sandboxd.journal"
MEMORY_MB = 2048
CPUS = 2


@dataclasses.dataclass(frozen=True)
class Run:
    out: Path  # everything of this run: overlay, payload disk, logs

    @property
    def overlay(self) -> Path:
        return self.out / "root.qcow2"

    @property
    def payload(self) -> Path:
        return self.out / "payload.img"

    @property
    def results(self) -> Path:
        return self.out / "results.log"

    @property
    def journal(self) -> Path:
        return self.out / "journal.log"

    @property
    def console(self) -> Path:
        return self.out / "console.log"


def make_payload(run: Run, files: dict[str, Path]) -> None:
    """A small read-only ext4 disk holding the given files at its top level."""
    staging = run.out / "payload"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, staging / name)
    run.payload.write_bytes(b"")  # an existing file: mke2fs does not announce creating it
    size_mb = 64 + sum(p.stat().st_size for p in staging.iterdir()) * 2 // 2**20
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "payload", "-d", str(staging),
         str(run.payload), f"{size_mb}M"],
        check=True,
    )  # fmt: skip
    shutil.rmtree(staging)


def qemu_command(image: Image, run: Run) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(CPUS), "-m", str(MEMORY_MB),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        # The journal goes to the console too: console.log shows what the guest
        # did even when it never gets to write its journal to the port.
        "-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet systemd.show_status=0"
        " systemd.journald.forward_to_console=1",
        "-drive", f"file={run.overlay},format=qcow2,if=virtio,cache=unsafe",
        "-drive", f"file={run.payload},format=raw,if=virtio,readonly=on",
        "-netdev", "user,id=net0,restrict=on", "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-rng-pci",
        "-device", "virtio-serial-pci",
        "-chardev", f"file,id=results,path={run.results}",
        "-device", f"virtserialport,chardev=results,name={RESULTS_PORT}",
        "-chardev", f"file,id=journal,path={run.journal}",
        "-device", f"virtserialport,chardev=journal,name={JOURNAL_PORT}",
        "-serial", f"file:{run.console}",
    ]  # fmt: skip


def boot(image: Image, run: Run, timeout: float, on_line: Callable[[str], None]) -> bool:
    """Boot until the guest powers off; pass each results line on as it arrives.

    False if the guest had to be killed at the timeout.
    """
    run.overlay.unlink(missing_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "raw",
         str(run.overlay)],
        check=True,
    )  # fmt: skip
    for log in (run.results, run.journal, run.console):
        log.write_bytes(b"")
    deadline = time.monotonic() + timeout
    with (
        subprocess.Popen(qemu_command(image, run), stdin=subprocess.DEVNULL) as qemu,
        run.results.open() as results,
    ):
        pending = ""
        while True:
            exited = qemu.poll() is not None
            pending += results.read()
            *lines, pending = pending.split("\n")
            for line in lines:
                on_line(line)
            if exited:
                if pending:
                    on_line(pending)
                return True
            if time.monotonic() > deadline:
                qemu.kill()
                qemu.wait()
                return False
            time.sleep(0.5)
