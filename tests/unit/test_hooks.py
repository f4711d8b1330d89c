"""The hook modules one at a time, without a server: Traefik's dynamic configuration as
rendered (with each grant's policy: per-router middlewares, alias hosts, a per-grant mode,
and a route whose auth cannot apply left unpublished rather than unguarded), the webhook's
signed request, the script's environment and stdin, and the option checks that stop a bad
config at start-up.

Hooks are built the way the server builds them (config file -> hookloader.build), and called
directly with SessionEvent objects; the webhook posts to a real receiver in a thread."""

import dataclasses
import hashlib
import hmac
import json
import os
import stat
import time

import pytest

from diglett import config, hookapi, hookloader, signals
from diglett.policy import Policy
from tests.support import harness
from tests.support.etcdfixture import etcd_server  # noqa: F401  (fixture)
from tests.support.hookfixtures import (
    kill_marked,
    pids_with,
    read_log,
    receiver,  # noqa: F401 (a fixture)
    recorder,
    write_script,
)
from tests.support.policies import APR1, FULL, with_policy

pytestmark = pytest.mark.timeout(20)


KEY = "02" + "ab" * 32


def event(name="foo", kind="connect", port=4001, host="127.0.0.1", reason=""):
    return signals.SessionEvent(kind=kind, subdomain=name, host=name + ".example.test",
                                listen_host=host, listen_port=port, agent_key=KEY,
                                session_id="0123456789abcdef", reason=reason)


def build(tmp_path, sections, sessions=()):
    """{name: hook} as the server would build them from a config with ``sections``."""
    gw = harness.Gateway(tmp_path / "gw", sections=sections)
    cfg = config.load_server(gw.config_path, hookloader.config_sections())
    context = hookapi.HookContext(cfg.domain, active_sessions=lambda: list(sessions),
                                     config_dir=str(cfg.path.parent))
    return dict(hookloader.build(cfg, context))


def traefik_hook(tmp_path, sessions=(), **options):
    sections = {"hooks": {"enabled": "traefik"},
                "hook:traefik": {"api": "http://127.0.0.1:9", **options}}
    return build(tmp_path, sections, sessions)["traefik"]


# ----- Traefik rendering --------------------------------------------------------------------
def test_traefik_http_defaults(tmp_path):
    hook = traefik_hook(tmp_path)
    assert hook.render([event("foo", port=4001), event("bar", port=4002)]) == {"http": {
        "routers": {
            "diglett-foo": {"service": "diglett-foo", "rule": "Host(`foo.example.test`)"},
            "diglett-bar": {"service": "diglett-bar", "rule": "Host(`bar.example.test`)"},
        },
        "services": {
            "diglett-foo": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:4001"}]}},
            "diglett-bar": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:4002"}]}},
        },
    }}


def test_traefik_http_with_tls_middlewares_and_entrypoints(tmp_path):
    hook = traefik_hook(tmp_path, cert_resolver="le", middlewares="auth@file, gzip@file",
                        entrypoints="websecure", upstream_host="10.0.0.5")
    rendered = hook.render([event("foo", port=4001)])
    assert rendered == {"http": {
        "routers": {"diglett-foo": {
            "service": "diglett-foo", "rule": "Host(`foo.example.test`)",
            "entryPoints": ["websecure"], "middlewares": ["auth@file", "gzip@file"],
            "tls": {"certResolver": "le"},
        }},
        "services": {"diglett-foo": {"loadBalancer": {"servers": [
            {"url": "http://10.0.0.5:4001"}]}}},
    }}
    json.dumps(rendered)  # what is PUT must be plain JSON


def test_traefik_http_without_cert_resolver_has_no_tls(tmp_path):
    router = traefik_hook(tmp_path, entrypoints="web").render([event()])["http"]["routers"]
    assert "tls" not in router["diglett-foo"] and "middlewares" not in router["diglett-foo"]
    assert router["diglett-foo"]["entryPoints"] == ["web"]


def test_traefik_ipv6_upstream_is_bracketed(tmp_path):
    services = traefik_hook(tmp_path).render([event(host="::1")])["http"]["services"]
    assert services["diglett-foo"]["loadBalancer"]["servers"] == [{"url": "http://[::1]:4001"}]


def test_traefik_tcp_passthrough(tmp_path):
    hook = traefik_hook(tmp_path, mode="tcp", entrypoints="websecure")
    assert hook.render([event("foo", port=4001)]) == {"tcp": {
        "routers": {"diglett-foo": {
            "service": "diglett-foo", "rule": "HostSNI(`foo.example.test`)",
            "entryPoints": ["websecure"], "tls": {"passthrough": True},
        }},
        "services": {"diglett-foo": {"loadBalancer": {"servers": [
            {"address": "127.0.0.1:4001"}]}}},
    }}


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_traefik_no_session_sends_explicit_empty_maps(tmp_path, mode):
    # Traefik ignores a PUT of {} or {"http": {}} and keeps serving the old routes
    assert traefik_hook(tmp_path, mode=mode).render([]) == {mode: {"routers": {},
                                                                   "services": {}}}


def test_traefik_renders_the_active_sessions(tmp_path):
    hook = traefik_hook(tmp_path, sessions=[event("foo")])
    assert list(hook.render(hook.context.active_sessions())["http"]["routers"]) == \
        ["diglett-foo"]


# ----- webhook ------------------------------------------------------------------------------
def webhook_hook(tmp_path, url, **options):
    sections = {"hooks": {"enabled": "webhook"}, "hook:webhook": {"url": url, **options}}
    return build(tmp_path, sections)["webhook"]


@pytest.mark.timeout(20)
def test_webhook_signs_the_raw_body(tmp_path, receiver):
    hook = webhook_hook(tmp_path, receiver.url, secret="k3y", timeout="5")
    sent = event(kind="disconnect", reason="kicked")
    hook.session_ended(sent)
    (request,) = receiver.requests
    raw, headers = request["body"], request["headers"]
    mac = hmac.new(b"k3y", raw, hashlib.sha256).hexdigest()
    assert headers["x-diglett-signature"] == "sha256=" + mac
    assert headers["x-diglett-event-id"] == sent.event_id
    assert headers["content-type"] == "application/json"
    assert json.loads(raw) == sent.fields()
    assert json.loads(raw)["reason"] == "kicked"


@pytest.mark.timeout(20)
def test_webhook_without_secret_is_unsigned(tmp_path, receiver):
    webhook_hook(tmp_path, receiver.url).session_started(event())
    assert "x-diglett-signature" not in receiver.requests[0]["headers"]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mode, words", [("500", "answered 500"), ("down", "refused"),
                                         ("hang", "timed out")])
def test_webhook_failures_raise(tmp_path, receiver, mode, words):
    hook = webhook_hook(tmp_path, receiver.url, timeout="0.5")
    receiver.set_mode(mode)
    with pytest.raises(Exception, match=words) as failure:
        hook.session_started(event())
    assert receiver.url in str(failure.value)


def test_webhook_secret_is_masked(tmp_path):
    sections = {"hooks": {"enabled": "webhook"},
                "hook:webhook": {"url": "http://127.0.0.1:9/", "secret": "hunter2"}}
    gw = harness.Gateway(tmp_path / "gw", sections=sections)
    cfg = config.load_server(gw.config_path, hookloader.config_sections())
    assert "hunter2" not in repr(cfg.sections["hook:webhook"])


# ----- script -------------------------------------------------------------------------------
def script_hook(tmp_path, command, timeout="5"):
    sections = {"hooks": {"enabled": "script"},
                "hook:script": {"command": command, "timeout": timeout}}
    return build(tmp_path, sections)["script"]


@pytest.mark.timeout(20)
def test_script_environment_and_stdin(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "do-not-pass")
    command, log = recorder(tmp_path)
    hook = script_hook(tmp_path, command)
    sent = event(kind="disconnect", reason="revoked")
    hook.session_ended(sent)
    (run,) = read_log(log)
    assert run["env"] == {
        "DIGLETT_EVENT": "disconnect", "DIGLETT_SUBDOMAIN": "foo",
        "DIGLETT_HOST": "foo.example.test", "DIGLETT_ADDRESS": "127.0.0.1",
        "DIGLETT_PORT": "4001", "DIGLETT_AGENT_KEY": KEY, "DIGLETT_SESSION": "0123456789abcdef",
        "DIGLETT_REASON": "revoked", "DIGLETT_EVENT_ID": sent.event_id,
    }
    assert json.loads(run["stdin"]) == sent.fields()
    assert "SECRET_TOKEN" not in run["keys"]


@pytest.mark.timeout(20)
def test_script_connect_has_empty_reason(tmp_path):
    command, log = recorder(tmp_path)
    script_hook(tmp_path, command).session_started(event())
    (run,) = read_log(log)
    assert run["env"]["DIGLETT_EVENT"] == "connect" and run["env"]["DIGLETT_REASON"] == ""


@pytest.mark.timeout(20)
def test_script_nonzero_exit_raises_with_its_output(tmp_path):
    script = write_script(tmp_path, "fail.py", "print('no route for you')\nraise SystemExit(3)\n")
    with pytest.raises(Exception, match=r"exited with status 3: no route for you"):
        script_hook(tmp_path, str(script)).session_started(event())


@pytest.mark.timeout(20)
def test_script_timeout_kills_the_group(tmp_path):
    marker = "diglett-unit-hang-%d" % time.time_ns()
    body = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', sys.argv[1]])\n"
            "time.sleep(60)\n")
    script = write_script(tmp_path, "hang.py", body)
    hook = script_hook(tmp_path, "%s %s" % (script, marker), timeout="0.5")
    started = time.monotonic()
    with pytest.raises(Exception, match="timed out after 0.5 s"):
        hook.session_started(event())
    assert time.monotonic() - started < 5
    assert not pids_with(marker)


def test_script_leaving_a_child_on_its_pipe_does_not_hang_the_hook(tmp_path):
    marker = "diglett-unit-daemon-%d" % time.time_ns()
    body = ("import os, subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', sys.argv[1]])\n"
            "open(sys.argv[2], 'w').write(str(os.getpid()))\n")
    script = write_script(tmp_path, "daemon.py", body)
    pid_file = tmp_path / "script.pid"
    hook = script_hook(tmp_path, "%s %s %s" % (script, marker, pid_file))
    try:
        started = time.monotonic()
        hook.session_started(event())  # the child still holds stdout: the hook must not wait
        took = time.monotonic() - started
        assert took < 5, "the hook waited %.1f s for a background child" % took
        assert pids_with(marker), "the test's background child should still run"
        pid = int(pid_file.read_text())
        assert not os.path.exists("/proc/%d" % pid), "the script was not reaped (a zombie)"
    finally:
        kill_marked(marker)


@pytest.mark.timeout(20)
def test_script_arguments_are_not_a_shell(tmp_path):
    command, log = recorder(tmp_path)
    hook = script_hook(tmp_path, command + " ';touch %s'" % (tmp_path / "pwned"))
    hook.session_started(event())
    assert read_log(log) and not (tmp_path / "pwned").exists()


# ----- option checks ------------------------------------------------------------------------
def not_executable(tmp_path):
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode & ~(stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
    return str(path)


@pytest.mark.parametrize("sections, words", [
    ({"hooks": {"enabled": "nosuchhook"}}, ["nosuchhook", "not installed", "script"]),
    ({"hooks": {"enabled": "webhook"}}, ["[hook:webhook] has no url"]),
    ({"hooks": {"enabled": "webhook"}, "hook:webhook": {"url": "ftp://x/"}}, ["http://"]),
    ({"hooks": {"enabled": "traefik"}, "hook:traefik": {"api": "127.0.0.1:8080"}},
     ["api must be an http"]),
    ({"hooks": {"enabled": "traefik"}, "hook:traefik": {"api": "http://h", "mode": "udp"}},
     ["mode must be http or tcp"]),
    ({"hooks": {"enabled": "script"}}, ["[hook:script] has no command"]),
    ({"hooks": {"enabled": "script"}, "hook:script": {"command": "/nonexistent/hook"}},
     ["not an executable"]),
], ids=["unknown-hook", "webhook-no-url", "webhook-bad-url", "traefik-no-scheme",
        "traefik-bad-mode", "script-no-command", "script-missing"])
def test_bad_hook_options_name_the_file(tmp_path, sections, words):
    with pytest.raises(hookloader.HookError) as failure:
        build(tmp_path, sections)
    message = str(failure.value)
    assert str(tmp_path / "gw" / "server.conf") in message
    for word in words:
        assert word in message


def test_non_executable_script_is_refused(tmp_path):
    path = not_executable(tmp_path)
    with pytest.raises(hookloader.HookError, match="not an executable"):
        build(tmp_path, {"hooks": {"enabled": "script"}, "hook:script": {"command": path}})


@pytest.mark.parametrize("sections, words", [
    ({"hook:script": {"command": "/bin/true", "timout": "3"}}, ["unknown key timout"]),
    ({"hook:traefik": {"api": "http://h", "check_interval": "soon"}}, ["check_interval"]),
    ({"hooks": {"max_attempts": "-1"}}, ["max_attempts"]),
], ids=["typo", "bad-seconds", "negative-attempts"])
def test_bad_hook_values_are_config_errors(tmp_path, sections, words):
    gw = harness.Gateway(tmp_path / "gw", sections=sections)
    with pytest.raises(config.ConfigError) as failure:
        config.load_server(gw.config_path, hookloader.config_sections())
    for word in words:
        assert word in str(failure.value)
    assert str(gw.config_path) in str(failure.value)


def test_no_hooks_enabled_builds_nothing(tmp_path):
    assert build(tmp_path, {}) == {}


@pytest.mark.timeout(30)
def test_rest_renders_each_grant_its_own_middlewares(tmp_path):
    hook = traefik_hook(tmp_path, middlewares="headers@file", cert_resolver="le")
    rendered = hook.render([with_policy(event("foo", port=4001), FULL), event("bar", port=4002)])
    http = rendered["http"]
    assert http["routers"]["diglett-foo"] == {
        "service": "diglett-foo",
        "rule": "Host(`foo.example.test`) || Host(`www.customer.test`)",
        "middlewares": ["headers@file", "diglett-allow-foo", "diglett-fwd-foo",
                        "diglett-auth-foo", "gzip@file"],
        "tls": {"certResolver": "le"},
    }
    assert http["middlewares"] == {
        "diglett-allow-foo": {"ipAllowList": {"sourceRange": ["127.0.0.1/32"]}},
        "diglett-fwd-foo": {"forwardAuth": {"address": "http://127.0.0.1:9091/check"}},
        "diglett-auth-foo": {"basicAuth": {"users": ["alice:" + APR1]}},
    }
    assert http["routers"]["diglett-bar"]["middlewares"] == ["headers@file"]  # only global


@pytest.mark.timeout(30)
def test_rest_puts_a_grant_of_the_other_mode_in_its_own_section(tmp_path):
    hook = traefik_hook(tmp_path)
    tcp = with_policy(event("db", port=4003), Policy(mode="tcp", allow=("10.0.0.0/8",),
                                                     aliases=("db.customer.test",)))
    rendered = hook.render([event("foo"), tcp])
    assert list(rendered["http"]["routers"]) == ["diglett-foo"]
    assert rendered["tcp"]["routers"]["diglett-db"] == {
        "service": "diglett-db", "rule": "HostSNI(`db.example.test`) || "
        "HostSNI(`db.customer.test`)", "tls": {"passthrough": True},
        "middlewares": ["diglett-allow-db"]}
    assert rendered["tcp"]["middlewares"] == {
        "diglett-allow-db": {"ipAllowList": {"sourceRange": ["10.0.0.0/8"]}}}
    assert rendered["tcp"]["services"]["diglett-db"]["loadBalancer"]["servers"] == [
        {"address": "127.0.0.1:4003"}]


@pytest.mark.timeout(30)
def test_rest_leaves_out_a_route_whose_auth_cannot_apply(tmp_path, caplog):
    hook = traefik_hook(tmp_path, mode="tcp")  # the grant names no mode: the hook's is tcp
    guarded = with_policy(event("foo"), Policy(basic_auth=("alice:" + APR1,)))
    assert hook.render([guarded, event("bar")])["tcp"]["routers"].keys() == {"diglett-bar"}
    assert "foo not published" in caplog.text


@pytest.mark.timeout(30)
def test_rest_never_routes_an_alias_inside_the_tunnel_domain(tmp_path):
    hook = traefik_hook(tmp_path)
    sneaky = dataclasses.replace(event("foo"), policy={"aliases": ["bar.example.test",
                                                                   "www.customer.test"]})
    rule = hook.render([sneaky])["http"]["routers"]["diglett-foo"]["rule"]
    assert rule == "Host(`foo.example.test`) || Host(`www.customer.test`)"


@pytest.mark.timeout(30)
def test_rest_update_pushes_the_whole_configuration_again(tmp_path):
    hook = traefik_hook(tmp_path)
    calls = []
    hook.sync = lambda: calls.append("sync")
    hook.session_updated(with_policy(event("foo"), FULL))
    assert calls == ["sync"]


@pytest.mark.timeout(30)
def test_rest_without_reuse_gives_each_http_route_a_transport_keeping_no_idle_connection(
        tmp_path):
    hook = traefik_hook(tmp_path, reuse_connections="no")
    http = hook.render([event("foo", port=4001)])["http"]
    assert http["services"]["diglett-foo"]["loadBalancer"]["serversTransport"] == "diglett-foo"
    assert http["serversTransports"] == {"diglett-foo": {"maxIdleConnsPerHost": -1}}
    default = traefik_hook(tmp_path / "b").render([event("foo", port=4001)])["http"]
    assert "serversTransports" not in default
