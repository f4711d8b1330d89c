"""diglett.names: the canonical subdomain and domain rules (test plan B4, docs/testplan.md)."""

import pytest

from diglett.names import InvalidName, validate_domain, validate_subdomain


@pytest.mark.parametrize(
    "name, expected",
    [
        ("foo", "foo"),
        ("a", "a"),
        ("0", "0"),
        ("a-b-c", "a-b-c"),
        ("Foo", "foo"),  # stored lowercase, as the docs say
        ("FOO-9", "foo-9"),
        ("xn--80ak6aa92e", "xn--80ak6aa92e"),  # punycode labels are plain ASCII labels
        ("a" * 63, "a" * 63),
    ],
)
def test_valid_subdomains_are_lowercased(name, expected):
    assert validate_subdomain(name) == expected


@pytest.mark.parametrize(
    "name, reason",
    [
        ("", "empty"),
        ("-foo", "'-'"),
        ("foo-", "'-'"),
        ("a" * 64, "64 characters"),
        ("foo.bar", "dot"),
        ("foo_bar", "'_'"),
        ("f\u043e\u043e", "non-ASCII"),  # Cyrillic o, looks like "foo"
        ("foo\n", "'\\n'"),
        ("foo\x00", "'\\x00'"),
        ("foo bar", "' '"),
        ("x`) || PathPrefix(`/`)", "'`'"),
        ("$(touch /tmp/dg-canary)", "'$'"),
        (";id", "';'"),
        ("../../etc/passwd", "dot"),
        ("%2e%2e", "'%'"),
        ("a" * 4096, "4096 characters"),
        ("\u0130", "non-ASCII"),  # lowercases to 'i' + combining dot: still refused
    ],
)
def test_invalid_subdomains_say_why_and_what_is_allowed(name, reason):
    with pytest.raises(InvalidName) as info:
        validate_subdomain(name)
    message = str(info.value)
    assert reason in message
    assert "a-z, 0-9" in message
    assert len(message) < 300  # a 4 KiB name is not echoed in full


def test_invalid_name_is_a_value_error_and_rejects_non_text():
    assert issubclass(InvalidName, ValueError)
    with pytest.raises(InvalidName):
        validate_subdomain(b"foo")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("example.com", "example.com"),
        ("Tunnel.Example.COM.", "tunnel.example.com"),
        ("localhost", "localhost"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_valid_domains(text, expected):
    assert validate_domain(text) == expected


@pytest.mark.parametrize(
    "text", ["", ".", "example..com", ".example.com", "-a.example", "ex ample.com", "*.example.com",
             "a_b.example", "example.com..", ("a" * 60 + ".") * 5 + "com"]
)
def test_invalid_domains(text):
    with pytest.raises(InvalidName, match="invalid domain"):
        validate_domain(text)
