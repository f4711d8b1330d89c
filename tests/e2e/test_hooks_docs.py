"""docs/hooks.md, etc/diglett.conf and etc/examples/ agree with the hooks' declared options.

Every option of every built-in hook (its OPTIONS) is documented in docs/hooks.md with its
default and shown in the reference etc/diglett.conf; the example configs load; the examples
written in docs/hooks.md (the webhook signature, the third-party hook) work as printed.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from diglett.hooks import webhook

from diglett import config, hookapi, hookloader, signals

ROOT = Path(__file__).resolve().parents[2]
HOOKS_DOC = ROOT / "docs" / "hooks.md"
REFERENCE = ROOT / "etc" / "diglett.conf"
EXAMPLES = ROOT / "etc" / "examples"


def builtin_hooks():
    return {name: load() for name, load in hookloader.available().items()
            if name in hookloader.BUILTIN}


def doc_part(heading):
    """The text of docs/hooks.md under ``heading`` (a ``## `` line), up to the next one."""
    text = HOOKS_DOC.read_text()
    assert heading in text, heading
    return text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]


def doc_rows(heading):
    """{option: [cells]} of the option table under ``heading``."""
    return {m[1]: [cell.strip() for cell in m[0].split("|")[1:-1]]
            for m in re.finditer(r"^\| `([a-z_]+)` \|.*\|$", doc_part(heading), re.M)}


def reference_block(section):
    """The lines of the commented-out ``# [section]`` block of etc/diglett.conf, uncommented."""
    lines = REFERENCE.read_text().splitlines()
    start = lines.index("# [%s]" % section)
    block = []
    for line in lines[start:]:
        if not line.startswith("#") or (block and line.startswith("# [")):
            break
        block.append(line[2:] if line.startswith("# ") else line[1:])
    return block


def shown_options(section):
    """{option: value} set (uncommented) in the reference block of ``section``."""
    found = {}
    for line in reference_block(section):
        match = re.match(r"([a-z_]+) =(?: (.*))?$", line)
        if match:
            assert match[1] not in found, "[%s] %s shown twice" % (section, match[1])
            found[match[1]] = match[2] or ""
    return found


def test_the_builtin_hooks_are_all_found():
    assert set(builtin_hooks()) == {"script", "traefik", "traefik-etcd", "webhook"}


@pytest.mark.parametrize("name", sorted(hookloader.BUILTIN))
def test_every_option_is_documented_with_its_type_and_default(name):
    options = builtin_hooks()[name].OPTIONS
    rows = doc_rows("## `[hook:%s]`" % name)
    assert set(rows) == set(options), name
    for option, (kind, default, doc) in options.items():
        cells = rows[option]
        shown_type = {"seconds": "duration"}.get(kind, kind)
        assert cells[1] == shown_type, (name, option)
        expected = "(required)" if default is None else ("`%s`" % default if default else "(empty)")
        assert cells[2] == expected, (name, option)
        assert cells[3], (name, option)


def test_the_hooks_section_is_documented_with_its_defaults():
    keys = hookloader.HOOKS_SECTION.keys
    rows = doc_rows("## The `[hooks]` section")
    assert set(rows) == set(keys)
    for key, spec in keys.items():
        assert rows[key][2] == ("`%s`" % spec.default if spec.default else "(empty)"), key


@pytest.mark.parametrize("name", sorted(hookloader.BUILTIN))
def test_every_option_is_in_the_reference_config_with_its_default(name):
    options = builtin_hooks()[name].OPTIONS
    shown = shown_options("hook:" + name)
    assert set(shown) == set(options), name
    block = reference_block("hook:" + name)
    for option, (kind, default, doc) in options.items():
        if default is not None:
            assert shown[option] == default, (name, option)
        line = next(i for i, text in enumerate(block) if text.startswith(option + " ="))
        assert block[line - 1].startswith("# "), "%s: no comment above %s" % (name, option)


def test_the_hooks_section_is_in_the_reference_config_with_its_defaults():
    shown = shown_options("hooks")
    assert shown == {key: spec.default for key, spec in hookloader.HOOKS_SECTION.keys.items()}


def test_the_reference_hook_sections_load_once_uncommented(tmp_path):
    """What a user gets by uncommenting the sections: it loads, and the hooks build."""
    script = tmp_path / "hook"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    parts = ["[server]"]
    for section in ("hooks", "hook:script", "hook:traefik", "hook:traefik-etcd", "hook:webhook"):
        parts += ["[%s]" % section] + reference_block(section)[1:]
    text = "\n".join(parts).replace("enabled =\n",
                                     "enabled = script, traefik, traefik-etcd, webhook\n")
    text = text.replace("/usr/local/lib/diglett/hook", str(script))
    path = tmp_path / "diglett.conf"
    path.write_text(text + "\n")
    cfg = config.load_server(path, hookloader.config_sections())
    assert cfg.sections["hooks"]["enabled"] == ("script", "traefik", "traefik-etcd", "webhook")
    built = hookloader.build(cfg, hookapi.HookContext(cfg.domain))
    assert [name for name, _ in built] == ["script", "traefik", "traefik-etcd", "webhook"]


def example_configs():
    """The server examples; agent-*.conf are agent configs (tests/e2e/test_systemd.py loads them)."""
    return sorted(path for path in EXAMPLES.glob("*.conf") if not path.name.startswith("agent-"))


def test_there_are_example_files():
    assert [path.name for path in example_configs()] == ["diglett.conf"]
    assert (EXAMPLES / "traefik.yml").is_file()


@pytest.mark.parametrize("path", example_configs(), ids=lambda path: path.name)
def test_example_configs_load_and_their_hooks_build(path):
    # paths under /var/lib/... are not touched by loading
    cfg = config.load_server(path, hookloader.config_sections())
    built = hookloader.build(cfg, hookapi.HookContext(cfg.domain))
    assert [name for name, _ in built] == list(cfg.sections["hooks"]["enabled"])


def test_the_gateway_example_matches_the_traefik_file():
    """The names diglett's example uses exist in the Traefik example, and the docs quote both."""
    cfg = config.load_server(EXAMPLES / "diglett.conf", hookloader.config_sections())
    traefik = (EXAMPLES / "traefik.yml").read_text()
    options = cfg.sections["hook:traefik"]
    assert cfg.sections["hooks"]["enabled"] == ("traefik",)
    for entrypoint in options["entrypoints"]:
        assert re.search(r"^  %s:$" % entrypoint, traefik, re.M), entrypoint
    assert re.search(r"^  %s:$" % options["cert_resolver"], traefik, re.M)
    api_address = options["api"].split("://", 1)[1]
    assert 'address: "%s"' % api_address in traefik
    assert api_address.startswith("127.0.0.1:")  # Traefik's API stays on loopback
    assert cfg.bind == "127.0.0.1"
    docs = HOOKS_DOC.read_text()
    for line in ("api = %s" % options["api"], "cert_resolver = %s" % options["cert_resolver"],
                 "address: \"%s\"" % api_address):
        assert line in docs, line


# --- the examples printed in docs/hooks.md ---------------------------------------------------


def documented_signature_vector():
    part = doc_part("## `[hook:webhook]`")
    body = re.search(r"```json\n(\{.*\})\n```", part)[1].encode()
    secret = re.search(r"With `secret = (\S+)`", part)[1]
    header = re.search(r"`X-Diglett-Signature: (sha256=[0-9a-f]{64})`", part)[1]
    return secret, body, header


def test_the_documented_signature_is_what_the_webhook_sends():
    secret, body, header = documented_signature_vector()
    assert webhook.signature(secret, body) == header
    fields = json.loads(body)  # and the body is exactly what the webhook would send
    event = signals.SessionEvent(
        kind=fields["event"], subdomain=fields["subdomain"], host=fields["host"],
        listen_host=fields["address"], listen_port=fields["port"], agent_key=fields["agent_key"],
        session_id=fields["session"], reason=fields["reason"], time=fields["time"],
        event_id=fields["event_id"])
    assert json.dumps(event.fields(), sort_keys=True).encode() == body


def test_the_documented_python_check_accepts_it():
    namespace = {}
    code = re.search(r"```python\n(import hashlib.*?)```", doc_part("## `[hook:webhook]`"), re.S)[1]
    exec(code, namespace)
    secret, body, header = documented_signature_vector()
    assert namespace["signature_ok"](secret, body, header)
    assert not namespace["signature_ok"](secret, body + b" ", header)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_the_documented_shell_check_accepts_it(tmp_path):
    secret, body, header = documented_signature_vector()
    code = re.search(r"```sh\n(expected=.*?)```", doc_part("## `[hook:webhook]`"), re.S)[1]
    (tmp_path / "body.json").write_bytes(body)
    result = subprocess.run(["sh", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "SECRET": secret, "SIGNATURE": header})
    assert result.stdout.strip() == "signature OK", result.stderr


def test_the_documented_third_party_hook_works(tmp_path, monkeypatch):
    code = re.search(r"```python\n(# diglett_journal/hook.py\n.*?)```",
                     doc_part("## Writing a hook"), re.S)[1]
    namespace = {}
    exec(code, namespace)
    journal = namespace["JournalHook"]
    builtin = hookloader.available
    monkeypatch.setattr(hookloader, "available", lambda: {**builtin(), "journal": lambda: journal})
    path = tmp_path / "diglett.conf"
    path.write_text("[hooks]\nenabled = journal\n[hook:journal]\nfile = events.jsonl\n")
    cfg = config.load_server(path, hookloader.config_sections())
    [(name, hook)] = hookloader.build(cfg, hookapi.HookContext(cfg.domain))
    event = signals.SessionEvent(kind="connect", subdomain="foo", host="foo.example.com",
                                 listen_host="127.0.0.1", listen_port=41234, agent_key="02" * 33,
                                 session_id="9c1d5e2a7b4f8e01")
    hook.session_started(event)
    assert (tmp_path / "events.jsonl").read_text().count(event.event_id) == 1
