"""A private OpenSSH server on loopback with throwaway keys, for tests that carry ssh."""

import os
import shutil
import subprocess

from tests.support.harness import Proc, free_port


def keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, capture_output=True, timeout=20)


def start_sshd(folder):
    """An sshd on 127.0.0.1:<free port> with throwaway keys; returns (port, client key path)."""
    folder.mkdir()
    keygen(folder / "host_key")
    keygen(folder / "client_key")
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    port = free_port()
    config = folder / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1:%d" % port,
        "HostKey %s" % (folder / "host_key"),
        "AuthorizedKeysFile %s" % (folder / "authorized_keys"),
        "PidFile none", "StrictModes no", "UsePAM no", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "LogLevel VERBOSE", ""]))
    sshd = Proc(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], folder, "sshd")
    sshd.wait_for("Server listening on 127.0.0.1 port %d" % port, timeout=10)
    return port, folder / "client_key"
