"""One worker process of a diglett-server with ``workers > 1`` (started by diglett.workers).

Not for people: the master runs ``python -m diglett.cli.worker`` with its channel (a unix
SEQPACKET socket) as an inherited descriptor. The worker is a whole diglett Server under its
own gateway id (``GATEWAY_ID.wN``) that binds no agent socket: the master passes each agent
connection over the channel (diglett.channel) and it goes on exactly as an accepted one; a
name's tunnel port moves between workers over it too (diglett.gateway.siblings). The
worker runs no hooks (the master delivers every worker's outbox rows; a ``wake`` message
after each commit saves it the poll), and serves its HTTP API only on a unix socket, which
the master reads for /metrics and /api/tunnels. SIGTERM drains as a single server does; a
closed channel (the master died) does too.
"""

from gevent import monkey

monkey.patch_all()  # before anything else imports socket, threading or ssl

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent import socket  # noqa: E402

from diglett import channel as channels  # noqa: E402
from diglett import config, handoff, hookloader, memory, signals  # noqa: E402
from diglett.cli import logs  # noqa: E402
from diglett.httpapi import make_app, make_server  # noqa: E402
from diglett.registry import Registry, RegistryError  # noqa: E402
from diglett.channel import READY, WAKE  # noqa: E402
from diglett.gateway.siblings import Siblings  # noqa: E402
from diglett.server import Server  # noqa: E402

log = logging.getLogger("diglett.cli.worker")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="diglett-worker")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--http-socket", required=True)
    parser.add_argument("--listen", required=True, help="the master's agent address")
    parser.add_argument("--gateway-id", required=True)
    parser.add_argument("--log-level", choices=config.LOG_LEVELS)
    return parser.parse_args(argv)


def worker_config(args):
    # the hooks' sections are read as they are (the master built and checked the hooks)
    cfg = config.load_server(args.config, hookloader.config_sections())
    host, port = args.listen.rsplit(":", 1)
    # http: open to every request, as loopback is: the socket's directory is the master's
    # (0700), and only the master connects.
    return dataclasses.replace(cfg, listen=(host.strip("[]"), int(port)),
                               gateway_id=args.gateway_id, http=("127.0.0.1", 0))


def serve_channel(server, siblings, channel, stop):
    """What the master sends: connections to serve, and door moves between workers."""
    while True:
        try:
            message = channels.receive(channel)
        except OSError as exc:
            log.error("channel to the master failed: %s", exc)
            message = None
        if message is None:
            log.warning("the master closed the channel: stopping")
            stop.set()
            return
        text, sock = message
        if text.startswith("door:"):
            siblings.delivered(text[len("door:"):], sock)
        elif text.startswith("visitor:") and sock is not None:
            siblings.visitor(text[len("visitor:"):], sock)
        elif text.startswith("give?"):
            requester, _, name = text[len("give?"):].partition("?")
            gevent.spawn(siblings.give, requester, name)
        elif sock is not None:
            server.serve_passed(sock, text)


def tell_master(channel, message):
    try:
        channels.send(channel, message)
    except OSError:
        pass  # the master is gone; serve_channel notices and stops


def http_listener(path):
    if os.path.exists(path):
        os.unlink(path)  # the last run of this worker's
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    return sock


def main(argv=None):
    args = parse_args(argv)
    channel = socket.socket(fileno=args.channel_fd)
    os.set_inheritable(args.channel_fd, False)  # hook scripts must not hold it
    try:
        cfg = worker_config(args)
    except (config.ConfigError, hookloader.HookError) as exc:
        # the file changed since the master read it, and this worker was restarted
        logs.setup(args.log_level or "info", "text", worker=args.index)
        log.error("worker %d cannot read its config: %s", args.index, exc)
        return 2
    logs.setup(args.log_level or cfg.log_level, cfg.log_format, worker=args.index)
    try:
        registry = Registry(cfg.database)
        server = Server(cfg, registry, handoff.FdStore({}), worker=True)
        siblings = server.siblings = Siblings(server, channel)
        server.start()
    except (RegistryError, OSError) as exc:
        log.error("worker %d cannot start: %s", args.index, exc)
        return 1
    http = make_server(http_listener(args.http_socket), make_app(server))
    http.start()

    def wake(sender, **extra):
        tell_master(channel, WAKE)

    for signal_ in (signals.session_started, signals.session_ended, signals.session_updated):
        signal_.connect(wake, weak=False)
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(reload, server, args))
    reader = gevent.spawn(serve_channel, server, siblings, channel, stop)
    tidy = memory.keep_tidy()
    log.info("worker %d ready: gateway=%s", args.index, cfg.gateway_id)
    tell_master(channel, READY)
    stop.wait()
    tidy.kill()
    reader.kill()
    server.stop()
    tell_master(channel, WAKE)  # the sessions' ends are committed: deliver them
    http.stop(timeout=1)
    registry.close()
    return 0


def reload(server, args):
    try:
        cfg = worker_config(args)
    except config.ConfigError as exc:
        log.error("reload refused, keeping the running config: %s", exc)
        return
    server.apply_config(cfg)  # the master logs which keys need a restart
    logs.set_level(args.log_level or cfg.log_level)
    log.info("worker %d reloaded %s", args.index, cfg.path)


if __name__ == "__main__":
    sys.exit(main())
