"""The names a vmrig test script sees.

This is a thin client: every call goes to the vmrig driver over a Unix
socket, one JSON line each way, and the driver does the work. The API is
the NixOS test driver's, so that scripts written for it run unchanged.
"""

import contextlib
import datetime
import json
import os
import re
import shlex
import socket
import sys
import threading
import time
import traceback
import unittest
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

Timeout = Union[None, int, float, datetime.timedelta]

#: The globals every script gets besides its nodes (and `machine` when
#: there is a single node). `vmrig check` reads this list from this file.
DRIVER_GLOBALS = [
    "start_all",
    "join_all",
    "subtest",
    "retry",
    "polling_condition",
    "serial_stdout_on",
    "serial_stdout_off",
    "t",
    "log",
    "partition",
    "heal",
    "vlan",
    "vlans",
    "machines",
    "driver",
    "os",
    "Machine",
    "BaseMachine",
    "machines_qemu",
    "machines_nspawn",
    "test_script",
    "run_tests",
    "create_machine",
    "debug",
]


class TestFailure(AssertionError):
    """The test's own failure: a command failed, a unit never came up."""


class InfrastructureError(Exception):
    """vmrig or QEMU failed; the test itself may be fine."""


class _Driver:
    """The connection to the driver. Each thread of the script gets one of
    its own, so that threads driving different machines are served side
    by side and each gets its own answers."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._local = threading.local()
        #: The conditions of the `polling_condition` blocks being run.
        self.polling_conditions: List["PollingCondition"] = []

    def _stream(self) -> Any:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.connect(self._path)
            stream = self._local.stream = connection.makefile("rwb")
            self._local.next_id = 0
        return stream

    def check_polling_conditions(self) -> None:
        for condition in list(self.polling_conditions):
            condition.maybe_raise()

    def call(self, method: str, node: Optional[str] = None, **args: Any) -> Any:
        stream = self._stream()
        self._local.next_id += 1
        request = {"id": self._local.next_id, "method": method, "node": node, "args": args}
        stream.write(json.dumps(request).encode() + b"\n")
        stream.flush()
        while True:
            line = stream.readline()
            if not line:
                raise InfrastructureError("the vmrig driver closed the connection")
            reply = json.loads(line)
            # A command's output follows its reply as it is (see the
            # driver's api module).
            output = stream.read(reply["output"]) if "output" in reply else None
            # A reply to a call abandoned at the prompt (Ctrl-C) comes first.
            if reply.get("id") == self._local.next_id:
                break
        error = reply.get("error")
        if error is None:
            result = reply.get("ok")
            if output is None:
                return result
            # The output is the result, or its stdout.
            text = output.decode("utf-8", errors="replace")
            if result is None:
                return text
            result["stdout"] = text
            return result
        if error["kind"] == "test":
            raise TestFailure(error["message"])
        raise InfrastructureError(error["message"])


def _seconds(timeout: Timeout) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return float(timeout)


#: What a machine has besides its methods and properties; `vmrig check`
#: reads this.
MACHINE_ATTRIBUTES = ["name", "ip", "ipv6", "out_dir", "tmp_dir", "shared_dir", "keep_machine_state", "callbacks", "logger", "process", "monitor_path"]


class Machine:
    """One node of the test, with the attributes NixOS's `Machine` has."""

    def __init__(self, driver: _Driver, node: Dict[str, Any], run: Dict[str, Any]) -> None:
        self._driver = driver
        self.name: str = node["name"]
        #: The machine's first IPv4 and IPv6 addresses (None without a VLAN).
        self.ip: Optional[str] = node["ip"]
        self.ipv6: Optional[str] = node["ipv6"]
        #: The run's report folder, where copy_from_vm puts files.
        self.out_dir = Path(run["out_dir"])
        #: The run's private folder on the host (sockets, writable layers).
        self.tmp_dir = Path(run["tmp_dir"])
        #: The run's folder every machine sees at /tmp/shared.
        self.shared_dir = Path(run["shared_dir"])
        #: Whether the machine's writable layer is kept for the next run.
        self.keep_machine_state: bool = run["keep_machine_state"]
        #: Functions called before each command, as in NixOS.
        self.callbacks: List[Callable[[], Any]] = []
        #: Where this machine's lines of the log go.
        self.logger = _Log(driver)
        #: NixOS's QEMU process object; vmrig's QEMU is the driver's child,
        #: and `pid` gives its id.
        self.process: Any = None
        #: vmrig has no human monitor socket: send_monitor_command goes
        #: through QMP (`qmp_path`).
        self.monitor_path: Optional[Path] = None
        # Console lines already looked at by wait_for_console_text, and QMP
        # events by wait_for_qmp_event.
        self._console_seen = 0
        self._events_seen = 0

    def __repr__(self) -> str:
        return f"<Machine '{self.name}'>"

    def _call(self, method: str, **args: Any) -> Any:
        self._driver.check_polling_conditions()
        return self._driver.call(method, self.name, **args)

    def _described(self, key: str) -> Any:
        return self._driver.call("describe", self.name)[key]

    @property
    def booted(self) -> bool:
        """Whether QEMU runs (it has been started and has not powered off)."""
        return bool(self._described("booted"))

    @property
    def connected(self) -> bool:
        """Whether the machine is booted and its agent has answered."""
        return bool(self._described("connected"))

    @property
    def pid(self) -> Optional[int]:
        """QEMU's process id while it runs."""
        return self._described("pid")

    @property
    def state_dir(self) -> Path:
        """The host folder holding the machine's writable layer."""
        return Path(self._described("state_dir"))

    @property
    def qmp_path(self) -> Path:
        """QEMU's QMP socket."""
        return Path(self._described("qmp_path"))

    @property
    def shell_path(self) -> Path:
        """The socket of the machine's agent (NixOS's is its root shell's)."""
        return Path(self._described("shell_path"))

    @property
    def full_console_log(self) -> List[str]:
        """Every line the machine's console printed in this run."""
        return self.get_console_log().split("\n")

    def run_callbacks(self) -> None:
        """Calls each of `callbacks`, as every command does first."""
        for callback in self.callbacks:
            callback()

    def log(self, msg: str) -> None:
        """Writes a line about this machine in the run's log."""
        self._driver.call("log", message=str(msg), machine=self.name)

    @contextlib.contextmanager
    def nested(self, msg: str, attrs: Optional[Dict[str, str]] = None) -> Iterator[None]:
        """A timed block of the log about this machine, closed by
        "(finished: msg, in X seconds)"."""
        block = self._driver.call("nested_start", message=str(msg), machine=self.name)
        try:
            yield
        finally:
            self._driver.call("nested_end", id=block)

    def start(self, allow_reboot: bool = False) -> None:
        """Boots the machine, without waiting for it to be up. Unless
        allow_reboot, a reboot the guest asks for itself powers it off,
        as in NixOS (reboot() works either way)."""
        self._call("start", allow_reboot=allow_reboot)

    def is_up(self) -> bool:
        """Whether the machine is booted and answering."""
        return bool(self._call("is_up"))

    def shutdown(self) -> None:
        """Powers the machine off cleanly and waits until it is off."""
        self._call("shutdown")

    def crash(self) -> None:
        """Cuts the machine's power at once."""
        self._call("crash")

    def reboot(self) -> None:
        """Reboots the machine and waits until it is up again."""
        self._call("reboot")

    def wait_for_shutdown(self) -> None:
        """Waits until the machine has powered off."""
        self._call("wait_for_shutdown")

    def execute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: Timeout = 900,
    ) -> Tuple[int, str]:
        """Runs a shell command under `set -euo pipefail`, in /tmp; returns
        its exit status and stdout. With check_return=False it returns
        (-1, stdout) once stdout has closed, without waiting for the exit;
        with check_output=False, (-2, "") as soon as it has started. What
        it prints after that goes to the machine's console."""
        self.run_callbacks()
        answer = "exit" if check_output and check_return else "output_end" if check_output else "start"
        result = self._call("execute", command=command, timeout=_seconds(timeout), answer=answer)
        if not check_output:
            return -2, ""
        if not check_return:
            return -1, result["stdout"]
        return result["status"], result["stdout"]

    def _execute_quietly(self, command: str) -> Tuple[int, str]:
        """execute(), leaving nothing in the log: for what a person types."""
        result = self._call("execute", command=command, timeout=None, quiet=True)
        return result["status"], result["stdout"]

    def succeed(self, *commands: str, timeout: Timeout = None) -> str:
        """Runs each command, failing the test if one fails; returns their stdout."""
        self.run_callbacks()
        return self._call("succeed", commands=list(commands), timeout=_seconds(timeout))

    def fail(self, *commands: str, timeout: Timeout = None) -> str:
        """Runs each command, failing the test if one succeeds."""
        self.run_callbacks()
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

    def require_unit_state(self, unit: str, require_state: str = "active") -> None:
        """Fails the test unless the unit's ActiveState is require_state."""
        self._call("require_unit_state", unit=unit, require_state=require_state)

    def get_unit_property(self, unit: str, property: str, user: Optional[str] = None) -> str:
        """One property systemd reports for a unit."""
        return self._call("get_unit_property", unit=unit, property=property, user=user)

    def start_job(self, jobname: str, user: Optional[str] = None) -> Tuple[int, str]:
        """`systemctl start jobname`; returns its exit status and stdout."""
        result = self._call("start_job", unit=jobname, user=user)
        return result["status"], result["stdout"]

    def stop_job(self, jobname: str, user: Optional[str] = None) -> Tuple[int, str]:
        """`systemctl stop jobname`; returns its exit status and stdout."""
        result = self._call("stop_job", unit=jobname, user=user)
        return result["status"], result["stdout"]

    def wait_for_file(self, filename: str, timeout: Timeout = 900) -> None:
        """Waits until a path exists."""
        self._call("wait_for_file", filename=filename, timeout=_seconds(timeout))

    def wait_for_open_port(self, port: int, addr: str = "localhost", timeout: Timeout = 900) -> None:
        """Waits until a TCP port of addr, seen from the machine, accepts."""
        self._call("wait_for_open_port", port=port, addr=addr, timeout=_seconds(timeout))

    def wait_for_closed_port(self, port: int, addr: str = "localhost", timeout: Timeout = 900) -> None:
        """Waits until a TCP port of addr, seen from the machine, refuses."""
        self._call("wait_for_closed_port", port=port, addr=addr, timeout=_seconds(timeout))

    def wait_for_open_unix_socket(self, addr: str, is_datagram: bool = False, timeout: Timeout = 900) -> None:
        """Waits until a Unix socket of the machine accepts."""
        self._call("wait_for_open_unix_socket", addr=addr, is_datagram=is_datagram, timeout=_seconds(timeout))

    def wait_for_console_text(self, regex: str, timeout: Timeout = None) -> None:
        """Waits until the console prints text matching a Python regex. Each
        call looks only at lines no earlier call has looked at."""
        self._driver.call("log", message=f"{self.name}: waiting for {regex!r} on the console")
        limit = _seconds(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        text = ""
        while True:
            lines = self._call("console_lines", first=self._console_seen, wait=1.0)
            self._console_seen += len(lines)
            text += "".join(line + "\n" for line in lines)
            if re.search(regex, text):
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TestFailure(f"{self.name}: {regex!r} did not appear on the console within {limit} s")

    def wait_for_qmp_event(self, event_filter: Callable[[Dict[str, Any]], bool], timeout: Timeout = 600) -> Dict[str, Any]:
        """Waits for a QMP event for which event_filter returns True, and
        returns it. Each call looks only at events no earlier call has
        looked at (those it skips are gone, as in NixOS)."""
        limit = _seconds(timeout) or 600.0
        deadline = time.monotonic() + limit
        while True:
            events = self._call("qmp_events", first=self._events_seen, wait=1.0)
            for event in events:
                self._events_seen += 1
                if event_filter(event):
                    return event
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no matching QMP event within {limit} s")

    def send_console(self, chars: str) -> None:
        """Types chars on the machine's serial console (the kernel's
        console, where the boot and the journal are printed)."""
        self._call("send_console", chars=chars)

    def get_tty_text(self, tty: Union[int, str]) -> str:
        """The text of virtual terminal `tty`."""
        return self._call("tty_text", tty=tty)

    def wait_until_tty_matches(self, tty: Union[int, str], regexp: str, timeout: Timeout = 900) -> None:
        """Waits until the text of virtual terminal `tty` matches regexp."""
        limit = _seconds(timeout) or 900.0
        deadline = time.monotonic() + limit
        with self.nested(f"waiting for {regexp} to appear on tty {tty}"):
            while True:
                text = self.get_tty_text(tty)
                if re.search(regexp, text):
                    return
                if time.monotonic() > deadline:
                    raise TestFailure(f"{self.name}: {regexp!r} did not appear on tty {tty} within {limit} s; it shows:\n{text}")
                time.sleep(1)

    def dump_tty_contents(self, tty: Union[int, str]) -> None:
        """Writes the text of virtual terminal `tty` to the run's log."""
        self.log(f"tty {tty} shows:\n{self.get_tty_text(tty)}")

    def get_console_log(self) -> str:
        """Everything the machine's console printed in this run."""
        return self._call("console_log")

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

    def copy_from_host_via_shell(self, source: str, target: str) -> None:
        """Copies a host file into the machine, creating target's directory
        (vmrig copies over its agent in any case)."""
        self.succeed(f"mkdir -p {shlex.quote(os.path.dirname(str(target)) or '/')}")
        self.copy_from_host(source, target)

    def send_monitor_command(self, command: str) -> str:
        """Sends a command to QEMU's monitor; returns its output."""
        return self._call("send_monitor_command", command=command)

    def forward_port(self, host_port: int = 8080, guest_port: int = 80) -> int:
        """Forwards host_port on the host's loopback (127.0.0.1) to
        guest_port on the node's loopback, for the rest of the run.
        host_port 0 picks a free port. Returns the host port."""
        return int(self._call("forward_port", host_port=host_port, guest_port=guest_port))

    def shell_interact(self, address: Optional[str] = None) -> None:
        """Runs shell commands typed at the terminal on the machine, as root,
        each in a fresh bash started where the last one left off; their
        output and errors are shown. Ctrl-D ends it."""
        directory = "/root"
        while True:
            try:
                line = input(f"{self.name}:{directory}# ")
            except EOFError:
                print()
                return
            if not line.strip():
                continue
            command = (
                f"set +eu +o pipefail; cd {shlex.quote(directory)} 2>/dev/null\n{{ {line}\n}} 2>&1\n"
                "__vmrig_status=$?; printf '\\0%s' \"$PWD\"; exit $__vmrig_status"
            )
            status, output = self._execute_quietly(command)
            output, _, directory_now = output.rpartition("\0")
            directory = directory_now or directory
            sys.stdout.write(output)
            if status != 0:
                print(f"(exit status {status})")

    def console_interact(self) -> None:
        """Types each line read from the terminal on the machine's serial
        console; what the console prints shows as `name # ...` lines.
        Ctrl-D ends it. A node runs no login prompt on its console, so what
        reads these lines is whatever the test started there."""
        while True:
            try:
                line = input()
            except EOFError:
                print()
                return
            self.send_console(line + "\n")

    def send_key(self, key: str, delay: Timeout = 0.01, log: Optional[bool] = True) -> None:
        """Presses key, or keys joined by "-" together ("ctrl-alt-delete",
        "alt-f2", "ret"), with QEMU's names; then waits delay. Needs a
        node with `graphics = true`."""
        self._call("send_key", key=key, delay=_seconds(delay), log=bool(log))

    def send_chars(self, chars: str, delay: Timeout = 0.01) -> None:
        """Types chars on the keyboard (US layout), waiting delay after
        each key. Needs a node with `graphics = true`."""
        self._call("send_chars", chars=chars, delay=_seconds(delay))

    def screenshot(self, filename: str) -> None:
        """Saves the screen as filename (PNG; `.png` is added to a name
        without an extension), in the test's result folder unless it is an
        absolute path. Needs a node with `graphics = true`."""
        self._call("screenshot", filename=str(filename))

    def get_screen_text_variants(self) -> List[str]:
        """The text OCR reads on the screen, in each of the screen's
        variants (enlarged; negated; black and white). Needs a node with
        `graphics = true` and tesseract on the host."""
        return self._call("screen_text", variants=True)

    def get_screen_text(self) -> str:
        """The text OCR reads on the screen (its negated variant)."""
        return self._call("screen_text", variants=False)[0]

    def wait_for_text(self, regex: str, timeout: Timeout = 900) -> None:
        """Waits until OCR reads text matching regex on the screen, in any
        variant: the variants are read side by side, and the first that
        matches ends the wait. A screen that has not changed is not read
        again."""
        self._call("wait_for_text", regex=regex, timeout=_seconds(timeout))

    def wait_for_x(self, timeout: Timeout = 900) -> None:
        """Waits until the X server on display :0 answers (asked with
        xwininfo: the node needs the package x11-utils)."""
        self._call("wait_for_x", timeout=_seconds(timeout))

    def get_window_names(self) -> List[str]:
        """The names of the X server's windows."""
        return self._call("get_window_names")

    def wait_for_window(self, regexp: str, timeout: Timeout = 900) -> None:
        """Waits until the name of one of the X server's windows matches
        regexp."""
        self._call("wait_for_window", regexp=regexp, timeout=_seconds(timeout))

    def block(self) -> None:
        """Unplugs the cable of the machine's NIC on its first VLAN (eth1),
        as NixOS does: the guest sees its carrier go."""
        self._call("block")

    def unblock(self) -> None:
        """Plugs the cable of block() back in."""
        self._call("unblock")

    def sleep(self, secs: float) -> None:
        """Waits, letting the machine run."""
        time.sleep(secs)


class Vlan:
    """One virtual Ethernet segment."""

    def __init__(self, driver: _Driver, number: int) -> None:
        self._driver = driver
        self.number = number

    @property
    def nr(self) -> int:
        """The VLAN's number, as NixOS's VLan calls it."""
        return self.number

    def __repr__(self) -> str:
        return f"<Vlan {self.number}>"

    def impair(
        self,
        delay: Union[Timeout, str] = None,
        jitter: Union[Timeout, str] = None,
        loss: Union[float, str] = 0.0,
        rate: Union[int, str, None] = None,
    ) -> None:
        """Degrades every link of the VLAN: `delay` and `jitter` per frame
        (seconds, a timedelta, or "200ms" as tc netem writes it), `loss` as
        a share of frames (0 to 1, or "1%"), `rate` in bits per second (or
        "10mbit"). Called without arguments, restores a clean link."""

        def plain(value: Any) -> Any:
            if isinstance(value, datetime.timedelta):
                return value.total_seconds()
            return value if value is None or isinstance(value, (int, float, str)) else repr(value)

        self._driver.call(
            "impair", vlan=self.number, delay=plain(delay), jitter=plain(jitter), loss=plain(loss), rate=plain(rate)
        )


class PollingConditionFailed(TestFailure):
    """A polling condition did not hold."""


class PollingCondition:
    """A condition checked, at most every seconds_interval, before each call
    to a machine while its `with` block runs, and once more as it ends."""

    def __init__(self, condition: Callable[[], Any], driver: "_Driver", seconds_interval: float, description: Optional[str]) -> None:
        self.condition = condition
        self.description = description or (condition.__doc__ or condition.__name__).strip()
        self._driver = driver
        self._interval = seconds_interval
        self._last_checked = float("-inf")
        self._checking = False

    def check(self, force: bool = False) -> bool:
        if self._checking or (not force and time.monotonic() - self._last_checked < self._interval):
            return True
        # The condition's own calls to machines must not check it again.
        self._checking = True
        try:
            self._driver.call("log", message=f"checking polling condition: {self.description}")
            try:
                result = self.condition()
            except Exception:
                result = False
            return result is None or bool(result)
        finally:
            self._checking = False
            self._last_checked = time.monotonic()

    def maybe_raise(self) -> None:
        if not self.check():
            raise PollingConditionFailed(f"polling condition failed: {self.description}")

    def __enter__(self) -> "PollingCondition":
        self._driver.polling_conditions.append(self)
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        self._driver.polling_conditions.remove(self)
        if kind is None and not self.check(force=True):
            raise PollingConditionFailed(f"polling condition failed: {self.description}")


class _Log:
    """`log`: lines in the run's log."""

    def __init__(self, driver: _Driver) -> None:
        self._driver = driver

    def __call__(self, message: str) -> None:
        self._driver.call("log", message=str(message))

    info = warning = error = __call__


class _Debug:
    """`debug`: NixOS's hook for stopping a script to look around; also
    Python's `breakpoint()`."""

    def __init__(self, driver: _Driver, namespace: Dict[str, Any], prompt: bool) -> None:
        self._driver = driver
        self._namespace = namespace
        self._prompt = prompt

    def breakpoint(self, *args: Any, **kwargs: Any) -> None:
        """Opens a prompt with the script's names (and the caller's) where
        a person is at one (`vmrig interactive`, `vmrig run --debug` on a
        terminal), the test's clock stopped; elsewhere says so in the log
        and goes on."""
        caller = sys._getframe(1)
        where = f"line {caller.f_lineno}" if caller.f_code.co_filename == self._namespace["__file__"] else "a breakpoint"
        if not self._prompt:
            self._driver.call("log", message=f"breakpoint() at {where}: this run has no terminal to prompt on (vmrig run --debug from one has); going on")
            return
        names = dict(self._namespace)
        if caller.f_globals is not caller.f_locals:
            names.update(caller.f_locals)
        self._driver.call("pause")
        try:
            _prompt(names, f"vmrig: breakpoint at {where}; the script's names are here.\ncontinue() or Ctrl-D goes on.")
        finally:
            self._driver.call("resume")


class _Continue(Exception):
    """`continue()` typed at the prompt."""


def _prompt(names: Dict[str, Any], banner: str) -> None:
    """A Python prompt on the terminal with `names`, until Ctrl-D or
    `continue()`. The script's own output goes to the run's log; the
    prompt reads and writes the terminal itself."""
    import code

    class Console(code.InteractiveConsole):
        def push(self, line: str, *args: Any, **kwargs: Any) -> bool:
            # `continue` is a keyword: `continue()` cannot be a function.
            if not self.buffer and line.strip() in ("continue()", "continue", "c"):
                raise _Continue()
            return super().push(line, *args, **kwargs)

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        terminal: Optional[int] = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        terminal = None  # `vmrig interactive` fed by a pipe: its own streams
    kept = [os.dup(fd) for fd in (0, 1, 2)] if terminal is not None else []
    for fd in (0, 1, 2) if terminal is not None else ():
        os.dup2(terminal, fd)
    try:
        Console(locals=names).interact(banner=banner, exitmsg="")
    except _Continue:
        pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in zip((0, 1, 2), kept):
            os.dup2(original, fd)
            os.close(original)
        if terminal is not None:
            os.close(terminal)


def _stop_at_failure(driver: _Driver, namespace: Dict[str, Any], error: BaseException) -> None:
    """`vmrig run --debug`: stops with every machine up, at a prompt on
    the terminal, or for the driver's wait while a person attaches."""
    driver.call("pause")
    if os.environ.get("VMRIG_DEBUG") != "prompt":
        # The driver ends the run when the wait is over.
        threading.Event().wait()
    namespace["failure"] = error
    # The exception's own line, not the command output that follows it.
    what = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()[0]
    _prompt(
        namespace,
        f"vmrig --debug: the test failed: {what}\n"
        "Every machine is up as it was; the script's names are here (`failure` is the error).\n"
        "test_script() runs the script again; continue() or Ctrl-D tears down and reports.",
    )


def _namespace(driver: _Driver, path: str, compiled: Any, prompt: bool) -> Dict[str, Any]:
    """The globals a script sees: its machines and the driver's names."""
    nodes = driver.call("nodes")
    run = driver.call("run_info")
    machines = {node["python_name"]: Machine(driver, node, run) for node in nodes}
    log = _Log(driver)

    def start_all() -> None:
        driver.call("start_all")

    def join_all() -> None:
        """Waits until every machine has powered off."""
        for machine in machines.values():
            machine.wait_for_shutdown()

    def polling_condition(
        fun_: Optional[Callable[[], Any]] = None,
        *,
        seconds_interval: float = 2.0,
        description: Optional[str] = None,
    ) -> Any:
        """Makes a function a condition that must hold while a `with` block
        of it runs; as NixOS's, usable as @polling_condition or with arguments."""
        if fun_ is not None:
            return PollingCondition(fun_, driver, seconds_interval, description)
        return lambda fun: PollingCondition(fun, driver, seconds_interval, description)

    def serial_stdout_on() -> None:
        """Shows the machines' consoles in the output again."""
        driver.call("serial_stdout", on=True)

    def serial_stdout_off() -> None:
        """Keeps the machines' consoles out of the output (they stay in result/log.txt)."""
        driver.call("serial_stdout", on=False)

    @contextlib.contextmanager
    def subtest(name: str):
        driver.call("subtest_start", name=name)
        try:
            yield
        except BaseException as error:
            driver.call("subtest_end", failure=_describe(error, path))
            raise
        driver.call("subtest_end", failure=None)

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

    def vlan(number: int) -> Vlan:
        return Vlan(driver, number)

    def test_script() -> None:
        """Runs the test's script (again) with these machines."""
        exec(compiled, namespace)

    def create_machine(*args: Any, **kwargs: Any) -> Machine:
        raise TestFailure(
            "create_machine() starts a VM from a NixOS start script; a vmrig node is declared in vmrig.toml's [nodes]"
        )

    namespace: Dict[str, Any] = dict(machines)
    if len(machines) == 1:
        namespace["machine"] = next(iter(machines.values()))
    all_vlans = [Vlan(driver, number) for number in sorted({v for node in nodes for v in node["vlans"]})]
    namespace.update({f"vlan{v.number}": v for v in all_vlans})

    namespace.update(
        start_all=start_all,
        join_all=join_all,
        subtest=subtest,
        retry=retry,
        polling_condition=polling_condition,
        serial_stdout_on=serial_stdout_on,
        serial_stdout_off=serial_stdout_off,
        t=unittest.TestCase(),
        log=log,
        partition=partition,
        heal=heal,
        vlan=vlan,
        vlans=all_vlans,
        machines=list(machines.values()),
        os=os,
        Machine=Machine,
        BaseMachine=Machine,
        machines_qemu=[machines[node["python_name"]] for node in nodes if not node["container"]],
        machines_nspawn=[machines[node["python_name"]] for node in nodes if node["container"]],
        test_script=test_script,
        run_tests=test_script,
        create_machine=create_machine,
    )
    namespace["debug"] = _Debug(driver, namespace, prompt)
    namespace["driver"] = _DriverNames(namespace)
    namespace["__name__"] = "__vmrig_test__"
    namespace["__file__"] = path
    assert set(DRIVER_GLOBALS) <= set(namespace)
    return namespace


class _DriverNames:
    """`driver`: what the NixOS driver object offers a script."""

    def __init__(self, namespace: Dict[str, Any]) -> None:
        self.machines: List[Machine] = namespace["machines"]
        self.vlans: List[Vlan] = namespace["vlans"]
        self.start_all: Callable[[], None] = namespace["start_all"]
        self.join_all: Callable[[], None] = namespace["join_all"]
        self.subtest = namespace["subtest"]
        self.polling_condition = namespace["polling_condition"]
        self.serial_stdout_on: Callable[[], None] = namespace["serial_stdout_on"]
        self.serial_stdout_off: Callable[[], None] = namespace["serial_stdout_off"]
        self.test_script: Callable[[], None] = namespace["test_script"]
        self.run_tests: Callable[[], None] = namespace["run_tests"]
        self.create_machine: Callable[..., Machine] = namespace["create_machine"]

    def __repr__(self) -> str:
        return "<vmrig driver>"


def _compile(script: str, path: str, first_line: int) -> Any:
    # Blank lines in front keep the script's line numbers those of the file
    # it is written in, so that tracebacks point at the right line.
    return compile("\n" * (first_line - 1) + script, path, "exec")


def _run(script: str, path: str, first_line: int) -> int:
    driver = _Driver(os.environ["VMRIG_DRIVER"])
    code = _compile(script, path, first_line)
    debug = os.environ.get("VMRIG_DEBUG")
    namespace = _namespace(driver, path, code, prompt=debug == "prompt")
    sys.breakpointhook = namespace["debug"].breakpoint
    try:
        exec(code, namespace)
    except SystemExit as exit:
        # As in Python and NixOS's driver: sys.exit() or sys.exit(0) ends
        # the script normally; any other status or message is a failure.
        if exit.code is None or exit.code == 0:
            return 0
        return _failed(driver, f"the script called sys.exit({exit.code!r})\n")
    except InfrastructureError as error:
        description = _describe(error, path)
        sys.stdout.write(description)
        sys.stdout.flush()
        if debug:
            _stop_at_failure(driver, namespace, error)
        return 3
    except BaseException as error:  # the script's own failure, whatever it raised
        description = _describe(error, path)
        status = _failed(driver, description)
        if debug:
            _stop_at_failure(driver, namespace, error)
        return status
    return 0


def _failed(driver: _Driver, description: str) -> int:
    """Reports the script's failure; its exit status."""
    sys.stdout.write(description)
    sys.stdout.flush()
    try:
        driver.call("script_failed", message=description)
    except Exception:
        pass  # the driver is gone; the exit status still tells
    return 1


def _interact(script: str, path: str, first_line: int) -> int:
    """`vmrig interactive`: a Python prompt with the test's names, its
    machines not started, and test_script() to run the script."""
    import code

    driver = _Driver(os.environ["VMRIG_DRIVER"])
    namespace = _namespace(driver, path, _compile(script, path, first_line), prompt=True)
    sys.breakpointhook = namespace["debug"].breakpoint
    machines = ", ".join(sorted({v.name for v in namespace.values() if isinstance(v, Machine)}))
    code.interact(
        banner=f"vmrig interactive: machines {machines} (not started); start_all(), test_script(), "
        "<machine>.shell_interact(); Ctrl-D ends and stops them all",
        local=namespace,
        exitmsg="",
    )
    return 0


def _describe(error: BaseException, path: str) -> str:
    """The traceback of error, keeping only the script's own frames."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    lines = ["Traceback (most recent call last):\n"]
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(error), error)
    return "".join(lines)


def _main() -> None:
    with open(os.environ["VMRIG_SCRIPT"], encoding="utf-8") as script:
        text = script.read()
    run = _interact if os.environ.get("VMRIG_INTERACTIVE") else _run
    code = run(text, os.environ["VMRIG_SCRIPT_PATH"], int(os.environ["VMRIG_SCRIPT_FIRST_LINE"]))
    sys.stdout.flush()
    sys.exit(code)
