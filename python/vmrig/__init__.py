"""The names a vmrig test script sees.

This is a thin client: every call goes to the vmrig driver over a Unix
socket, one JSON line each way, and the driver does the work. The API is
the NixOS test driver's, so that scripts written for it run unchanged.
"""

import contextlib
import datetime
import json
import os
import socket
import sys
import time
import traceback
import unittest
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

Timeout = Union[None, int, float, datetime.timedelta]

#: The globals every script gets besides its nodes (and `machine` when
#: there is a single node).
DRIVER_GLOBALS = ["start_all", "subtest", "retry", "t", "log", "partition", "heal", "vlan", "vlans"]


class TestFailure(AssertionError):
    """The test's own failure: a command failed, a unit never came up."""


class InfrastructureError(Exception):
    """vmrig or QEMU failed; the test itself may be fine."""


class _Driver:
    def __init__(self, path: str) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.connect(path)
        self._stream = self._socket.makefile("rwb")
        self._next_id = 0

    def call(self, method: str, node: Optional[str] = None, **args: Any) -> Any:
        self._next_id += 1
        request = {"id": self._next_id, "method": method, "node": node, "args": args}
        self._stream.write(json.dumps(request).encode() + b"\n")
        self._stream.flush()
        line = self._stream.readline()
        if not line:
            raise InfrastructureError("the vmrig driver closed the connection")
        reply = json.loads(line)
        error = reply.get("error")
        if error is None:
            return reply.get("ok")
        if error["kind"] == "test":
            raise TestFailure(error["message"])
        raise InfrastructureError(error["message"])


def _seconds(timeout: Timeout) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return float(timeout)


class Machine:
    """One node of the test."""

    def __init__(self, driver: _Driver, node: Dict[str, Any]) -> None:
        self._driver = driver
        self.name: str = node["name"]
        #: The machine's first IPv4 and IPv6 addresses (None without a VLAN).
        self.ip: Optional[str] = node["ip"]
        self.ipv6: Optional[str] = node["ipv6"]

    def __repr__(self) -> str:
        return f"<Machine {self.name}>"

    def _call(self, method: str, **args: Any) -> Any:
        return self._driver.call(method, self.name, **args)

    def start(self) -> None:
        """Boots the machine, without waiting for it to be up."""
        self._call("start")

    def shutdown(self) -> None:
        """Powers the machine off cleanly and waits until it is off."""
        self._call("shutdown")

    def crash(self) -> None:
        """Cuts the machine's power at once."""
        self._call("crash")

    def reboot(self) -> None:
        """Reboots the machine and waits until it is up again."""
        self._call("reboot")

    def execute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: Timeout = 900,
    ) -> Tuple[int, str]:
        """Runs a shell command; returns its exit status and stdout."""
        result = self._call("execute", command=command, timeout=_seconds(timeout))
        return result["status"], result["stdout"] if check_output else ""

    def succeed(self, *commands: str, timeout: Timeout = None) -> str:
        """Runs each command, failing the test if one fails; returns their stdout."""
        return self._call("succeed", commands=list(commands), timeout=_seconds(timeout))

    def fail(self, *commands: str, timeout: Timeout = None) -> str:
        """Runs each command, failing the test if one succeeds."""
        return self._call("fail", commands=list(commands), timeout=_seconds(timeout))

    def wait_until_succeeds(self, command: str, timeout: Timeout = 900) -> str:
        """Repeats a command until it succeeds; returns its stdout."""
        return self._call("wait_until_succeeds", command=command, timeout=_seconds(timeout))

    def wait_until_fails(self, command: str, timeout: Timeout = 900) -> str:
        """Repeats a command until it fails; returns its stdout."""
        return self._call("wait_until_fails", command=command, timeout=_seconds(timeout))

    def wait_for_unit(self, unit: str, user: Optional[str] = None, timeout: Timeout = 900) -> None:
        """Waits until a systemd unit is active; fails if it fails or cannot start."""
        self._call("wait_for_unit", unit=unit, user=user, timeout=_seconds(timeout))

    def get_unit_info(self, unit: str, user: Optional[str] = None) -> Dict[str, str]:
        """The properties systemd reports for a unit."""
        return self._call("get_unit_info", unit=unit, user=user)

    def systemctl(self, q: str, user: Optional[str] = None) -> Tuple[int, str]:
        """Runs `systemctl q` (as `user`'s manager when given)."""
        result = self._call("systemctl", query=q, user=user)
        return result["status"], result["stdout"]

    def copy_from_host(self, source: str, target: str) -> None:
        """Copies a host file or directory into the machine."""
        self._call("copy_from_host", source=str(source), target=str(target))

    def copy_from_vm(self, source: str, target_dir: str = "") -> None:
        """Copies a file or directory of the machine into the test's result folder."""
        self._call("copy_from_vm", source=str(source), target_dir=str(target_dir))

    copy_from_machine = copy_from_vm

    def send_monitor_command(self, command: str) -> str:
        """Sends a command to QEMU's monitor; returns its output."""
        return self._call("send_monitor_command", command=command)

    def forward_port(self, host_port: int = 8080, guest_port: int = 80) -> int:
        """Forwards host_port on the host's loopback (127.0.0.1) to
        guest_port on the node's loopback, for the rest of the run.
        host_port 0 picks a free port. Returns the host port."""
        return int(self._call("forward_port", host_port=host_port, guest_port=guest_port))

    def block(self) -> None:
        """Cuts all of the machine's network links."""
        self._call("block")

    def unblock(self) -> None:
        """Restores the machine's network links."""
        self._call("unblock")

    def sleep(self, secs: float) -> None:
        """Waits, letting the machine run."""
        time.sleep(secs)


class Vlan:
    """One virtual Ethernet segment."""

    def __init__(self, driver: _Driver, number: int) -> None:
        self._driver = driver
        self.number = number

    def impair(
        self,
        delay: Timeout = None,
        jitter: Timeout = None,
        loss: float = 0.0,
        rate: Optional[int] = None,
    ) -> None:
        """Degrades every link of the VLAN: `delay` and `jitter` per frame,
        `loss` as a share of frames (0 to 1), `rate` in bits per second.
        Called without arguments, restores a clean link."""
        self._driver.call(
            "impair", vlan=self.number, delay=_seconds(delay), jitter=_seconds(jitter), loss=loss, rate=rate
        )


class _Log:
    """`log`: lines in the run's log."""

    def __init__(self, driver: _Driver) -> None:
        self._driver = driver

    def __call__(self, message: str) -> None:
        self._driver.call("log", message=str(message))

    info = warning = error = __call__


def _run(script: str, path: str, first_line: int) -> int:
    driver = _Driver(os.environ["VMRIG_DRIVER"])
    nodes = driver.call("nodes")
    machines = {node["python_name"]: Machine(driver, node) for node in nodes}
    log = _Log(driver)

    def start_all() -> None:
        driver.call("start_all")

    @contextlib.contextmanager
    def subtest(name: str):
        driver.call("log", message=f"subtest: {name}")
        yield

    def retry(fn: Callable[[bool], bool], timeout: Timeout = 900) -> None:
        deadline = time.monotonic() + (_seconds(timeout) or 900)
        while not fn(False):
            if time.monotonic() > deadline:
                fn(True)
                raise TestFailure("action timed out")
            time.sleep(1)

    def partition(*groups: List[Machine]) -> None:
        """Splits the network: machines in different groups cannot reach each
        other; machines in no group form one more group."""
        driver.call("partition", groups=[[m.name for m in group] for group in groups])

    def heal() -> None:
        """Ends a partition."""
        driver.call("heal")

    namespace: Dict[str, Any] = dict(machines)
    if len(machines) == 1:
        namespace["machine"] = next(iter(machines.values()))
    def vlan(number: int) -> Vlan:
        return Vlan(driver, number)

    namespace.update(
        start_all=start_all,
        subtest=subtest,
        retry=retry,
        t=unittest.TestCase(),
        log=log,
        partition=partition,
        heal=heal,
        vlan=vlan,
        vlans=sorted({v for node in nodes for v in node["vlans"]}),
    )
    namespace["__name__"] = "__vmrig_test__"
    assert set(DRIVER_GLOBALS) <= set(namespace)

    # Blank lines in front keep the script's line numbers those of the file
    # it is written in, so that tracebacks point at the right line.
    code = compile("\n" * (first_line - 1) + script, path, "exec")
    try:
        exec(code, namespace)
    except InfrastructureError as error:
        _print_traceback(error, path)
        return 3
    except BaseException as error:  # the script's own failure, whatever it raised
        _print_traceback(error, path)
        return 1
    return 0


def _print_traceback(error: BaseException, path: str) -> None:
    """Prints the traceback, keeping only the script's own frames."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    lines = ["Traceback (most recent call last):\n"]
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(error), error)
    sys.stdout.write("".join(lines))
    sys.stdout.flush()


def _main() -> None:
    with open(os.environ["VMRIG_SCRIPT"], encoding="utf-8") as script:
        text = script.read()
    code = _run(text, os.environ["VMRIG_SCRIPT_PATH"], int(os.environ["VMRIG_SCRIPT_FIRST_LINE"]))
    sys.stdout.flush()
    sys.exit(code)
