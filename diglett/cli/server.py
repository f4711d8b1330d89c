"""diglett-server: run the gateway, e.g. ``diglett-server -c /etc/diglett.conf``."""

from gevent import monkey

monkey.patch_all()  # before anything else imports socket, threading or ssl

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from diglett import __version__, config, crypto, hookapi, hookloader, memory, readyfile  # noqa: E402
from diglett.cli import logs  # noqa: E402
from diglett.handoff import FdStore  # noqa: E402
from diglett.httpapi import make_app, make_server  # noqa: E402
from diglett.master import MasterGateway  # noqa: E402
from diglett.workers import WorkersNotReady  # noqa: E402
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
    parser.add_argument("--ready-file", metavar="PATH",
                        help="write PATH (JSON: addresses, key, pid) once ready, remove it on "
                        "stop; for scripts (docs/operations.md)")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS,
                        help="override [server] log_level")
    parser.add_argument("-v", "--verbose", action="store_const", const="debug",
                        dest="log_level", help="debug logging (same as --log-level debug)")
    parser.add_argument("--version", action="version", version="diglett-server %s" % __version__)
    return parser.parse_args(argv)


def fail(message, code=1):
    print("diglett-server: error: %s" % message, file=sys.stderr)
    return code


def load(path, sections):
    """The config and its hooks, built (so bad hook options are config errors too).

    ``sections``: hookloader.config_sections(), found once at start, so a reload does not
    import every hook again (nor warn again about one that cannot be imported)."""
    cfg = config.load_server(path, sections)
    context = hookapi.HookContext(cfg.domain, config_dir=str(cfg.path.parent),
                                     gateway_id=cfg.gateway_id)
    return cfg, context, hookloader.build(cfg, context)


class Gateway:
    """The running parts of one diglett-server process, and how they start, reload and stop."""

    def __init__(self, cfg, context, hook_objects, sections, log_level_flag=None):
        self.cfg = cfg
        self.sections = sections  # the hooks' config sections, for reloads
        self.log_level_flag = log_level_flag
        self.registry = Registry(cfg.database, create_dirs=True)
        self.server = Server(cfg, self.registry, FdStore())
        self.hooks = self._start_hooks(cfg, context, hook_objects)
        self.agent_address = self.server.start()
        app = make_app(self.server, lambda: self.hooks)  # a reload replaces self.hooks
        self.http = make_server(cfg.http, app)
        self.http.start()

    @property
    def public_key(self):
        return self.server.public_key

    @property
    def fdstore(self):
        return self.server.fdstore

    @property
    def doors(self):
        return self.server.doors

    def _start_hooks(self, cfg, context, hook_objects):
        context.active_sessions = self.server.active_session_events
        hooks = hookloader.Hooks(hook_objects, self.registry, self.server.db, cfg.sections["hooks"],
                                 gateway=self.server.gateway_id)
        hooks.start()
        self.server.hook_names = tuple(hooks.names)
        return hooks

    def reload(self):
        """SIGHUP: apply what can change live; say what needs a restart. Tunnels stay up."""
        try:
            cfg, context, hook_objects = load(self.cfg.path, self.sections)
        except (config.ConfigError, hookloader.HookError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        for key in self.server.apply_config(cfg):
            log.warning("reload: %s changed in %s; it takes effect after a restart", key, cfg.path)
        logs.set_level(self.log_level_flag or cfg.log_level)
        if hookloader.sections_of(cfg) != hookloader.sections_of(self.cfg):
            self.hooks.stop(0)  # queued deliveries stay in the outbox for the new dispatchers
            self.hooks = self._start_hooks(cfg, context, hook_objects)
            log.info("reload: hooks now %s", ", ".join(self.hooks.names) or "(none)")
        self.cfg = cfg
        log.info("reloaded %s", cfg.path)

    def stop(self):
        log.info("stopping: draining %d sessions", len(self.server.sessions))
        self.server.stop()
        self.hooks.stop(self.cfg.shutdown_timeout)
        self.http.stop(timeout=1)
        self.registry.close()
        log.info("stopped")


def main(argv=None):
    args = parse_args(argv)
    try:
        sections = hookloader.config_sections()
        cfg, context, hook_objects = load(args.config, sections)
    except (config.ConfigError, hookloader.HookError) as exc:
        return fail(exc, 2)
    if args.check:
        print("%s: OK" % cfg.path)
        return 0
    logs.setup(args.log_level or cfg.log_level, cfg.log_format)
    try:
        aead = crypto.get_backend().name  # the record cipher every session will use
    except ValueError as exc:
        return fail("%s: %s" % (crypto.AEAD_ENV, exc), 2)
    if args.ready_file:
        readyfile.remove(args.ready_file)  # a waiting script must not read the last run's
    try:
        if cfg.workers > 1:
            gateway = MasterGateway(cfg, context, hook_objects,
                                    lambda: load(cfg.path, sections), args.log_level)
        else:
            gateway = Gateway(cfg, context, hook_objects, sections, args.log_level)
    except (RegistryError, crypto.KeyFileError, WorkersNotReady) as exc:
        return fail(exc)
    except OSError as exc:
        return fail("cannot listen: %s (check listen and http in %s)" % (exc, cfg.path))
    log.info("diglett-server %s ready: agents=%s:%d http=%s:%d domain=%s key=%s cipher=%s "
             "gateway=%s workers=%d", __version__, *gateway.agent_address,
             *gateway.http.address[:2], cfg.domain, gateway.public_key, aead, cfg.gateway_id,
             cfg.workers)
    if args.ready_file:
        info = readyfile.info(__version__, gateway.agent_address, gateway.http.address,
                              cfg.domain, gateway.public_key, aead, cfg.gateway_id)
        info["workers"] = cfg.workers
        readyfile.write(args.ready_file, info)
    gateway.fdstore.notify("READY=1\nSTATUS=serving %d agent ports" % len(gateway.doors))
    tidy = memory.keep_tidy()
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(gateway.reload))
    stop.wait()
    gateway.fdstore.notify("STOPPING=1")
    tidy.kill()
    if args.ready_file:
        readyfile.remove(args.ready_file)
    gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
