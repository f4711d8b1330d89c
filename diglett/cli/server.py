"""diglett-server: run the gateway, e.g. ``diglett-server -c /etc/diglett.conf``."""

from gevent import monkey

monkey.patch_all()  # before anything else imports socket, threading or ssl

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from diglett import __version__, config, crypto, hookloader  # noqa: E402
from diglett.cli import logs  # noqa: E402
from diglett.httpapi import make_app  # noqa: E402
from diglett.registry import Registry, RegistryError  # noqa: E402
from diglett.server import Server  # noqa: E402

log = logging.getLogger("diglett.cli.server")
DEFAULT_CONFIG = "/etc/diglett.conf"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="diglett-server", description="Run the diglett gateway: agents dial it, and it "
        "opens a tunnel port for each agent whose key holds a grant for its name.")
    parser.add_argument("-c", "--config", default=os.environ.get("DIGLETT_CONFIG", DEFAULT_CONFIG),
                        help="config file (default: $DIGLETT_CONFIG or %s)" % DEFAULT_CONFIG)
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS,
                        help="override [server] log_level")
    parser.add_argument("--version", action="version", version="diglett-server %s" % __version__)
    return parser.parse_args(argv)


def fail(message, code=1):
    print("diglett-server: error: %s" % message, file=sys.stderr)
    return code


def main(argv=None):
    args = parse_args(argv)
    try:
        hookloader.register_config_sections()
        cfg = config.load_server(args.config)
        context = hookloader.HookContext(cfg.domain, config_dir=str(cfg.path.parent))
        hook_objects = hookloader.build(cfg, context)  # bad hook options stop us here
    except (config.ConfigError, hookloader.HookError) as exc:
        return fail(exc, 2)
    if args.check:
        print("%s: OK" % cfg.path)
        return 0
    logs.setup(args.log_level or cfg.log_level)
    try:
        registry = Registry(cfg.database, create_dirs=True)
        server = Server(cfg, registry)
        context.active_sessions = server.active_session_events
        hooks = hookloader.Hooks(hook_objects, registry, server.db, cfg.sections["hooks"])
        hooks.start()
        host, port = server.start()
        http = WSGIServer(cfg.http, make_app(server), log=None, error_log=log)
        http.start()
    except (RegistryError, crypto.KeyFileError) as exc:
        return fail(exc)
    except OSError as exc:
        return fail("cannot listen: %s (check listen and http in %s)" % (exc, cfg.path))
    log.info("diglett-server %s ready: agents=%s:%d http=%s:%d domain=%s key=%s",
             __version__, host, port, *http.address[:2], cfg.domain, server.public_key)
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    stop.wait()
    log.info("stopping: ending %d sessions", len(server.sessions))
    deadline = time.monotonic() + cfg.shutdown_timeout
    server.stop()
    hooks.stop(max(1.0, deadline - time.monotonic()))  # one budget for sessions and hooks
    http.stop(timeout=1)
    registry.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
