"""Context enrichment at the edge: what the collector adds to (and removes from) an event's context.

Pure functions of (client-sent context, request facts), so they are unit-tested without a server.
This is the collector's equivalent of a tracking library's ``context``:

- user agent → ``device`` {type, brand, model}, ``browser`` {name, version}, ``os`` {name, version}
  (parsed with ``ua-parser``, the maintained port of the uap-core regexes);
- referrer → ``referrer`` {url, host, medium} with medium one of search | social | email | internal |
  external | direct;
- UTM parameters → ``campaign`` {source, medium, name, term, content}, from the client's
  ``context.campaign`` or else from the page URL's query string;
- IP address → anonymised *before storage* (IPv4: last octet zeroed, IPv6: last 80 bits zeroed);
  the raw address never leaves this module;
- country → ``location.country`` from a CDN header (``CF-IPCountry``, ``X-Country-Code``,
  ``X-Vercel-IP-Country``). There is no GeoIP database in Tidemark, so without such a header (or a
  country the client sent itself) the country stays unknown;
- ``locale`` and every other client-sent context field are kept as they are.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

import ua_parser

DEVICE_TYPES = ("mobile", "tablet", "desktop", "bot")
REFERRER_MEDIA = ("search", "social", "email", "internal", "external", "direct")
COUNTRY_HEADERS = ("cf-ipcountry", "x-country-code", "x-vercel-ip-country")
UTM_FIELDS = {
    "utm_source": "source",
    "utm_medium": "medium",
    "utm_campaign": "name",
    "utm_term": "term",
    "utm_content": "content",
}
CAMPAIGN_FIELDS = ("source", "medium", "name", "term", "content")

# Second-level labels identifying well-known referrers, matched against every label of the host
# (so "www.google.co.uk" and "news.google.com" are search). Small on purpose: the long tail is "external".
SEARCH_LABELS = frozenset(
    {
        "google",
        "bing",
        "yahoo",
        "duckduckgo",
        "baidu",
        "yandex",
        "ecosia",
        "qwant",
        "startpage",
        "naver",
        "seznam",
        "search",
    }
)
SOCIAL_HOSTS = frozenset(
    {
        "facebook.com",
        "fb.com",
        "m.facebook.com",
        "l.facebook.com",
        "instagram.com",
        "twitter.com",
        "x.com",
        "t.co",
        "linkedin.com",
        "lnkd.in",
        "reddit.com",
        "youtube.com",
        "tiktok.com",
        "pinterest.com",
        "whatsapp.com",
        "wa.me",
        "t.me",
        "telegram.org",
        "snapchat.com",
        "threads.net",
        "mastodon.social",
        "news.ycombinator.com",
    }
)
EMAIL_HOSTS = frozenset(
    {
        "mail.google.com",
        "outlook.live.com",
        "outlook.office.com",
        "outlook.office365.com",
        "mail.yahoo.com",
        "mail.proton.me",
        "mail.aol.com",
        "webmail",
        "mail.yandex.ru",
    }
)
MOBILE_OS = frozenset(
    {
        "iOS",
        "Android",
        "Windows Phone",
        "BlackBerry OS",
        "KaiOS",
        "Firefox OS",
        "Tizen",
        "HarmonyOS",
        "Symbian OS",
        "webOS",
    }
)
# Client libraries (e.g. mobile SDKs) send context.device.type as a platform name.
PLATFORM_DEVICE_TYPES = {
    "ios": "mobile",
    "android": "mobile",
    "ipados": "tablet",
    "tablet": "tablet",
    "mobile": "mobile",
    "phone": "mobile",
    "desktop": "desktop",
    "bot": "bot",
    "macos": "desktop",
    "windows": "desktop",
    "linux": "desktop",
    "web": "desktop",
}


@dataclass(frozen=True)
class RequestFacts:
    """What the HTTP request itself tells about the sender (shared by every event of a batch)."""

    user_agent: str | None = None
    client_ip: str | None = None
    country: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], client_ip: str | None) -> RequestFacts:
        """Read the user agent and the CDN's country header (first one present wins)."""
        return cls(user_agent=headers.get("user-agent"), client_ip=client_ip, country=country_from_headers(headers))


def country_from_headers(headers: Mapping[str, str]) -> str | None:
    """The ISO 3166-1 alpha-2 country a CDN put in a header, or ``None``.

    Cloudflare's "XX" (unknown) and "T1" (Tor) are not countries, so they are dropped.
    """
    for name in COUNTRY_HEADERS:
        value = headers.get(name)
        if value:
            code = value.strip().upper()
            if len(code) == 2 and code.isalpha() and code != "XX":
                return code
    return None


@lru_cache(maxsize=65536)
def anonymize_ip(value: str) -> str | None:
    """The address with its host part zeroed: IPv4 /24 (last octet), IPv6 /48 (last 80 bits).

    Returns ``None`` for something that is not an IP address, so garbage is never stored either.

    >>> anonymize_ip("203.0.113.77")
    '203.0.113.0'
    >>> anonymize_ip("2001:db8:85a3:8d3:1319:8a2e:370:7348")
    '2001:db8:85a3::'
    """
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return str(network.network_address)


def parse_user_agent(user_agent: str) -> dict[str, dict[str, str | None]]:
    """``device`` {type, brand, model}, ``browser`` {name, version} and ``os`` {name, version} of a UA string.

    Device type, kept simple on purpose:
    ``bot`` when uap-core calls the device a Spider or the agent names itself a bot/crawler/spider;
    ``tablet`` for iPads, Kindles and devices uap-core files as tablets, and for Android without the
    "Mobile" token (Google's convention for Android tablets); ``mobile`` for the other phones and mobile
    operating systems; ``desktop`` for everything else.

    >>> parse_user_agent("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
    ...                  "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1")["device"]["type"]
    'mobile'
    """
    device_info, browser_info, os_info = _parsed_user_agent(user_agent)
    return {"device": dict(device_info), "browser": dict(browser_info), "os": dict(os_info)}


@lru_cache(maxsize=8192)
def _parsed_user_agent(
    user_agent: str,
) -> tuple[tuple[tuple[str, str | None], ...], tuple[tuple[str, str | None], ...], tuple[tuple[str, str | None], ...]]:
    # A few thousand distinct agents cover nearly all traffic, so parsing is cached (immutable results).
    result = ua_parser.parse(user_agent)
    agent, os_, device = result.user_agent, result.os, result.device
    browser_name = agent.family if agent else None
    os_name = os_.family if os_ else None
    device_family = device.family if device else None
    brand = device.brand if device and device.brand and not device.brand.startswith("Generic") else None
    model = device.model if device and device.model and device_family not in (None, "Other", "Spider") else None
    return (
        (("type", _device_type(user_agent, browser_name, os_name, device, brand)), ("brand", brand), ("model", model)),
        (
            ("name", browser_name if browser_name != "Other" else None),
            ("version", _version(agent.major, agent.minor, agent.patch) if agent else None),
        ),
        (
            ("name", os_name if os_name != "Other" else None),
            ("version", _version(os_.major, os_.minor, os_.patch) if os_ else None),
        ),
    )


def warm_up() -> None:
    """Load the user-agent parser's rules now (about a second), not on the first request."""
    parse_user_agent("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0.0.0 Safari/537.36")


def _device_type(user_agent: str, browser: str | None, os_name: str | None, device: Any, brand: str | None) -> str:
    family = (device.family if device else None) or ""
    lowered = user_agent.lower()
    if family == "Spider" or any(word in lowered for word in ("bot", "crawler", "spider", "headlesschrome")):
        return "bot"
    raw_brand = (device.brand if device else None) or ""
    descriptor = f"{family} {raw_brand} {device.model if device else ''}".lower()
    if "ipad" in descriptor or "tablet" in descriptor or "kindle" in descriptor or "tab" in family.lower():
        return "tablet"
    if os_name == "Android" and "mobile" not in lowered:
        return "tablet"
    if os_name in MOBILE_OS or "mobile" in (browser or "").lower() or family in ("iPhone", "iPod"):
        return "mobile"
    return "desktop"


def _version(*parts: str | None) -> str | None:
    present = [p for p in parts if p]
    return ".".join(present) if present else None


def referrer_medium(referrer_url: str | None, page_url: str | None = None) -> tuple[str | None, str]:
    """The referrer's host and its medium: search, social, email, internal, external or direct.

    ``internal`` means the referrer is the page's own site (same host, or one a subdomain of the other).

    >>> referrer_medium("https://www.google.com/search?q=tidemark")
    ('www.google.com', 'search')
    >>> referrer_medium(None)
    (None, 'direct')
    """
    if not referrer_url:
        return None, "direct"
    host = (urlsplit(referrer_url).hostname or "").lower()
    if not host:
        return None, "direct"
    page_host = (urlsplit(page_url).hostname or "").lower() if page_url else ""
    bare = host.removeprefix("www.")
    if page_host:
        page_bare = page_host.removeprefix("www.")
        if bare == page_bare or bare.endswith("." + page_bare) or page_bare.endswith("." + bare):
            return host, "internal"
    if host in EMAIL_HOSTS or bare in EMAIL_HOSTS or host.startswith(("mail.", "webmail.")):
        return host, "email"
    labels = bare.split(".")
    # Every parent domain of the host, longest first ("m.facebook.com", "facebook.com").
    if host in SOCIAL_HOSTS or any(".".join(labels[i:]) in SOCIAL_HOSTS for i in range(len(labels) - 1)):
        return host, "social"
    if any(label in SEARCH_LABELS for label in labels[:-1]):
        return host, "search"
    return host, "external"


def campaign_from_url(url: str | None) -> dict[str, str]:
    """The UTM parameters of a URL's query string as ``{source, medium, name, term, content}``.

    >>> campaign_from_url("https://tidemark.example/p?utm_source=news&utm_campaign=spring")
    {'source': 'news', 'name': 'spring'}
    """
    if not url or "utm_" not in url:
        return {}
    query = parse_qs(urlsplit(url).query)
    return {field: query[param][0] for param, field in UTM_FIELDS.items() if query.get(param)}


def _campaign(client: Any, page_url: str | None) -> dict[str, Any]:
    if isinstance(client, dict) and client:
        # analytics.js sends {name, source, medium, term, content}; some libraries send utm_* keys.
        campaign = {k: v for k, v in client.items() if k not in UTM_FIELDS}
        for param, field in UTM_FIELDS.items():
            if param in client and field not in campaign:
                campaign[field] = client[param]
        return campaign
    return dict(campaign_from_url(page_url))


def enrich_context(context: dict[str, Any], facts: RequestFacts) -> dict[str, Any]:
    """A new context: the client's, plus device/browser/os, referrer, campaign, anonymised IP and country.

    What the client sent explicitly is kept, except ``device.type`` (normalised to one of
    mobile | tablet | desktop | bot because dashboards group by it) and ``ip`` (always anonymised).
    The user agent is the client's ``context.userAgent``, else the request's ``User-Agent`` header.
    """
    enriched = dict(context)
    page = context.get("page") if isinstance(context.get("page"), dict) else {}
    page_url = page.get("url") if isinstance(page.get("url"), str) else None

    user_agent = context.get("userAgent") if isinstance(context.get("userAgent"), str) else facts.user_agent
    client_device = context.get("device") if isinstance(context.get("device"), dict) else {}
    device: dict[str, Any] = dict(client_device)
    if user_agent:
        parsed = parse_user_agent(user_agent)
        for key, value in parsed["device"].items():
            if key == "type" or device.get(key) is None:
                device[key] = value
        # A mobile SDK's own description beats parsing a generic HTTP client's agent string.
        if not isinstance(context.get("os"), dict):
            enriched["os"] = parsed["os"]
        if not isinstance(context.get("browser"), dict):
            enriched["browser"] = parsed["browser"]
        if client_device.get("type") and not context.get("userAgent"):
            device["type"] = _platform_type(client_device["type"], context) or device["type"]
    else:
        device["type"] = _platform_type(client_device.get("type"), context) or "desktop"
    enriched["device"] = device

    referrer_url = _referrer_url(context, page)
    host, medium = referrer_medium(referrer_url, page_url)
    client_referrer = context.get("referrer") if isinstance(context.get("referrer"), dict) else {}
    enriched["referrer"] = {**client_referrer, "url": referrer_url, "host": host, "medium": medium}

    campaign = _campaign(context.get("campaign"), page_url)
    if campaign:
        enriched["campaign"] = campaign
        if campaign.get("medium") == "email" and medium in ("direct", "external"):
            enriched["referrer"]["medium"] = "email"

    raw_ip = context.get("ip") if isinstance(context.get("ip"), str) and context.get("ip") else facts.client_ip
    anonymised = anonymize_ip(raw_ip) if raw_ip else None
    if anonymised:
        enriched["ip"] = anonymised
    else:
        enriched.pop("ip", None)

    location = dict(context["location"]) if isinstance(context.get("location"), dict) else {}
    if not location.get("country") and facts.country:
        location["country"] = facts.country
    if location:
        enriched["location"] = location
    return enriched


def _referrer_url(context: dict[str, Any], page: dict[str, Any]) -> str | None:
    referrer = page.get("referrer")
    if isinstance(referrer, str) and referrer:
        return referrer
    client = context.get("referrer")
    if isinstance(client, dict):
        for key in ("url", "link"):
            if isinstance(client.get(key), str) and client[key]:
                return str(client[key])
    if isinstance(client, str) and client:
        return client
    return None


def _platform_type(value: Any, context: dict[str, Any]) -> str | None:
    if isinstance(value, str) and value.lower() in PLATFORM_DEVICE_TYPES:
        return PLATFORM_DEVICE_TYPES[value.lower()]
    os_info = context.get("os")
    if isinstance(os_info, dict) and os_info.get("name") in MOBILE_OS:
        return "mobile"
    return None
