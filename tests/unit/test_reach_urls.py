"""Gateway URLs and proxy choice: what users write, what the agent makes of it (no sockets)."""

import pytest

from diglett.reach import gateway_url, proxy
from diglett.reach.gateway_url import GatewayUrl, GatewayUrlError
from diglett.reach.proxy import ProxyUrlError

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("text, expected", [
    ("gw.example.com:20000", GatewayUrl("tcp", "gw.example.com", 20000)),
    ("tcp://10.0.0.1:20000", GatewayUrl("tcp", "10.0.0.1", 20000)),
    ("tls://gw.example.com", GatewayUrl("tls", "gw.example.com", 443)),
    ("tls://gw.example.com:8443/", GatewayUrl("tls", "gw.example.com", 8443)),
    ("wss://gw.example.com/diglett", GatewayUrl("wss", "gw.example.com", 443, "/diglett")),
    ("wss://gw.example.com", GatewayUrl("wss", "gw.example.com", 443, "/diglett")),
    ("ws://[::1]:8080/x/y", GatewayUrl("ws", "::1", 8080, "/x/y")),
    ("WSS://GW.example.com:444/t", GatewayUrl("wss", "gw.example.com", 444, "/t")),
])
def test_gateway_urls_users_can_guess(text, expected):
    assert gateway_url.parse(text) == expected


@pytest.mark.parametrize("text, words", [
    ("gw.example.com", "missing :PORT"),
    ("ftp://gw.example.com", "unknown scheme 'ftp'"),
    ("tls://gw.example.com/path", "a path needs ws:// or wss://"),
    ("wss://:443/diglett", "no host"),
    ("gw:0", "port must be 1-65535"),
    ("gw:70000", "out of range"),
    ("wss://gw/diglett?x=1", "only SCHEME://HOST:PORT/PATH"),
])
def test_bad_gateway_urls_say_what_is_wrong(text, words):
    with pytest.raises(GatewayUrlError, match="bad gateway '%s'" % text.replace("?", ".")) as info:
        gateway_url.parse(text)
    assert words in str(info.value)


def test_a_fleet_mixes_transports_and_prints_back_as_written():
    fleet = gateway_url.parse_list("wss://a.example.com/diglett, b.example.com:20000")
    assert [str(g) for g in fleet] == ["wss://a.example.com:443/diglett", "b.example.com:20000"]
    with pytest.raises(GatewayUrlError):
        gateway_url.parse_list(" , ")


WSS = gateway_url.parse("wss://gw.example.com/diglett")
TLS = gateway_url.parse("tls://10.1.2.3")
WS = gateway_url.parse("ws://gw.example.com/diglett")
TCP = gateway_url.parse("gw.example.com:20000")


def test_proxies_come_from_the_environment_as_curl_reads_it():
    env = {"https_proxy": "http://corp:3128", "http_proxy": "http://plain:80",
           "ALL_PROXY": "socks5h://socks:1080"}
    assert str(proxy.choose(WSS, environ=env)) == "http://corp:3128"
    assert str(proxy.choose(WS, environ=env)) == "http://plain:80"
    assert str(proxy.choose(TCP, environ=env)) == "socks5h://socks:1080"  # only all_proxy
    assert proxy.choose(TCP, environ={"https_proxy": "corp:3128"}) is None
    assert proxy.choose(WS, environ={"HTTP_PROXY": "corp:3128"}) is None  # CGI-unsafe name
    upper = proxy.choose(WSS, environ={"HTTPS_PROXY": "corp"})
    assert (upper.scheme, upper.host, upper.port, upper.source) == ("http", "corp", 3128,
                                                                    "HTTPS_PROXY")


def test_credentials_are_decoded_and_never_printed():
    chosen = proxy.choose(WSS, "http://alice:s%40cret@corp:8080")
    assert (chosen.username, chosen.password) == ("alice", "s@cret")
    assert "s@cret" not in str(chosen) + repr(chosen)
    with pytest.raises(ProxyUrlError) as info:
        proxy.parse("ftp://alice:hunter2@corp:21")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("no_proxy, gateway, direct", [
    ("*", WSS, True),
    ("example.com", WSS, True),  # a name matches its subdomains
    (".example.com", WSS, True),
    ("ample.com", WSS, False),  # not a suffix match inside a label
    ("10.0.0.0/8", TLS, True),
    ("10.1.2.3", TLS, True),
    ("192.168.0.0/16, other.org", TLS, False),
])
def test_no_proxy_rules(no_proxy, gateway, direct):
    env = {"https_proxy": "corp:3128", "NO_PROXY": no_proxy}
    assert (proxy.choose(gateway, environ=env) is None) is direct


def test_the_flag_wins_over_the_environment_and_none_turns_proxies_off():
    env = {"https_proxy": "corp:3128"}
    assert str(proxy.choose(WSS, "socks5://s:9050", environ=env)) == "socks5://s:9050"
    assert str(proxy.choose(TCP, "socks5://s:9050", environ=env)) == "socks5://s:9050"
    assert proxy.choose(WSS, "none", environ=env) is None
    assert proxy.choose(WSS, "socks5://s:9050", environ={"no_proxy": "*"}) is None


def test_an_agent_dials_a_name_that_no_proxy_exempts_directly_by_its_addresses(monkeypatch):
    """no_proxy matches the gateway's name; the addresses DNS gives for it stay direct, while
    a tls:// gateway keeps its name (SNI) and takes the proxy."""
    from diglett.agent import Agent

    monkeypatch.setenv("all_proxy", "socks5h://corp:1080")
    monkeypatch.setenv("no_proxy", "localhost")
    monkeypatch.delenv("NO_PROXY", raising=False)
    fleet = gateway_url.parse_list("localhost:20000, tls://gw.example.com")
    agent = Agent(fleet, "foo", None, "02" + "ab" * 32, ("127.0.0.1", 8080))
    addresses = agent._addresses()
    direct = [a for a in addresses if a.scheme == "tcp"]
    assert direct and all(a.host in ("127.0.0.1", "::1") for a in direct)
    assert all(agent._proxy_for(a) is None for a in direct)
    assert str(agent._proxy_for(fleet[1])) == "socks5h://corp:1080"
