"""Who may use the `cai review` page: the rule flows/review.py's guard applies to every request.

    cai review                        # bound to loopback: only a loopback Host is served
    cai review --host 0.0.0.0         # any other address: every request carries the printed token

Bound to loopback, only pages whose Host is a loopback name are served (a web page elsewhere cannot
reach it through DNS rebinding); bound to any other address, every request must carry the token
printed at start (CAI_REVIEW_TOKEN, or a fresh random one), which a first visit with `?token=` turns
into a cookie. Every state-changing request is a POST that must carry the page's anti-forgery value
and, when the browser sends them, a same-origin Origin and Sec-Fetch-Site; a script on another site
can do neither. Pure functions of the request's headers; the app reads them and answers.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from urllib.parse import urlsplit

# what every answer carries (the page's own add a nonce-only Content-Security-Policy, cai/review_html.py)
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: under it Chromium sends `Origin: null` with the page's own forms, which `refusal`
    # must refuse; same-origin sends nothing to other sites
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'"  # for answers that are not a page
FOREIGN_FORM = "a form from another site cannot change verdicts here"


def is_loopback(host: str) -> bool:
    """localhost, 127.x.y.z or ::1 (brackets allowed)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hostname(host_header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8765` -> `::1`, `localhost:80` -> `localhost`."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def csrf_value(secret: bytes) -> str:
    """The page's anti-forgery value: every form carries it, and a POST without it is refused."""
    return hmac.new(secret, b"cai-review-form", hashlib.sha256).hexdigest()


def same(sent: str | None, expected: str) -> bool:
    """Whether a secret sent matches (in constant time)."""
    return bool(sent) and hmac.compare_digest(sent.encode(), expected.encode())


def refusal(method: str, host_header: str | None, loopback: bool, token: str | None, sent: str | None,
            origin: str | None, fetch_site: str | None) -> tuple[int, str] | None:
    """(HTTP status, why) when the page must refuse a request, else None. `sent` is the token the
    request carries (query, cookie or bearer), `origin` and `fetch_site` what the browser said."""
    host = hostname(host_header or "")
    if loopback and not is_loopback(host):
        return 400, f"this page answers only at a loopback address (Host {host!r} refused)"
    if token is not None and not same(sent, token):
        return 401, "this page needs the token `cai review` printed at start (open the URL it printed)"
    if method == "POST":
        if origin and urlsplit(origin).netloc != host_header:
            return 403, FOREIGN_FORM
        if fetch_site and fetch_site not in ("same-origin", "none"):
            return 403, FOREIGN_FORM
    return None
