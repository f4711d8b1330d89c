"""[hook:webhook]: POST every connect and disconnect as signed JSON to a URL.

The body is the event's fields as JSON; ``X-Diglett-Signature: sha256=<hex>`` is the
HMAC-SHA256 of the raw body under ``secret``, and ``X-Diglett-Event-Id`` lets the receiver
drop duplicates (a delivery is retried until the receiver answers 2xx, across restarts, so
the same event may arrive more than once). Anything but 2xx is a failure.
"""

import hashlib
import hmac
import json
import urllib.error
import urllib.request

from diglett import __version__
from diglett.hookapi import Hook

RESPONSE_LIMIT = 4096  # bytes of a failed answer quoted in the log


class WebhookFailed(Exception):
    pass


def signature(secret, body):
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: urllib would turn the POST into a GET without its body."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class WebhookHook(Hook):
    OPTIONS = {
        "url": ("string", None, "URL that receives the events (POST, JSON)"),
        "secret": ("secret", "", "HMAC-SHA256 key for X-Diglett-Signature (empty: unsigned)"),
        "timeout": ("seconds", "10", "seconds to wait for the receiver's answer"),
    }

    def __init__(self, options, context):
        super().__init__(options, context)
        self.url = options["url"]
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://, got %r" % self.url)
        self.secret = options["secret"]
        self.timeout = options["timeout"]

    def session_started(self, event):
        self._post(event)

    def session_ended(self, event):
        self._post(event)

    def _post(self, event):
        body = json.dumps(event.fields(), sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "diglett/%s" % __version__,
            "X-Diglett-Event": event.kind,
            "X-Diglett-Event-Id": event.event_id,
        }
        if self.secret:
            headers["X-Diglett-Signature"] = signature(self.secret, body)
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.timeout) as answer:
                answer.read(RESPONSE_LIMIT)
        except urllib.error.HTTPError as exc:
            detail = exc.read(RESPONSE_LIMIT).decode("utf-8", "replace").strip()
            raise WebhookFailed("%s answered %d %s" % (self.url, exc.code, detail[:200])) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise WebhookFailed("%s: %s" % (self.url, reason)) from None


HOOK = WebhookHook
