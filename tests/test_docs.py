"""Every shell command of README.md and docs/*.md, run as a reader would paste it.

The docs mark what is meant to be typed: a fenced ```sh block holds commands, one
per line (``\\`` continuations and multi-line quoted arguments allowed); ```console
and ```text hold transcripts, output and usage synopses; other languages have their
own fences. A ```sh block whose first line is ``#!`` is a script file to save, not
commands: it is checked for syntax only.

Each ```sh block runs in its own bash (a new terminal) in a fresh temporary directory
that holds links to the checkout's files, so relative paths such as ``.venv/bin/zeusd``
work as written from the repository root. The commands are fed to bash one at a time
and each one's exit status is checked, within a time limit. README.md runs with no
virtual environment on ``PATH`` (a new shell on a fresh clone); docs/*.md describe an
installed zeusd, so there ``.venv/bin`` is on ``PATH``. Only the explicit tables
below change what runs: ``REWRITES`` (paths and ports of this machine), ``DAEMON``
(commands that serve: run in the background, waited for, stopped when the document
is done) and ``SKIPS`` (what cannot run here, each with its reason, reported by
pytest as a skip of that command). A document that starts no daemon of its own gets
a simulated one (tests/daemon.py) on the socket its commands are pointed at.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from markdown_it import MarkdownIt

from tests.daemon import REPO, Client, Daemon, Transport, free_tcp_port, wait_until, write_signing_key
from tests.zeus_clients import client_python

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: The fence languages a doc may use; ``sh`` is the only one that is run.
FENCE_LANGUAGES = {"sh", "console", "text", "json", "toml", "yaml", "ini", "promql", "python"}

#: What cannot run here: (pattern searched in the command, reason). The first match wins.
SKIPS: tuple[tuple[str, str], ...] = (
    (r"\bsystemctl\b", "changes the machine's services (systemd)"),
    (r"^(sudo )?install\b.*\s/etc/", "installs into /etc (the machine's services)"),
    (r"^make (test|coverage|mutation)\b|(^|/)pytest\b", "the test suite itself"),
    (r"^make bench|bench/(run|compare)\.py", "the benchmarks and their result files (minutes of load; tests/test_bench_smoke.py and tests/test_bench_compare.py run them)"),
    (
        r"-m venv\b|\bpip install\b|tests/zeus_clients/setup_venvs\.sh",
        "builds a virtual environment from PyPI: make's set-up does (.venv, make zeus-clients), and the commands here use those",
    ),
    (r"\b(zeusd serve|twistd?)\b(?!.*--simulate)", "serves real devices: needs root and a GPU node"),
    (r"\b(nvidia-smi|amd-smi)\b", "needs the GPU hardware"),
)

#: How a command is pointed at this test's files: (pattern, replacement, why). Applied in order.
#: ``{dir}``, ``{sock}`` and ``{port}`` are the document's temporary directory, socket and TCP port;
#: ``{zeus15}`` and ``{zeus16}`` the Python of that official client's venv (``make zeus-clients``).
REWRITES: tuple[tuple[str, str, str], ...] = (
    (r"/tmp/zeusd\.sock|/var/run/zeusd\.sock", "{sock}", "the daemon's socket, in the test's directory"),
    (r"/tmp/zeusd\.key", "{dir}/zeusd.key", "a key file the commands create, in the test's directory"),
    (r"/etc/zeusd/", "{dir}/etc/zeusd/", "an installed node's configuration: the test's, with a signing key in it"),
    (r"(?<=:)4938\b", "{port}", "the TCP port: a free one"),
    (r"--mode tcp(?!.*--tcp-bind-address)", "--mode tcp --tcp-bind-address 127.0.0.1:{port}", "the TCP port: a free one"),
    (r"/tmp/zeus15/bin/python", "{zeus15}", "zeus 0.15.1 in the venv make zeus-clients built"),
    (r"/tmp/zeus16/bin/python", "{zeus16}", "zeus 0.16.0 in the venv make zeus-clients built"),
    (r"^make serve\b", "make serve SOCKET={sock}", "the Makefile's daemon, on the test's socket"),
    (
        r"\bzeusd serve\b(?!.*(--socket-path|--mode tcp|--tcp-bind-address|--listen))",
        "zeusd serve --socket-path {sock}",
        "a daemon's default socket (/var/run/zeusd.sock): the test's",
    ),
    (r"^curl -N\b", "__docs_stream curl --fail-with-body --max-time 3 -N", "a stream is read for 3 s"),
    (r"^curl\b(?! --fail)", "curl --fail-with-body --max-time 10", "an HTTP error status fails the command"),
)

#: Commands that serve until stopped: run in the background, waited for until they answer.
DAEMON = re.compile(r"^make serve\b|\bzeusd serve\b.*--simulate")

#: What a command must print besides exiting 0: (pattern in the command, pattern in its output, why).
EXPECT: tuple[tuple[str, str, str], ...] = (
    (r"^__docs_stream", r"(?m)^data: \{", "a stream sends data events"),
    (r"zeusd power\b", r"(?m)^\S+\s+gpu0\s+\d+\.\d", "the power table has GPU 0"),
    (r"^(\S*/)?zeusd token issue\b", r"^[\w-]+\.[\w-]+\.[\w-]+\s*$", "a token is printed"),
    (r"PowerStreamingClient", r"gpu_power_w=\{0: \d.*cpu_power_w=\{0: CpuPowerReading", "the official client got GPU and CPU readings"),
)

PRELUDE = """\
__docs_stream() { "$@"; local rc=$?; [ "$rc" -eq 28 ] && return 0; return "$rc"; }  # 28: --max-time reached
"""

#: Programs the commands use that a minimal system may lack (Debian packages of these names).
PACKAGED_PROGRAMS = ("curl", "openssl", "make")

COMMAND_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- reading the docs


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # 1-based line of the block's first content line
    language: str
    content: str

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


@dataclass(frozen=True)
class Command:
    block: Block
    index: int  # within the doc, in order
    line: int
    text: str

    @property
    def name(self) -> str:
        return f"{self.block.doc.relative_to(REPO)}:{self.line}"


def fences(doc: Path) -> Iterator[Block]:
    for token in MarkdownIt("commonmark").parse(doc.read_text()):
        if token.type == "fence" and token.map is not None:
            yield Block(doc, token.map[0] + 2, token.info.strip(), token.content)


def indented_blocks(doc: Path) -> Iterator[Block]:
    for token in MarkdownIt("commonmark").parse(doc.read_text()):
        if token.type == "code_block" and token.map is not None:
            yield Block(doc, token.map[0] + 1, "", token.content)


def is_script_file(block: Block) -> bool:
    return block.content.startswith("#!")


def complete(text: str) -> bool:
    """Whether bash would run ``text`` as it is (no open quote, no trailing ``\\``)."""
    if text.endswith("\\"):
        return False
    return subprocess.run(["bash", "-n", "-c", text], capture_output=True).returncode == 0


def split_commands(block: Block) -> tuple[list[tuple[int, str]], str]:
    """The block's commands with their lines, and any text left incomplete at its end."""
    commands: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for offset, line in enumerate(block.content.rstrip("\n").split("\n")):
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = block.line + offset
        pending.append(line)
        text = "\n".join(pending)
        if complete(text):
            commands.append((start, text))
            pending = []
    return commands, "\n".join(pending)


def doc_commands(doc: Path) -> list[Command]:
    out: list[Command] = []
    for block in fences(doc):
        if block.language == "sh" and not is_script_file(block):
            for line, text in split_commands(block)[0]:
                out.append(Command(block, len(out), line, text))
    return out


COMMANDS = [command for doc in DOCS for command in doc_commands(doc)]
SCRIPTS = [block for doc in DOCS for block in fences(doc) if block.language == "sh" and is_script_file(block)]


def skip_reason(text: str) -> str | None:
    for pattern, reason in SKIPS:
        if re.search(pattern, text):
            return reason
    return None


def looks_like_command(line: str) -> bool:
    words = line.split()
    if words and words[0] in ("$", "#"):
        return True
    while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] == "sudo"):
        words = words[1:]
    if not words:
        return False
    program = words[0]
    return program.startswith(("./", "../", "~/", ".venv")) or shutil.which(program) is not None or program in ("zeusd", "twist", "twistd")


# --------------------------------------------------------------------------- running them


class Shell:
    """One bash reading commands from a pipe, one at a time, in its own process group."""

    def __init__(self, cwd: Path, env: dict[str, str], logs: Path) -> None:
        self.logs = logs
        status_read, status_write = os.pipe()
        self._child_fd = status_write  # bash reports each command's exit status on it
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,
            pass_fds=(status_write,),
        )
        os.close(status_write)
        self._status: int | None = status_read
        self._buffer = b""
        self.broken: str | None = None
        self._send(PRELUDE)

    def _send(self, script: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(script.encode())
        self.proc.stdin.flush()

    def run(self, number: int, text: str, timeout: float) -> tuple[int | None, str]:
        """Exit status (None: still running at ``timeout``) and output of one command."""
        out = self.logs / f"{number}.out"
        fd = self._child_fd
        self._send(f"{{\n{text}\n}} </dev/null >{shlex.quote(str(out))} 2>&1 {fd}>&-\necho \"{number} $?\" >&{fd}\n")
        status = self._read_status(timeout)
        output = out.read_text(errors="replace") if out.exists() else ""
        if status is None:
            self.broken = f"command {number} did not finish within {timeout:.0f} s"
            self.kill()
            return None, output
        got_number, code = status.split()
        assert int(got_number) == number, status
        return int(code), output

    def _read_status(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if self._status is None or left <= 0 or not select.select([self._status], [], [], left)[0]:
                return None
            chunk = os.read(self._status, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def end_input(self) -> None:
        """The reader leaves this terminal: bash exits, what it started in the background keeps running."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Stop everything the block started (its daemons), SIGTERM first so that they clean up."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self._group_alive():
                break
            os.killpg(self.proc.pid, sig)
            try:
                wait_until(lambda: not self._group_alive(), "the block's processes to exit", timeout=15)
            except AssertionError:
                continue
        self.proc.wait()
        if self._status is not None:
            os.close(self._status)
            self._status = None

    def _group_alive(self) -> bool:
        self.proc.poll()  # reap bash: a zombie still counts as a member of its group
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


def _path(doc: Path) -> str:
    """A new shell's PATH: no virtual environment, except the installed zeusd that docs/ describe."""
    venvs = {str(REPO / ".venv" / "bin"), str(Path(sys.executable).parent)}
    entries = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p not in venvs]
    if doc.parent == REPO / "docs":
        entries.insert(0, str(REPO / ".venv" / "bin"))
    return os.pathsep.join(entries)


@dataclass
class DocRun:
    """The state of one document's commands: its directory, shells (one per block) and daemons."""

    doc: Path
    dir: Path
    port: int = field(default_factory=free_tcp_port)
    shells: dict[int, Shell] = field(default_factory=dict)
    ran: set[int] = field(default_factory=set)
    daemon_not_started: str | None = None  # why the document's own daemon command did not run (a skip)
    daemon_logs: list[Path] = field(default_factory=list)
    simulated: Daemon | None = None

    def __post_init__(self) -> None:
        (self.dir / "etc" / "zeusd").mkdir(parents=True)
        write_signing_key(self.dir / "etc" / "zeusd" / "key")
        (self.dir / "home").mkdir()

    @property
    def sock(self) -> str:
        return str(self.dir / "zeusd.sock")

    def env(self) -> dict[str, str]:
        return {"PATH": _path(self.doc), "HOME": str(self.dir / "home"), "LANG": "C.UTF-8", "TERM": "dumb", "TMPDIR": str(self.dir)}

    def rewrite(self, text: str) -> str:
        values = _Values(dir=str(self.dir), sock=self.sock, port=str(self.port))
        for pattern, replacement, _ in REWRITES:
            text = re.sub(pattern, lambda _: replacement.format_map(values), text, flags=re.MULTILINE)
        return text

    def shell(self, command: Command) -> Shell:
        key = command.block.line
        if key not in self.shells:
            for shell in self.shells.values():
                shell.end_input()  # the previous terminal is left alone; its daemons keep serving
            cwd = self.dir / f"block{command.block.line}"
            cwd.mkdir()
            for entry in REPO.iterdir():
                if entry.name != ".git":
                    (cwd / entry.name).symlink_to(entry)
            logs = self.dir / f"logs{command.block.line}"
            logs.mkdir()
            self.shells[key] = Shell(cwd, self.env(), logs)
        return self.shells[key]

    def run(self, command: Command) -> None:
        """Run ``command`` (after the doc's earlier ones, if this session has not run them yet)."""
        commands = [c for c in COMMANDS if c.block.doc == self.doc]
        for earlier in commands[: command.index]:
            if earlier.index not in self.ran:
                self.ran.add(earlier.index)
                try:
                    self._run_noting_skips(earlier, commands)
                except (pytest.skip.Exception, pytest.fail.Exception, AssertionError):
                    pass  # reported by that command's own test
        self.ran.add(command.index)
        self._run_noting_skips(command, commands)

    def _run_noting_skips(self, command: Command, commands: list[Command]) -> None:
        try:
            self._run_one(command, commands)
        except pytest.skip.Exception as skipped:
            if DAEMON.search(command.text):
                self.daemon_not_started = str(skipped)  # names the command already
            raise

    def _run_one(self, command: Command, commands: list[Command]) -> None:
        reason = skip_reason(command.text)
        if reason is not None:
            pytest.skip(f"{command.name} `{first_line(command.text)}`: {reason}")
        for program in PACKAGED_PROGRAMS:
            if re.search(rf"(^|[\s(;&|]){program}\b", command.text) and shutil.which(program) is None:
                pytest.skip(f"{command.name}: {program} is not installed (apt-get install {program})")
        text = self.rewrite(command.text)
        if text.startswith("make ") and subprocess.run(["make", "-q", ".venv/.installed"], cwd=REPO).returncode != 0:
            pytest.skip(f"{command.name}: .venv is older than pyproject.toml; run `make .venv/.installed` (this test installs nothing)")
        daemon = DAEMON.search(text) is not None
        if daemon and not text.rstrip().endswith("&"):
            text += " &"
        if self.sock in text and self.daemon_not_started is not None:
            pytest.skip(f"{command.name}: the document's daemon was skipped ({self.daemon_not_started})")
        if self.sock in text and not any(DAEMON.search(c.text) and not skip_reason(c.text) for c in commands):
            self.start_simulated_daemon()
        shell = self.shell(command)
        assert shell.broken is None, f"{command.name} not run: this block's shell was killed ({shell.broken})"
        code, output = shell.run(command.index, text, COMMAND_TIMEOUT_S)
        context = f"{command.name}\n  as written: {command.text}\n  as run:     {text}\n--- output ---\n{output}{self.logs()}"
        assert code is not None, f"did not finish within {COMMAND_TIMEOUT_S:.0f} s: {context}"
        assert code == 0, f"exited {code}: {context}"
        if daemon:
            self.daemon_logs.append(shell.logs / f"{command.index}.out")
            self.wait_ready(text, context)
        for pattern, expected, why in EXPECT:
            if re.search(pattern, text):
                assert re.search(expected, output), f"{why}: expected /{expected}/ in the output of {context}"

    def start_simulated_daemon(self) -> None:
        """The daemon a document that starts none talks to: a simulated node on the socket its commands name."""
        if self.simulated is None:
            self.simulated = Daemon(Transport("unix", self.sock), ["--simulate"], log_path=self.dir / "simulated.log").start()

    def wait_ready(self, text: str, context: str) -> None:
        if "--mode tcp" in text or "--tcp-bind-address" in text:
            port = re.search(r"--tcp-bind-address \S*:(\d+)", text)
            transport = Transport("tcp", int(port.group(1)) if port else self.port)
        else:
            path = re.search(r"(?:--socket-path |SOCKET=)(\S+)", text)
            transport = Transport("unix", path.group(1) if path else "/var/run/zeusd.sock")

        def answers() -> bool:
            try:
                return Client(transport).get("/discover").status == 200
            except OSError:
                return False

        try:
            wait_until(answers, "the daemon to answer", timeout=30)
        except AssertionError:
            pytest.fail(f"the daemon did not answer on {transport.kind}:{transport.address} within 30 s: {context}")

    def logs(self) -> str:
        parts = [f"\n--- daemon log {p.name} ---\n{p.read_text(errors='replace')[-4000:]}" for p in self.daemon_logs if p.exists()]
        if self.simulated is not None:
            parts.append(f"\n--- simulated daemon log ---\n{self.simulated.log()[-4000:]}")
        return "".join(parts)

    def close(self) -> None:
        for shell in self.shells.values():
            shell.kill()
        if self.simulated is not None:
            self.simulated.stop()


class _Values(dict[str, str]):
    """The values of REWRITES; a zeus client's Python is looked up only when a command names it."""

    def __missing__(self, key: str) -> str:
        if key in ("zeus15", "zeus16"):
            return str(client_python(f"0.{key[-2:]}"))  # skips (or fails under make test) without the venv
        raise KeyError(key)


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


class DocRuns:
    """One document at a time: moving on to the next stops the previous one's daemons."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.current: DocRun | None = None

    def for_doc(self, doc: Path) -> DocRun:
        if self.current is not None and self.current.doc != doc:
            self.current.close()
            self.current = None
        if self.current is None:
            directory = self.base / doc.stem
            directory.mkdir()
            self.current = DocRun(doc, directory)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocRuns]:
    runs = DocRuns(tmp_path_factory.mktemp("docs"))
    yield runs
    runs.close()


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_doc_command(command: Command, doc_runs: DocRuns) -> None:
    """Each ```sh command of the docs runs, as written but for REWRITES, and exits 0 (or is skipped, saying why)."""
    doc_runs.for_doc(command.block.doc).run(command)


@pytest.mark.parametrize("block", SCRIPTS, ids=[b.name for b in SCRIPTS])
def test_doc_script_file_parses(block: Block) -> None:
    """A script file shown in a doc (```sh starting with ``#!``) is valid for the shell it names."""
    shebang = block.content.split("\n", 1)[0][2:].split()
    interpreter = Path(shebang[-1] if Path(shebang[0]).name == "env" else shebang[0]).name
    assert interpreter in ("sh", "bash"), f"{block.name}: unknown interpreter {interpreter}"
    r = subprocess.run([interpreter, "-n"], input=block.content, capture_output=True, text=True)
    assert r.returncode == 0, f"{block.name}: {r.stderr}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_doc_blocks_are_fenced_by_kind(doc: Path) -> None:
    """Commands can be found without guessing: every fence names its language, no command hides in an indented block."""
    problems = []
    for block in fences(doc):
        if block.language not in FENCE_LANGUAGES:
            problems.append(f"{block.name}: fence language {block.language!r}: use one of {sorted(FENCE_LANGUAGES)} (```sh for commands to run, ```console for transcripts)")
        elif block.language == "sh" and not is_script_file(block):
            commands, left = split_commands(block)
            if left:
                problems.append(f"{block.name}: ```sh block ends inside a command (open quote or trailing \\): {left!r}")
            if not commands:
                problems.append(f"{block.name}: ```sh block without a command")
    for block in indented_blocks(doc):
        first = block.content.split("\n", 1)[0]
        if looks_like_command(first):
            problems.append(f"{block.name}: indented block looks like a command ({first!r}): put it in a ```sh fence")
    assert not problems, "\n".join(problems)
