"""Classification of upstream answers and the 429 backoff (pure functions)."""

import email.utils
import json
import os
import subprocess
import sys

import pytest

from clproxy.routing import policy
from clproxy.routing.policy import (COOL, NEXT, REFRESH, RETURN, SUCCESS, Verdict, backoff, classify,
                            classify_network_error, format_seconds, parse_retry_after,
                            quota_from_headers, unrefreshable)

NOW = 1_700_000_000.0
U = "anthropic-ratelimit-unified-"


def error_body(error_type, message="something"):
    """An Anthropic-shaped error body."""
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message},
                       "request_id": "req_1"}).encode()


HTML_PAGE = b"<html><head><title>400 Bad Request</title></head><body>cloudflare</body></html>"


def verdict(status, headers=None, body=b"", level=0, oauth=False):
    """Classify with the test clock."""
    return classify(status, headers or {}, body, now=NOW, backoff_level=level, is_oauth=oauth)


# -- success -----------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_2xx_is_success_and_resets_level(status):
    """Any 2xx is a success with no cooldown and backoff level 0."""
    assert verdict(status, level=5) == Verdict(SUCCESS, status, "ok", None, 0)


@pytest.mark.parametrize("unified_status", ["allowed", "allowed_warning", "rejected"])
def test_headers_never_cool_a_2xx(unified_status):
    """Unified quota headers on a 200 (even allowed_warning or rejected) do not cool."""
    headers = {U + "status": unified_status, U + "reset": str(NOW + 3600),
               U + "5h-utilization": "0.95", "retry-after": "30"}
    result = verdict(200, headers, level=2)
    assert (result.action, result.cooldown, result.backoff_level) == (SUCCESS, None, 0)


# -- 429 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("retry_after, level, cooldown", [
    (None, 0, 1.0),              # absent -> 1 s
    ("7", 0, 7.0),               # seconds
    ("7", 1, 14.0),              # seconds * 2**level
    ("1.5", 0, 1.5),             # fractional
    ("1.5", 2, 6.0),
    ("soon", 0, 1.0),            # garbage -> 1 s
    ("-5", 1, 2.0),              # negative is garbage
    ("", 0, 1.0),                # empty
    ("0", 0, 1.0),               # zero asks nothing useful: 1 s base
    ("1000", 0, 600.0),          # 10 min cap
    (None, 10, 600.0),           # 2**10 s capped
    (None, 500, 600.0),          # absurd level stays finite
])
def test_429_backoff(retry_after, level, cooldown):
    """A 429 cools for base * 2**level (base Retry-After or 1 s), capped at 600 s, level + 1."""
    headers = {} if retry_after is None else {"retry-after": retry_after}
    result = verdict(429, headers, error_body("rate_limit_error"), level=level)
    assert (result.action, result.reason) == (COOL, "rate-limited")
    assert result.cooldown == pytest.approx(cooldown)
    assert result.backoff_level == level + 1


def test_429_http_date_retry_after():
    """A Retry-After HTTP-date 30 s ahead cools for 30 s."""
    headers = {"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}
    assert verdict(429, headers).cooldown == pytest.approx(30.0)


def test_429_http_date_in_the_past():
    """A Retry-After HTTP-date in the past falls back to the 1 s base."""
    headers = {"retry-after": email.utils.formatdate(NOW - 300, usegmt=True)}
    assert verdict(429, headers).cooldown == pytest.approx(1.0)


def test_429_levels_grow_and_reset_after_success():
    """Consecutive bare 429s cool 1, 2, 4, 8 s; a success resets, so the next 429 cools 1 s."""
    level, cooldowns = 0, []
    for _ in range(4):
        result = verdict(429, level=level)
        cooldowns.append(result.cooldown)
        level = result.backoff_level
    assert cooldowns == [1.0, 2.0, 4.0, 8.0] and level == 4
    level = verdict(200, level=level).backoff_level
    assert level == 0
    assert verdict(429, level=level).cooldown == 1.0


def test_429_other_error_keeps_level():
    """A transient error between two 429s neither grows nor resets the level."""
    first = verdict(429, level=0)
    between = verdict(503, level=first.backoff_level)
    assert between.backoff_level == 1
    assert verdict(429, level=between.backoff_level).cooldown == 2.0


def test_unified_rejected_cools_until_reset():
    """A 429 with unified-status rejected cools until unified-reset and keeps the level."""
    headers = {U + "status": "rejected", U + "reset": str(int(NOW + 3600)), "retry-after": "5"}
    result = verdict(429, headers, level=2)
    assert result == Verdict(COOL, 429, "window-rejected", 3600.0, 2, None)


def test_unified_rejected_reset_capped_at_24h():
    """A rejected window resetting in 3 days cools for 24 h only."""
    headers = {U + "status": "rejected", U + "reset": str(NOW + 3 * 86400)}
    assert verdict(429, headers).cooldown == 86400.0


def test_unified_rejected_reset_in_the_past():
    """A rejected window whose reset has passed still cools for 1 s."""
    headers = {U + "status": "rejected", U + "reset": str(NOW - 50)}
    result = verdict(429, headers)
    assert (result.reason, result.cooldown) == ("window-rejected", 1.0)


def test_a_rejected_window_whose_reset_is_past_cools_for_the_upstreams_retry_after():
    """A reset already past (the clocks apart, a stale header) with a Retry-After: the upstream's
    Retry-After is the cooldown (it was 1 s, and the client was told so); the level stays."""
    headers = {U + "status": "rejected", U + "reset": str(NOW - 30), "retry-after": "600"}
    result = verdict(429, headers, level=2)
    assert result == Verdict(COOL, 429, "window-rejected", 600.0, 2, None)


def test_unified_rejected_uses_representative_window_reset():
    """Without unified-reset, the representative window's reset is used."""
    headers = {U + "status": "rejected", U + "representative-claim": "five_hour",
               U + "5h-status": "rejected", U + "5h-reset": str(NOW + 1200),
               U + "7d-status": "allowed", U + "7d-reset": str(NOW + 500000)}
    assert verdict(429, headers).cooldown == 1200.0


def test_representative_window_rejected():
    """The representative window rejected (overall status absent) cools until its reset."""
    headers = {U + "representative-claim": "seven_day", U + "7d-status": "rejected",
               U + "7d-reset": str(NOW + 7200), U + "5h-status": "allowed"}
    result = verdict(429, headers, level=1)
    assert (result.reason, result.cooldown, result.backoff_level) == ("window-rejected", 7200.0, 1)


def test_rejected_window_without_claim():
    """With no representative claim, a rejected 5h window's reset is used."""
    headers = {U + "5h-status": "rejected", U + "5h-reset": str(NOW + 900)}
    assert verdict(429, headers).cooldown == 900.0


def test_non_representative_rejected_window_is_ordinary_429():
    """A rejected window that is not the representative one gives the ordinary backoff."""
    headers = {U + "representative-claim": "five_hour", U + "5h-status": "allowed",
               U + "7d-status": "rejected", U + "7d-reset": str(NOW + 7200)}
    result = verdict(429, headers)
    assert (result.reason, result.cooldown, result.backoff_level) == ("rate-limited", 1.0, 1)


def test_rejected_without_reset_is_ordinary_429():
    """A rejected status without any reset time falls back to the exponential backoff."""
    result = verdict(429, {U + "status": "rejected", "retry-after": "3"}, level=1)
    assert (result.reason, result.cooldown, result.backoff_level) == ("rate-limited", 6.0, 2)


def test_allowed_warning_429_is_ordinary():
    """A 429 whose unified status is allowed_warning gets the ordinary backoff."""
    headers = {U + "status": "allowed_warning", U + "reset": str(NOW + 3600)}
    assert verdict(429, headers).reason == "rate-limited"


# -- 401 / 402 / 403 / 404 ---------------------------------------------------------------------

def test_401_oauth_refresh():
    """An OAuth 401 asks for a refresh and does not cool the account: requests in flight must be
    able to retry with the refreshed token (issue 11 item 1)."""
    result = verdict(401, body=error_body("authentication_error", "invalid token"), level=3,
                     oauth=True)
    assert result == Verdict(REFRESH, 401, "auth", None, 3,
                             "authentication_error: invalid token")


def test_401_oauth_unrefreshable_cools_five_minutes():
    """When no refresh can fix an OAuth 401, it cools the account 5 min like an API-key 401."""
    result = unrefreshable(verdict(401, body=error_body("authentication_error"), level=2, oauth=True))
    assert (result.action, result.reason, result.cooldown, result.backoff_level) == (COOL, "auth", 300.0, 2)


def test_401_api_key_cools():
    """A 401 on an API-key account cools it 5 min and moves on."""
    result = verdict(401, body=error_body("authentication_error"), oauth=False)
    assert (result.action, result.reason, result.cooldown) == (COOL, "auth", 300.0)


@pytest.mark.parametrize("status, reason", [(402, "billing"), (403, "permission")])
@pytest.mark.parametrize("oauth", [True, False])
def test_402_403_cool_five_minutes(status, reason, oauth):
    """402 and 403 cool the account 5 min and move on, whatever its kind."""
    result = verdict(status, body=error_body(reason + "_error"), level=1, oauth=oauth)
    assert (result.action, result.reason, result.cooldown, result.backoff_level) == \
        (COOL, reason, 300.0, 1)


ORG_DISABLED = "This organization has been disabled."
OAUTH_NOT_ALLOWED = "OAuth authentication is currently not allowed for this organization."


@pytest.mark.parametrize("oauth", [True, False])
@pytest.mark.parametrize("message, reason, words", [
    (ORG_DISABLED, "organization-disabled", "the organization is disabled"),
    (OAUTH_NOT_ALLOWED, "oauth-not-allowed", "OAuth authentication is not allowed for the organization"),
])
def test_403_dead_organization_disables_instead_of_cooling(message, reason, words, oauth):
    """A 403 saying the organization is disabled or OAuth is not allowed for it disables the account
    (a 5-minute cooldown would bring it back to fail every 5 minutes, forever)."""
    result = verdict(403, body=error_body("permission_error", message), level=2, oauth=oauth)
    assert result == Verdict(policy.DISABLE, 403, reason, None, 2, "permission_error: " + message)
    assert policy.disable_reason(result) == f"{words} (upstream 403: {message})"
    assert policy.DISABLE in policy.ACTIONS


@pytest.mark.parametrize("status, error_type, message, reason", [
    # As Anthropic has been seen to send them (anthropics/claude-code issues 19028 and 6590).
    (400, "invalid_request_error", ORG_DISABLED, "organization-disabled"),
    (401, "authentication_error", OAUTH_NOT_ALLOWED, "oauth-not-allowed"),
    # Other wordings of the same facts.
    (403, "permission_error", "Your organization is disabled", "organization-disabled"),
    (403, "forbidden", "oauth authentication is not allowed for this organisation", "oauth-not-allowed"),
])
def test_dead_organization_messages_on_other_statuses_disable(status, error_type, message, reason):
    """The same messages on a 400 or a 401 disable too: relaying the 400 to every request or
    refreshing the token after the 401 can never help."""
    result = verdict(status, body=error_body(error_type, message), oauth=True)
    assert (result.action, result.status, result.reason, result.cooldown) == \
        (policy.DISABLE, status, reason, None)


def test_dead_organization_in_a_cut_short_body_disables():
    """The message is found in a body prefix that is not complete JSON."""
    body = error_body("permission_error", ORG_DISABLED)[:-3]
    assert verdict(403, body=body).action == policy.DISABLE


@pytest.mark.parametrize("status, body", [
    (403, error_body("permission_error", "Your API key does not have permission to use the specified resource.")),
    (403, error_body("forbidden", "Request not allowed")),
    (403, error_body("permission_error", "The organization setting is disabled for this model")),
    (403, b"<html>403 Forbidden: This organization has been disabled.</html>"),
    (403, b""),
    (429, error_body("rate_limit_error", ORG_DISABLED)),
    (500, error_body("api_error", ORG_DISABLED)),
])
def test_other_errors_do_not_disable(status, body):
    """Other 403s keep the capped 5-minute cooldown; the phrases count only in a JSON error message
    of a 400/401/403."""
    result = verdict(status, body=body)
    assert result.action != policy.DISABLE
    if status == 403:
        assert (result.action, result.reason, result.cooldown) == (COOL, "permission", 300.0)


def test_disable_reason_without_detail():
    """A DISABLE verdict without upstream detail still says why."""
    result = Verdict(policy.DISABLE, 403, "organization-disabled", None, 0)
    assert policy.disable_reason(result) == "the organization is disabled (upstream 403)"


def test_disable_verdict_describes_itself():
    """The log line of a DISABLE names the reason and the action."""
    result = verdict(403, body=error_body("permission_error", ORG_DISABLED))
    assert result.describe("work") == ('<- 403 account=work backoff-level=0 cooldown=none '
                                       'reason=organization-disabled action=disable '
                                       'detail="permission_error: This organization has been disabled."')


def test_404_returns_at_once():
    """A 404 goes back to the client at once, without cooldown."""
    result = verdict(404, body=error_body("not_found_error", "model: claude-x"), level=2)
    assert result == Verdict(RETURN, 404, "not-found", None, 2, "not_found_error: model: claude-x")


# -- 400 and other client errors ---------------------------------------------------------------

def test_400_invalid_request_returned():
    """A 400 invalid_request_error is the client's: returned as is, no cooldown."""
    result = verdict(400, body=error_body("invalid_request_error", "max_tokens: required"))
    assert (result.action, result.reason, result.cooldown) == (RETURN, "client-error", None)


def test_400_truncated_invalid_request_returned():
    """A body prefix cut inside the JSON is still read as invalid_request_error."""
    body = error_body("invalid_request_error", "x" * 5000)[:200]
    assert verdict(400, body=body).action == RETURN


def test_400_overloaded_rotates():
    """A 400 wrapping overloaded_error rotates at once without cooldown."""
    result = verdict(400, body=error_body("overloaded_error"))
    assert (result.action, result.reason, result.cooldown) == (NEXT, "overloaded", None)


def test_400_api_error_rotates():
    """A 400 wrapping api_error rotates at once without cooldown."""
    result = verdict(400, body=error_body("api_error"))
    assert (result.action, result.reason, result.cooldown) == (NEXT, "transient", None)


@pytest.mark.parametrize("body", [HTML_PAGE, b"", b"Bad Request", b"  \n<!DOCTYPE html>"])
def test_400_not_json_rotates(body):
    """A 400 whose body is not JSON (an HTML error page, nothing) is transient."""
    result = verdict(400, body=body, level=1)
    assert (result.action, result.reason, result.cooldown, result.backoff_level) == \
        (NEXT, "transient", None, 1)


@pytest.mark.parametrize("status", [413, 422, 400, 405, 409, 410, 415, 418])
def test_client_errors_returned(status):
    """413, 422 and unlisted 4xx with a JSON body are returned as is, no cooldown."""
    result = verdict(status, body=error_body("invalid_request_error"), level=1)
    assert (result.action, result.reason, result.cooldown, result.backoff_level) == \
        (RETURN, "client-error", None, 1)


@pytest.mark.parametrize("status", [413, 422])
def test_client_errors_returned_even_as_html(status):
    """413 and 422 are the client's fault even when the body is an HTML page."""
    assert verdict(status, body=HTML_PAGE).action == RETURN


# -- transient ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [408, 500, 502, 503, 504, 520, 521, 522, 523, 524, 525, 526,
                                    501, 507, 599])
def test_transient_statuses_rotate(status):
    """Transient statuses (408, 5xx, Cloudflare 52x) rotate at once without cooldown."""
    result = verdict(status, body=HTML_PAGE, level=2)
    assert (result.action, result.reason, result.cooldown, result.backoff_level) == \
        (NEXT, "transient", None, 2)


def test_529_overloaded_rotates():
    """A 529 is a global overload: rotate at once, no cooldown."""
    result = verdict(529, body=error_body("overloaded_error", "Overloaded"))
    assert result == Verdict(NEXT, 529, "overloaded", None, 0, "overloaded_error: Overloaded")


def test_5xx_with_overloaded_body():
    """A 503 carrying overloaded_error is reported as overloaded."""
    assert verdict(503, body=error_body("overloaded_error")).reason == "overloaded"


@pytest.mark.parametrize("status", [100, 302, 304])
def test_unexpected_status_rotates(status):
    """A 1xx/3xx from upstream is nobody's fault: rotate without cooldown."""
    result = verdict(status)
    assert (result.action, result.cooldown) == (NEXT, None)


def test_network_error():
    """A network error or timeout rotates at once, keeps the level and names the failure."""
    result = classify_network_error("timeout after 600s", backoff_level=3)
    assert result == Verdict(NEXT, None, "network", None, 3, "timeout after 600s")


# -- describe ----------------------------------------------------------------------------------

def test_describe_seed_line():
    """The third consecutive bare 429 reads exactly as the seed's log line."""
    line = verdict(429, level=2).describe("work")
    assert line == "<- 429 account=work backoff-level=2 cooldown=4s"


def test_describe_first_429():
    """The first bare 429 is logged at level 0 with a 1 s cooldown."""
    assert verdict(429).describe("a") == "<- 429 account=a backoff-level=0 cooldown=1s"


def test_describe_fractional_cooldown():
    """Fractional cooldowns keep up to two decimals."""
    assert verdict(429, {"retry-after": "0.25"}).describe("a").endswith("cooldown=0.25s")


def test_describe_network_error():
    """A network error line names it as network-error with its detail."""
    line = classify_network_error("connection refused", backoff_level=1).describe("work")
    assert line == ('<- network-error account=work backoff-level=1 cooldown=none '
                    'reason=network action=next detail="connection refused"')


def test_describe_window_rejected():
    """A rejected window is logged with its long cooldown and the reason."""
    headers = {U + "status": "rejected", U + "reset": str(NOW + 3600)}
    assert verdict(429, headers, level=1).describe("w") == (
        "<- 429 account=w backoff-level=1 cooldown=3600s reason=window-rejected "
        "action=cool-and-next")


def test_describe_success():
    """A success line says ok with no cooldown."""
    assert verdict(200).describe("a") == \
        "<- 200 account=a backoff-level=0 cooldown=none reason=ok action=success"


def test_describe_error_detail_is_one_line():
    """An error detail is JSON-quoted so a line stays one line."""
    line = verdict(400, body=error_body("invalid_request_error", 'bad\n"x"')).describe("a")
    assert "\n" not in line
    assert line.endswith('detail="invalid_request_error: bad\\n\\"x\\""')


@pytest.mark.parametrize("seconds, text", [(None, "none"), (1.0, "1s"), (1.5, "1.5s"),
                                           (0.25, "0.25s"), (9.999, "10s"), (600.0, "600s"),
                                           (3599.6, "3600s")])
def test_format_seconds(seconds, text):
    """Cooldowns print as whole seconds from 10 s up, with two decimals at most below."""
    assert format_seconds(seconds) == text


# -- parse_retry_after / backoff ---------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    (None, None), ("", None), ("  ", None), ("3", 3.0), (" 3 ", 3.0), ("1.5", 1.5), (".5", 0.5),
    ("0", 0.0), ("-1", None), ("abc", None), ("1e3", None), ("inf", None), ("nan", None),
    ("9" * 400, None),
])
def test_parse_retry_after_values(value, seconds):
    """Retry-After parses delta-seconds (fractions too) and rejects everything else."""
    assert parse_retry_after(value, NOW) == seconds


def test_parse_retry_after_http_date():
    """An HTTP-date gives the seconds from now, and 0 when it is past."""
    assert parse_retry_after(email.utils.formatdate(NOW + 120, usegmt=True), NOW) == \
        pytest.approx(120.0)
    assert parse_retry_after(email.utils.formatdate(NOW - 120, usegmt=True), NOW) == 0.0
    assert parse_retry_after("Wed, 99 Foo 2015 07:28:00 GMT", NOW) is None


@pytest.mark.parametrize("level, retry_after, cap, seconds", [
    (0, None, 600.0, 1.0), (1, None, 600.0, 2.0), (3, None, 600.0, 8.0), (9, None, 600.0, 512.0),
    (10, None, 600.0, 600.0), (2, 10.0, 600.0, 40.0), (0, 0.0, 600.0, 1.0), (5, None, 20.0, 20.0),
    (10**6, None, 600.0, 600.0),
])
def test_backoff(level, retry_after, cap, seconds):
    """backoff is base * 2**level capped, with base Retry-After or 1 s."""
    assert backoff(level, retry_after, cap) == seconds


# -- quota headers -----------------------------------------------------------------------------

def test_quota_from_headers_full():
    """Every unified header present is parsed into the quota dict."""
    headers = {U + "status": "allowed_warning", U + "reset": "1700003600",
               U + "representative-claim": "five_hour", U + "fallback-percentage": "0.5",
               U + "5h-status": "allowed_warning", U + "5h-reset": "1700003600",
               U + "5h-utilization": "0.92", U + "5h-surpassed-threshold": "0.9",
               U + "7d-status": "allowed", U + "7d-reset": "1700500000",
               U + "7d-utilization": "0.3", U + "7d_oi-status": "allowed",
               U + "overage-status": "rejected",
               U + "overage-disabled-reason": "org_level_disabled",
               "retry-after": "3"}
    assert quota_from_headers(headers) == {
        "status": "allowed_warning", "reset": 1700003600.0, "representative_claim": "five_hour",
        "fallback_percentage": 0.5,
        "five_hour": {"status": "allowed_warning", "reset": 1700003600.0, "utilization": 0.92,
                      "surpassed_threshold": 0.9},
        "seven_day": {"status": "allowed", "reset": 1700500000.0, "utilization": 0.3},
        "seven_day_oi": {"status": "allowed"},
        "overage": {"status": "rejected", "disabled_reason": "org_level_disabled"},
    }


def test_quota_from_headers_only_present_keys():
    """Absent headers give absent keys; an unparseable reset is None."""
    assert quota_from_headers({}) == {}
    assert quota_from_headers({U + "reset": "tomorrow", U + "5h-utilization": "x"}) == \
        {"reset": None, "five_hour": {"utilization": None}}


def test_policy_and_pool_stay_pure():
    """Importing policy and pool pulls in neither the global reactor nor treq."""
    code = ("import sys, clproxy.routing.policy, clproxy.routing.pool; "
            "bad = [m for m in ('twisted.internet.reactor', 'treq') if m in sys.modules]; "
            "assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_actions_are_distinct():
    """The six action names are the documented strings."""
    assert policy.ACTIONS == ("success", "refresh", "cool-and-next", "next", "return", "disable")


# -- unusable 2xx answers ------------------------------------------------------------------------

MESSAGE = json.dumps({"id": "msg_1", "type": "message", "content": []}).encode()


@pytest.mark.parametrize("status,content_type,body", [
    (200, "application/json", b""),
    (200, "application/json", b"  \r\n"),
    (200, None, b""),
    (200, "text/plain", b""),
    (201, "application/json", b""),
])
def test_empty_2xx_is_unusable(status, content_type, body):
    """An empty 2xx body (whatever its type) is no answer."""
    assert policy.classify_unusable_answer(status, content_type, body) == f"an empty {status} answer"


@pytest.mark.parametrize("body", [b"[]", b"null", b'"text"', b"42", b"<html>ok</html>",
                                  b'{"type": "message", "content": [', b'{"a": 1} {"b": 2}',
                                  b"{\xff}"])
@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_json_2xx_that_is_not_an_object_is_unusable(content_type, body):
    """A JSON-typed 2xx whose body is not one JSON object (cut short, an array, HTML) is no answer."""
    reason = policy.classify_unusable_answer(200, content_type, body)
    assert reason == f"a 200 answer whose body is not a JSON object ({len(body)} bytes)"


@pytest.mark.parametrize("status,content_type,body", [
    (200, "application/json", MESSAGE),
    (200, "application/json", b"\n" + MESSAGE + b"\n"),
    (200, "text/plain", b"not json, not claimed to be"),
    (200, None, b"[]"),
    (204, "application/json", b""),
    (205, None, b""),
    (400, "application/json", b""),
    (529, "application/json", b"[]"),
])
def test_usable_or_not_a_2xx_is_none(status, content_type, body):
    """A JSON object, a non-JSON body, an empty 204/205 and every non-2xx are not judged here."""
    assert policy.classify_unusable_answer(status, content_type, body) is None


@pytest.mark.parametrize("body", [
    MESSAGE, b'{}', b'{"a": {"b": [1, 2, {"c": null}]}}', b'{"a": 1, "a": 2}',
    b'{"a": "\\ud800"}', b'{"a": NaN}', b'{"a": "caf\xc3\xa9"}',   # json takes these; msgspec declines
    b'{"a": "\xff"}', b'{"a": 1} {"b": 2}', b'{"a": 1,}', b'{"a" 1}', b'{"a": [}',
    b'{"a": "\x01"}', b'{' + b'"k": 1, ' * 1000 + b'"z": 2}',
])
def test_the_object_check_agrees_with_pythons_json(body):
    """A JSON 2xx is judged exactly as Python's json reads it, with or without the fast check
    (escapes, NaN and lone surrogates json takes, bad UTF-8 and trailing data it refuses)."""
    try:
        expected = isinstance(json.loads(body.decode("utf-8")), dict)
    except ValueError:
        expected = False
    assert (policy.classify_unusable_answer(200, "application/json", body) is None) is expected


def test_a_deeply_nested_json_2xx_is_unusable_not_an_exception():
    """A 2xx JSON object nested deeper than Python's parser goes is no answer (a transient
    failure, the next account), not a RecursionError escaping the classification."""
    body = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reason = policy.classify_unusable_answer(200, "application/json", body)
    assert reason == f"a 200 answer whose body is not a JSON object ({len(body)} bytes)"


def test_huge_json_object_is_checked_by_its_braces_only():
    """Past FULL_PARSE_LIMIT only the braces count (a whole parse would cost more than it finds)."""
    big = b"{" + b" " * policy.FULL_PARSE_LIMIT + b"}"
    assert policy.classify_unusable_answer(200, "application/json", big) is None
    assert policy.classify_unusable_answer(200, "application/json", big[:-1]) is not None


def test_unusable_answer_verdict_is_next_without_cooldown():
    """An unusable answer sends the request to the next account and never cools this one."""
    v = policy.unusable_answer(200, "upstream api.anthropic.com returned an empty 200 answer",
                               backoff_level=2)
    assert v == Verdict(NEXT, 200, policy.TRANSIENT, None, 2,
                        "upstream api.anthropic.com returned an empty 200 answer")
    assert v.describe("a") == ('<- 200 account=a backoff-level=2 cooldown=none reason=transient '
                               'action=next detail="upstream api.anthropic.com returned an empty 200 answer"')
