"""systemd's half of a ``Type=notify`` service with ``FileDescriptorStoreMax=``, for tests
and bench/handover.py (systemd cannot run as PID 1 here).

It speaks the documented protocols only: it receives sd_notify datagrams on NOTIFY_SOCKET
(``READY=1``, ``STOPPING=1``, ``FDSTORE=1`` + ``FDNAME=`` with the descriptor as SCM_RIGHTS,
``FDSTOREREMOVE=1``), keeps the stored descriptors, and starts the next run with them as
``LISTEN_FDS`` / ``LISTEN_FDNAMES`` from fd 3 and ``LISTEN_PID`` set to the new process.
"""

import array
import fcntl
import os
import socket
import threading

MAX_FDS = 64  # per message; diglett sends one


class FdStoreSupervisor:
    def __init__(self, folder, store_max=4096):
        self.path = os.path.join(str(folder), "notify.sock")
        self.store_max = store_max
        self.fds = {}  # name -> our copy of the stored descriptor, in store order
        self.messages = []  # every state received, for the test to look at
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        threading.Thread(target=self._receive, daemon=True).start()

    def environment(self):
        """The variables systemd gives the service, except LISTEN_PID (set by ``argv``)."""
        with self.lock:
            names = list(self.fds)
        env = {"NOTIFY_SOCKET": self.path, "FDSTORE": str(self.store_max)}
        if names:
            env.update(LISTEN_FDS=str(len(names)), LISTEN_FDNAMES=":".join(names))
        return env

    def popen_args(self, argv):
        """(argv, preexec_fn) that start ``argv`` as systemd would: the stored descriptors
        at 3, 4, ... and LISTEN_PID naming the process itself (the shell execs in place)."""
        with self.lock:
            fds = list(self.fds.values())
        self.ready.clear()

        def place_descriptors():  # in the child, between fork and exec
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
            for number, fd in enumerate(high):
                os.dup2(fd, 3 + number)  # inheritable, unlike the copies
                os.close(fd)

        wrapped = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh"] + list(argv)
        return (wrapped if fds else list(argv)), place_descriptors

    def popen(self, argv, env):
        """(argv, env, extra Popen keywords) to start ``argv`` under this supervisor."""
        argv, place = self.popen_args(argv)
        return argv, {**env, **self.environment()}, {"close_fds": False, "preexec_fn": place}

    def stored(self):
        with self.lock:
            return list(self.fds)

    def close(self):
        self.sock.close()
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()

    def _receive(self):
        space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        while True:
            try:
                # CLOEXEC: our copies must not leak into the service as extra descriptors
                data, ancillary, _, _ = self.sock.recvmsg(4096, space, socket.MSG_CMSG_CLOEXEC)
            except OSError:
                return
            fds = array.array("i")
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            self._handle(dict(line.split("=", 1) for line in data.decode().splitlines()
                              if "=" in line), list(fds))

    def _handle(self, state, fds):
        with self.lock:
            self.messages.append(state)
            name = state.get("FDNAME", "stored")
            if state.get("FDSTORE") == "1" and fds:
                old = self.fds.pop(name, None)
                if old is not None:
                    os.close(old)
                self.fds[name] = fds.pop(0)
            elif state.get("FDSTOREREMOVE") == "1" and name in self.fds:
                os.close(self.fds.pop(name))
            for fd in fds:  # not asked to be stored
                os.close(fd)
        if state.get("READY") == "1":
            self.ready.set()

