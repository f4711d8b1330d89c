"""Subdomain and domain names: the one place that decides what a valid name is.

Every name that reaches a Traefik rule, a hook's argv or the registry passes through
validate_subdomain first, so nothing here may be lenient. This module does no I/O.
"""

import re

MAX_LABEL_LEN = 63  # RFC 1035: a DNS label holds at most 63 octets
MAX_DOMAIN_LEN = 253  # RFC 1035: a whole name, without the trailing dot, in text form

# One DNS label in canonical form: letters, digits, inner hyphens only (docs/protocol.md §9.1).
LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
ALLOWED = "a-z, 0-9 and '-' (not first or last), 1 to 63 characters"


class InvalidName(ValueError):
    """A subdomain or domain that is not a canonical DNS name; the message says why."""


def _why_not_label(label):
    """The first reason ``label`` (already lowercased) is not a valid label, or None."""
    if not label:
        return "is empty"
    if len(label) > MAX_LABEL_LEN:
        return "is %d characters long" % len(label)
    for char in label:
        if char == ".":
            return "contains a dot (a subdomain is one label; the domain is added by the server)"
        if not ("a" <= char <= "z" or "0" <= char <= "9" or char == "-"):
            if not char.isascii():
                return "contains the non-ASCII character %r (use its punycode xn-- form)" % char
            return "contains the character %r" % char
    if label.startswith("-") or label.endswith("-"):
        return "starts or ends with '-'"
    return None


def validate_subdomain(name):
    """Return ``name`` lowercased if it is one valid DNS label, else raise InvalidName."""
    if not isinstance(name, str):
        raise InvalidName("subdomain must be text, got %s" % type(name).__name__)
    canonical = name.lower()
    reason = _why_not_label(canonical)
    if reason is None and not LABEL_RE.fullmatch(canonical):
        reason = "is not a DNS label"  # defence in depth: the loop and the regex must agree
    if reason is not None:
        raise InvalidName(
            "invalid subdomain %s: it %s; allowed: %s" % (_show(name), reason, ALLOWED)
        )
    return canonical


def validate_domain(text):
    """Return the parent domain (e.g. ``tunnel.example.com``) lowercased, or raise InvalidName.

    A single trailing dot (fully qualified form) is accepted and removed.
    """
    if not isinstance(text, str):
        raise InvalidName("domain must be text, got %s" % type(text).__name__)
    canonical = text.lower()
    if canonical.endswith("."):
        canonical = canonical[:-1]
    if len(canonical) > MAX_DOMAIN_LEN:
        raise InvalidName(
            "invalid domain %s: longer than %d characters" % (_show(text), MAX_DOMAIN_LEN)
        )
    for label in canonical.split("."):
        reason = _why_not_label(label)
        if reason is not None:
            raise InvalidName(
                "invalid domain %s: label %s %s; each dot-separated label allows %s"
                % (_show(text), _show(label), reason, ALLOWED)
            )
    return canonical


def _show(text):
    """A safe, bounded rendering of user input for error messages (repr escapes NUL, newlines)."""
    if len(text) > 80:
        return "%r... (%d characters)" % (text[:80], len(text))
    return repr(text)
