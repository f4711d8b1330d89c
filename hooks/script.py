"""[hook:script]: run an executable on every connect and disconnect.

The command runs without a shell, in its own process group, with the event as DIGLETT_*
environment variables and as JSON on stdin. A non-zero exit or a timeout is a failure (the
delivery is retried); on timeout the whole process group is killed, so a background child
cannot keep the hook alive. Output is logged, cut at OUTPUT_LIMIT bytes.
"""

import json
import logging
import os
import shlex
import shutil
import signal

import gevent
from gevent import subprocess

from diglett.hookapi import Hook

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 64 * 1024  # bytes of a script's output kept for the log; the rest is drained
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL of a timed-out script's group
BASE_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "TZ")  # passed through from the server's own


class ScriptFailed(Exception):
    pass


class ScriptHook(Hook):
    OPTIONS = {
        "command": ("string", None, "executable to run, with arguments (no shell)"),
        "timeout": ("seconds", "30", "seconds before the script's process group is killed"),
    }

    def __init__(self, options, context):
        super().__init__(options, context)
        self.argv = shlex.split(options["command"])
        self.timeout = options["timeout"]
        executable = self.argv[0] if self.argv else ""
        if "/" not in executable:  # a bare name is looked up on PATH, as a shell would
            executable = shutil.which(executable) or executable
        elif not os.path.isabs(executable) and getattr(context, "config_dir", None):
            executable = os.path.join(context.config_dir, executable)  # relative to the config
        if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
            raise ValueError("command %r is not an executable file (give its path, absolute or "
                             "relative to the config file, and chmod +x it)" % self.argv[:1])
        self.argv[0] = executable

    def session_started(self, event):
        self._run(event)

    def session_ended(self, event):
        self._run(event)

    def _run(self, event):
        fields = event.fields()
        env = {name: os.environ[name] for name in BASE_ENVIRONMENT if name in os.environ}
        env.update(("DIGLETT_" + name.upper(), "" if value is None else str(value))
                   for name, value in fields.items() if name != "time")
        process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env=env, close_fds=True,
                                   start_new_session=True)
        reader = gevent.spawn(_read_capped, process.stdout)
        try:
            process.stdin.write(json.dumps(fields).encode() + b"\n")
            process.stdin.close()
        except OSError:
            pass  # the script need not read its stdin
        try:
            status = process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            reader.kill()
            raise ScriptFailed("%s timed out after %s s (process group killed)"
                               % (self.argv[0], self.timeout)) from None
        except BaseException:  # stopped from outside (shutdown, the dispatcher's own limit)
            _kill_group(process)
            reader.kill()
            raise
        reader.join(KILL_GRACE)  # a background child may hold the pipe open: do not wait on it
        output = reader.value or b""
        reader.kill()
        process.stdout.close()
        text = output.decode("utf-8", "replace").strip()
        if status != 0:
            raise ScriptFailed("%s exited with status %d: %s"
                               % (self.argv[0], status, text[-500:] or "(no output)"))
        if text:
            log.info("hook=script subdomain=%s %s output: %s", event.subdomain, event.kind,
                     text[-2000:])


def _read_capped(stream):
    """Keep the first OUTPUT_LIMIT bytes, drain the rest so the script never blocks on it."""
    kept = bytearray()
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            return bytes(kept)
        if len(kept) < OUTPUT_LIMIT:
            kept += chunk[:OUTPUT_LIMIT - len(kept)]


def _kill_group(process):
    """SIGTERM the script's whole group, then SIGKILL whatever is left of it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


HOOK = ScriptHook
