"""The world the demo traffic lives in: communities, categories, countries, devices, campaigns, pages.

Every table is a tuple of ``(value, weight)`` pairs (or plain tuples) so that draws from a
seeded RNG are reproducible: nothing here is a ``set`` or depends on hash order.
The context shapes match what the HTTP collector produces from a request
(``context.device.type``, ``context.browser.name``, ``context.os.name``,
``context.campaign.{source,medium,name}``, ``context.referrer.url``,
``context.location.country``, ``context.locale``, ``context.page.{path,title}``).
"""

from __future__ import annotations

from dataclasses import dataclass

CURRENCY = "USD"

# Local communities people join and fund projects in (slug, country).
COMMUNITIES: tuple[tuple[str, str], ...] = (
    ("brooklyn-makers", "US"),
    ("oakland-gardens", "US"),
    ("austin-youth-sports", "US"),
    ("manchester-arts", "GB"),
    ("bristol-repair-cafe", "GB"),
    ("nairobi-water", "KE"),
    ("kisumu-solar", "KE"),
    ("lagos-coders", "NG"),
    ("pune-schools", "IN"),
    ("recife-music", "BR"),
    ("berlin-bikes", "DE"),
    ("lyon-food-bank", "FR"),
    ("toronto-tenants", "CA"),
    ("cebu-fishers", "PH"),
    ("oaxaca-weavers", "MX"),
    ("durban-clinics", "ZA"),
)

CATEGORIES: tuple[tuple[str, float], ...] = (
    ("education", 0.18),
    ("health", 0.12),
    ("water", 0.08),
    ("agriculture", 0.10),
    ("energy", 0.08),
    ("arts", 0.12),
    ("sports", 0.08),
    ("technology", 0.09),
    ("environment", 0.10),
    ("housing", 0.05),
)

# (country, locale, weight)
COUNTRIES: tuple[tuple[str, str, float], ...] = (
    ("US", "en-US", 0.30),
    ("GB", "en-GB", 0.10),
    ("KE", "en-KE", 0.09),
    ("NG", "en-NG", 0.08),
    ("IN", "en-IN", 0.09),
    ("BR", "pt-BR", 0.07),
    ("DE", "de-DE", 0.06),
    ("FR", "fr-FR", 0.05),
    ("CA", "en-CA", 0.05),
    ("PH", "en-PH", 0.04),
    ("MX", "es-MX", 0.04),
    ("ZA", "en-ZA", 0.03),
)


@dataclass(frozen=True)
class DeviceProfile:
    """A kind of device a visitor browses with, and the user agent that produces it."""

    device_type: str
    os: str
    browser: str
    user_agent: str
    weight: float


# Names follow ua-parser's families, which is what the collector derives from a user agent.
DEVICES: tuple[DeviceProfile, ...] = (
    DeviceProfile(
        "desktop",
        "Windows",
        "Chrome",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
        0.22,
    ),
    DeviceProfile(
        "desktop",
        "Windows",
        "Edge",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
        0.06,
    ),
    DeviceProfile(
        "desktop",
        "Mac OS X",
        "Safari",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.1 Safari/605.1.15",
        0.09,
    ),
    DeviceProfile(
        "desktop",
        "Mac OS X",
        "Chrome",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
        0.05,
    ),
    DeviceProfile(
        "desktop",
        "Linux",
        "Firefox",
        "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
        0.03,
    ),
    DeviceProfile(
        "mobile",
        "iOS",
        "Mobile Safari",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.1 Mobile/15E148 Safari/604.1",
        0.20,
    ),
    DeviceProfile(
        "mobile",
        "Android",
        "Chrome Mobile",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Mobile Safari/537.36",
        0.22,
    ),
    DeviceProfile(
        "mobile",
        "Android",
        "Samsung Internet",
        "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
        0.06,
    ),
    DeviceProfile(
        "tablet",
        "iOS",
        "Mobile Safari",
        "Mozilla/5.0 (iPad; CPU OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.1 Mobile/15E148 Safari/604.1",
        0.05,
    ),
    DeviceProfile(
        "tablet",
        "Android",
        "Chrome",
        "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
        0.02,
    ),
)


@dataclass(frozen=True)
class AcquisitionChannel:
    """How a new visitor found the site: UTM campaign and/or referrer, and how likely they sign up."""

    utm_source: str | None
    utm_medium: str | None
    utm_campaign: str | None
    referrer: str | None
    weight: float
    signup_propensity: float  # multiplies the base signup probability of an anonymous session


CHANNELS: tuple[AcquisitionChannel, ...] = (
    AcquisitionChannel(None, None, None, None, 0.26, 1.0),  # direct
    AcquisitionChannel(None, None, None, "https://www.google.com/", 0.22, 1.1),  # organic search
    AcquisitionChannel("google", "cpc", "winter_giving", "https://www.google.com/", 0.12, 1.3),
    AcquisitionChannel("facebook", "paid_social", "community_heroes", "https://m.facebook.com/", 0.12, 0.8),
    AcquisitionChannel("instagram", "paid_social", "community_heroes", "https://l.instagram.com/", 0.07, 0.7),
    AcquisitionChannel("newsletter", "email", "monthly_digest", None, 0.07, 1.8),
    AcquisitionChannel("twitter", "social", "launch_week", "https://t.co/", 0.05, 0.6),
    AcquisitionChannel("partner_blog", "referral", "ngo_partners", "https://blog.partner.example/", 0.05, 1.5),
    AcquisitionChannel(None, None, None, "https://news.ycombinator.com/", 0.04, 0.5),
)

# Where a referred visitor arrives from (a member shared their referral link).
REFERRAL_CHANNEL = AcquisitionChannel("referral", "referral", "invite_a_friend", None, 0.0, 4.0)

# Static pages an anonymous or signed-in visitor browses (path, title, weight).
BROWSE_PAGES: tuple[tuple[str, str, float], ...] = (
    ("/", "Tidemark Fund — back the projects next door", 0.25),
    ("/projects", "Discover projects", 0.25),
    ("/communities", "Communities", 0.12),
    ("/how-it-works", "How it works", 0.10),
    ("/loans", "Community micro-loans", 0.07),
    ("/about", "About us", 0.05),
    ("/faq", "Questions and answers", 0.06),
    ("/blog", "Stories from our communities", 0.10),
)

SIGNUP_METHODS: tuple[tuple[str, float], ...] = (
    ("email", 0.45),
    ("google", 0.35),
    ("apple", 0.12),
    ("facebook", 0.08),
)

AGE_BANDS: tuple[tuple[str, float], ...] = (
    ("18-24", 0.17),
    ("25-34", 0.31),
    ("35-44", 0.24),
    ("45-54", 0.15),
    ("55+", 0.13),
)

# (message, code, weight); the path is the page the error happened on.
ERRORS: tuple[tuple[str, str, float], ...] = (
    ("Payment declined by issuer", "PAYMENT_DECLINED", 0.25),
    ("Request timed out", "TIMEOUT", 0.25),
    ("Internal server error", "HTTP_500", 0.20),
    ("Image failed to load", "ASSET_404", 0.15),
    ("Session expired, please sign in again", "AUTH_EXPIRED", 0.15),
)

# Typical contribution sizes in USD (value, weight); a little noise is added on top.
CONTRIBUTIONS: tuple[tuple[float, float], ...] = (
    (5.0, 0.14),
    (10.0, 0.22),
    (20.0, 0.18),
    (25.0, 0.16),
    (50.0, 0.15),
    (100.0, 0.10),
    (250.0, 0.05),
)

GOAL_AMOUNTS: tuple[tuple[float, float], ...] = (
    (250.0, 0.20),
    (500.0, 0.30),
    (1000.0, 0.30),
    (2500.0, 0.15),
    (5000.0, 0.05),
)

LOAN_AMOUNTS: tuple[tuple[float, float], ...] = (
    (50.0, 0.20),
    (100.0, 0.30),
    (250.0, 0.25),
    (500.0, 0.18),
    (1000.0, 0.07),
)

ADS: tuple[str, ...] = tuple(f"ad_{n:03d}" for n in range(1, 41))


def processing_fee(amount: float) -> float:
    """The card processing fee the platform charges on a contribution (2.9 % + 0.30, in cents precision)."""
    return round(amount * 0.029 + 0.30, 2)
