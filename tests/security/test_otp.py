from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlparse

import pytest

from portal.security import otp
from portal.security.qr import qr_svg

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = 1_700_000_015.0  # inside step 56_666_667
STEP = int(NOW // otp.STEP_SECONDS)


def _full_width(code: str) -> str:
    return "".join(chr(ord(ch) - ord("0") + 0xFF10) for ch in code)


def test_new_secret_is_160_bits_base32() -> None:
    secrets = {otp.new_secret() for _ in range(20)}
    assert len(secrets) == 20
    for secret in secrets:
        assert len(secret) == 32
        assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def test_provisioning_uri() -> None:
    uri = otp.provisioning_uri(SECRET, "jane@example.org", "Pickup Portal")
    parsed = urlparse(uri)
    assert parsed.scheme == "otpauth"
    assert parsed.netloc == "totp"
    query = parse_qs(parsed.query)
    assert query["secret"] == [SECRET]
    assert query["issuer"] == ["Pickup Portal"]


def test_code_at_matches_rfc6238_vector() -> None:
    # RFC 6238 Appendix B, SHA-1 seed "12345678901234567890", T=59 -> 94287082 (8 digits).
    seed = base64.b32encode(b"12345678901234567890").decode()
    assert otp.code_at(seed, 59 // 30) == "287082"


def test_current_code_matches_current_step() -> None:
    code = otp.code_at(SECRET, STEP)
    assert otp.matching_step(SECRET, code, now=NOW) == STEP


@pytest.mark.parametrize("offset", [-1, 1])
def test_one_step_of_drift_accepted(offset: int) -> None:
    code = otp.code_at(SECRET, STEP + offset)
    assert otp.matching_step(SECRET, code, now=NOW) == STEP + offset


@pytest.mark.parametrize("offset", [-2, 2])
def test_two_steps_of_drift_refused(offset: int) -> None:
    code = otp.code_at(SECRET, STEP + offset)
    assert otp.matching_step(SECRET, code, now=NOW) is None
    assert otp.matching_step(SECRET, code, now=NOW, drift_steps=2) == STEP + offset


def test_zero_drift_only_current_step() -> None:
    assert otp.matching_step(SECRET, otp.code_at(SECRET, STEP - 1), now=NOW, drift_steps=0) is None


def test_negative_drift_raises() -> None:
    with pytest.raises(ValueError, match="drift_steps"):
        otp.matching_step(SECRET, "123456", now=NOW, drift_steps=-1)


def test_spaces_allowed() -> None:
    code = otp.code_at(SECRET, STEP)
    spaced = f" {code[:3]} {code[3:]}\n"
    assert otp.is_well_formed(spaced)
    assert otp.matching_step(SECRET, spaced, now=NOW) == STEP


def test_full_width_digits_of_a_valid_code_refused() -> None:
    code = otp.code_at(SECRET, STEP)
    wide = _full_width(code)
    assert not otp.is_well_formed(wide)
    assert otp.matching_step(SECRET, wide, now=NOW) is None


def test_other_unicode_digits_refused() -> None:
    arabic_indic = "".join(chr(0x0660 + int(d)) for d in otp.code_at(SECRET, STEP))
    assert otp.matching_step(SECRET, arabic_indic, now=NOW) is None


@pytest.mark.parametrize(
    "code", ["12345", "1234567", "12a456", "abcdef", "", "123456\n7", "+12345", "12-456"]
)
def test_malformed_codes_refused(code: str) -> None:
    assert not otp.is_well_formed(code)
    assert otp.matching_step(SECRET, code, now=NOW) is None


def test_seven_digit_code_with_valid_prefix_refused() -> None:
    code = otp.code_at(SECRET, STEP)
    assert otp.matching_step(SECRET, code + "0", now=NOW) is None


def test_wrong_code_refused() -> None:
    valid = {otp.code_at(SECRET, STEP + off) for off in (-1, 0, 1)}
    wrong = next(c for c in ("000000", "111111", "222222") if c not in valid)
    assert otp.matching_step(SECRET, wrong, now=NOW) is None


def test_qr_svg_well_formed_without_script() -> None:
    uri = otp.provisioning_uri(SECRET, "jane@example.org", "Pickup Portal")
    svg = qr_svg(uri)
    assert not svg.startswith("<?xml")
    assert "<script" not in svg.lower()
    assert "xlink:href" not in svg
    assert "http" not in svg
    root = ET.fromstring(svg)  # noqa: S314 - our own output, not untrusted XML
    assert root.tag.rsplit("}", 1)[-1] == "svg"
    assert root.get("class") == "qr-code"
    assert root.get("role") == "img"
    title = root.find("title")
    assert title is not None
    assert title.text
    assert 150 <= int(root.get("width", "0")) <= 260


def test_qr_svg_escapes_title() -> None:
    svg = qr_svg("hello", title="<script>x</script> & co")
    assert "<script" not in svg
    root = ET.fromstring(svg)  # noqa: S314 - our own output, not untrusted XML
    title = root.find("title")
    assert title is not None
    assert title.text == "<script>x</script> & co"
