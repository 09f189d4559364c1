"""Context enrichment: user agent, referrer, UTM, IP anonymisation and CDN country."""

from __future__ import annotations

import pytest

from api.collector.enrich import (
    RequestFacts,
    anonymize_ip,
    campaign_from_url,
    country_from_headers,
    enrich_context,
    parse_user_agent,
    referrer_medium,
)

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.0 Mobile/15E148 Safari/604.1"
)
IPAD = (
    "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/16.6 Mobile/15E148 Safari/604.1"
)
WINDOWS_CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
)
ANDROID_PHONE = (
    "Mozilla/5.0 (Linux; Android 13; SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Mobile Safari/537.36"
)
ANDROID_TABLET = (
    "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


@pytest.mark.parametrize(
    ("user_agent", "device_type", "browser", "os_name"),
    [
        (IPHONE, "mobile", "Mobile Safari", "iOS"),
        (IPAD, "tablet", "Mobile Safari", "iOS"),
        (WINDOWS_CHROME, "desktop", "Chrome", "Windows"),
        (ANDROID_PHONE, "mobile", "Chrome Mobile", "Android"),
        (ANDROID_TABLET, "tablet", "Chrome", "Android"),
        (GOOGLEBOT, "bot", "Googlebot", None),
    ],
)
def test_user_agent_gives_device_browser_and_os(
    user_agent: str, device_type: str, browser: str, os_name: str | None
) -> None:
    parsed = parse_user_agent(user_agent)
    assert parsed["device"]["type"] == device_type
    assert parsed["browser"]["name"] == browser
    assert parsed["os"]["name"] == os_name


def test_user_agent_versions_brand_and_model() -> None:
    iphone = parse_user_agent(IPHONE)
    assert iphone["browser"]["version"] == "17.0"
    assert iphone["os"]["version"] == "17.0"
    assert iphone["device"]["brand"] == "Apple"
    assert iphone["device"]["model"] == "iPhone"
    samsung = parse_user_agent(ANDROID_PHONE)
    assert samsung["device"]["brand"] == "Samsung"
    assert samsung["device"]["model"] == "SM-S911B"
    assert parse_user_agent(WINDOWS_CHROME)["device"]["brand"] is None


@pytest.mark.parametrize(
    ("raw", "anonymised"),
    [
        ("203.0.113.77", "203.0.113.0"),
        ("10.1.2.255", "10.1.2.0"),
        ("2001:db8:85a3:8d3:1319:8a2e:370:7348", "2001:db8:85a3::"),
        ("::ffff:198.51.100.23", "198.51.100.0"),
        ("not an ip", None),
    ],
)
def test_ip_is_anonymised(raw: str, anonymised: str | None) -> None:
    assert anonymize_ip(raw) == anonymised


@pytest.mark.parametrize(
    ("referrer", "page", "host", "medium"),
    [
        (None, None, None, "direct"),
        ("", "https://fund.example/p", None, "direct"),
        ("https://www.google.co.uk/search?q=x", None, "www.google.co.uk", "search"),
        ("https://duckduckgo.com/", None, "duckduckgo.com", "search"),
        ("https://t.co/abc", None, "t.co", "social"),
        ("https://m.facebook.com/story", None, "m.facebook.com", "social"),
        ("https://mail.google.com/mail/u/0", None, "mail.google.com", "email"),
        ("https://fund.example/projects", "https://www.fund.example/p/1", "fund.example", "internal"),
        ("https://blog.fund.example/post", "https://fund.example/p/1", "blog.fund.example", "internal"),
        ("https://news.example.org/a", "https://fund.example/", "news.example.org", "external"),
    ],
)
def test_referrer_medium(referrer: str | None, page: str | None, host: str | None, medium: str) -> None:
    assert referrer_medium(referrer, page) == (host, medium)


def test_campaign_from_page_url() -> None:
    url = "https://fund.example/p?utm_source=newsletter&utm_medium=email&utm_campaign=spring&utm_term=t&utm_content=c"
    assert campaign_from_url(url) == {
        "source": "newsletter",
        "medium": "email",
        "name": "spring",
        "term": "t",
        "content": "c",
    }
    assert campaign_from_url("https://fund.example/p?x=1") == {}
    assert campaign_from_url(None) == {}


def test_country_header_first_present_wins_and_unknown_is_dropped() -> None:
    assert country_from_headers({"cf-ipcountry": "de"}) == "DE"
    assert country_from_headers({"x-vercel-ip-country": "KE"}) == "KE"
    assert country_from_headers({"cf-ipcountry": "XX"}) is None
    assert country_from_headers({"x-country-code": "USA"}) is None
    assert country_from_headers({}) is None


def test_enrich_context_browser_event() -> None:
    context = {
        "locale": "de-DE",
        "ip": "203.0.113.77",
        "page": {
            "url": "https://fund.example/p/1?utm_source=google&utm_medium=cpc&utm_campaign=launch",
            "referrer": "https://www.google.com/",
        },
        "library": {"name": "analytics.js", "version": "5.0.0"},
    }
    facts = RequestFacts(user_agent=IPHONE, client_ip="198.51.100.9", country="DE")
    enriched = enrich_context(context, facts)
    assert enriched["ip"] == "203.0.113.0"
    assert enriched["locale"] == "de-DE"
    assert enriched["library"] == {"name": "analytics.js", "version": "5.0.0"}
    assert enriched["device"]["type"] == "mobile"
    assert enriched["browser"]["name"] == "Mobile Safari"
    assert enriched["os"] == {"name": "iOS", "version": "17.0"}
    assert enriched["referrer"] == {"url": "https://www.google.com/", "host": "www.google.com", "medium": "search"}
    assert enriched["campaign"] == {"source": "google", "medium": "cpc", "name": "launch"}
    assert enriched["location"] == {"country": "DE"}
    assert context["ip"] == "203.0.113.77", "the client's dict is not modified"


def test_enrich_context_raw_ip_never_kept() -> None:
    enriched = enrich_context({}, RequestFacts(client_ip="198.51.100.9"))
    assert enriched["ip"] == "198.51.100.0"
    assert "198.51.100.9" not in repr(enriched)
    garbage = enrich_context({"ip": "999.1.1.1"}, RequestFacts(client_ip=None))
    assert "ip" not in garbage


def test_enrich_context_client_campaign_and_country_win() -> None:
    context = {
        "campaign": {"name": "spring", "source": "newsletter", "medium": "email"},
        "location": {"country": "FR", "city": "Lyon"},
        "page": {"url": "https://fund.example/?utm_source=ignored"},
    }
    enriched = enrich_context(context, RequestFacts(user_agent=WINDOWS_CHROME, country="DE"))
    assert enriched["campaign"] == {"name": "spring", "source": "newsletter", "medium": "email"}
    assert enriched["location"] == {"country": "FR", "city": "Lyon"}
    assert enriched["referrer"]["medium"] == "email", "utm_medium=email marks a referrer-less visit as email"
    assert enriched["device"]["type"] == "desktop"


def test_enrich_context_mobile_sdk_without_user_agent() -> None:
    context = {
        "device": {"type": "android", "manufacturer": "Google", "model": "Pixel 8", "id": "d-1"},
        "os": {"name": "Android", "version": "14"},
    }
    enriched = enrich_context(context, RequestFacts())
    assert enriched["device"] == {"type": "mobile", "manufacturer": "Google", "model": "Pixel 8", "id": "d-1"}
    assert enriched["os"] == {"name": "Android", "version": "14"}
    assert enriched["referrer"]["medium"] == "direct"
