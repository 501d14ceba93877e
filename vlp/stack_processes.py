"""The processes of the team stack (`vlp.services`): who a PID is, who listens on a port.

A PID alone does not name a process: once it exits, the kernel hands the number to the next
one. `Proc` records what `/proc/<pid>/stat` and `/proc/<pid>/cmdline` say of a process when
the stack starts it (its start time, in clock ticks after boot, and its command line);
`running(proc)` is true only while that same process lives. Port checks read the kernel's
socket tables (`/proc/net/tcp`, `tcp6`) and the sockets each process holds
(`/proc/<pid>/fd`), so a port held by someone else is told apart from one held by the
server the stack started, or by a worker of it. Linux only, like the stack.

This module also starts servers (`spawn`: own process group, log file) and stops them
(`stop_group`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

STOP_TIMEOUT_S = 30.0
_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


@dataclass(frozen=True)
class Proc:
    """A process as the stack started it: PID, start time (clock ticks after boot), argv."""

    pid: int
    start: int
    cmd: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "start": self.start, "cmd": list(self.cmd)}

    @classmethod
    def from_json(cls, value: object) -> Proc:
        """A record of `to_json`; a bare PID (no identity recorded) matches no process."""
        if isinstance(value, dict):
            return cls(int(value["pid"]), int(value["start"]), tuple(value["cmd"]))
        return cls(int(value), -1, ())

    def describe(self) -> str:
        return f"PID {self.pid} ({' '.join(self.cmd)[:120]})" if self.cmd else f"PID {self.pid}"


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the command name, which may hold spaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2 :].split()


def identify(pid: int) -> Proc | None:
    """The live process with this PID, or None (no such process, or a zombie)."""
    fields = _stat_fields(pid)
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields is None or fields[0] == "Z":
        return None
    return Proc(pid, int(fields[19]), tuple(raw.decode(errors="replace").split("\0")[:-1]))


def reap(pid: int) -> None:
    """Collect the exit status of `pid` if it is our own exited child (else no-op)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def running(proc: Proc) -> bool:
    """Whether the process recorded as `proc` is alive (not merely its PID in other use)."""
    reap(proc.pid)
    return identify(proc.pid) == proc


def _in_tree(pid: int, root: int) -> bool:
    """Whether `pid` is `root`, in its process group, or descends from it."""
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root:
            return True
        fields = _stat_fields(pid)
        if fields is None:
            return False
        if int(fields[2]) == root:  # process group id
            return True
        pid, seen = int(fields[1]), seen + 1  # parent
    return False


def listening_sockets(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on `port` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == _LISTEN and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(cols[9]))
    return inodes


def socket_holders(inodes: set[int]) -> set[int]:
    """PIDs holding any of these socket inodes (those whose fds we may read)."""
    links = {f"socket:[{inode}]" for inode in inodes}
    holders = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
            if any(os.readlink(fd) in links for fd in fds):
                holders.add(int(entry.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return holders


def port_users(port: int) -> set[int] | None:
    """None if nothing listens on `port`; else the PIDs seen holding its listening socket
    (empty when they belong to a user whose processes we may not inspect)."""
    inodes = listening_sockets(port)
    return socket_holders(inodes) if inodes else None


def listener_of(port: int, pid: int) -> bool | None:
    """None if nothing listens on `port`; True if `pid`, its group or a descendant does;
    False if only others do."""
    users = port_users(port)
    if users is None:
        return None
    return any(_in_tree(user, pid) for user in users)


def describe_users(users: set[int]) -> str:
    """'PID 12 (cmd), ...' of the processes holding a port, for an error message."""
    found = [proc.describe() for proc in map(identify, sorted(users)) if proc is not None]
    return ", ".join(found) or "a process of another user"


def spawn(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> Proc:
    """Start `cmd` in its own process group (its PID is the group's id), logging to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        child = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # Popen returns once exec has begun, a moment before the kernel sets up the new argv
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        proc = identify(child.pid)
        if proc is None or proc.cmd:
            break
        time.sleep(0.001)
    return proc if proc is not None and proc.cmd else Proc(child.pid, -1, tuple(cmd))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: Proc, own_group: bool = True) -> bool:
    """SIGTERM `proc` (its whole group if it leads one), then SIGKILL what remains.

    Returns False, signalling nothing, when the PID now belongs to another process. A group
    whose leader has exited is still stopped: its id cannot be reused while it has members.
    """
    reap(proc.pid)
    now = identify(proc.pid)
    if now is not None and now != proc:
        return False

    def alive() -> bool:
        reap(proc.pid)
        if identify(proc.pid) == proc:
            return True
        return own_group and _group_alive(proc.pid)

    def signal_all(sig: int) -> None:
        try:
            if own_group:
                os.killpg(proc.pid, sig)
            elif identify(proc.pid) == proc:
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        if not alive():
            return True
        signal_all(sig)
        deadline = time.monotonic() + wait_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    return True
