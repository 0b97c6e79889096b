"""Password hashing, normalisation and policy (NIST SP 800-63B 5.1.1, OWASP ASVS V2.1/V2.4).

Hashing is argon2id through argon2-cffi. Parameters: t=2, m=64 MiB, p=1.
We first tried t=3, m=64 MiB, p=1 (RFC 9106 low-memory profile with p=1): it measured
about 157 ms per hash on the development machine (median of 7), above our 150 ms budget
for a sign-in. t=2, m=64 MiB, p=1 measured about 112 ms and is still well above OWASP's
floor (m=19 MiB, t=2, p=1). Stored hashes carry their parameters, so raising them later
only needs ``needs_rehash`` at the next successful sign-in.

Passwords are normalised with NFKC before hashing and before every check
(800-63B 5.1.1.2), so the same password typed on different keyboards matches.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import unicodedata
from collections.abc import Iterable
from difflib import SequenceMatcher
from functools import cached_property

import argon2
from argon2.exceptions import InvalidHashError, VerificationError
from zxcvbn import zxcvbn

# Argon2id parameters (see module docstring for the measurement behind them).
TIME_COST = 2  # iterations
MEMORY_COST_KIB = 65_536  # 64 MiB
PARALLELISM = 1  # lanes

# OWASP Password Storage Cheat Sheet minimum for argon2id: m=19 MiB, t=2, p=1.
MIN_TIME_COST = 2
MIN_MEMORY_COST_KIB = 19_456

# DANGEROUS, tests only: argon2's own minimum (t=1, m=8 KiB, p=1), about 20 microseconds a
# hash instead of about 110 ms. Only insecure_hasher_for_tests() builds a hasher with them,
# and create_app refuses PASSWORD_HASH_PARAMS unless TESTING (portal.config).
INSECURE_TEST_PARAMETERS = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}

# 800-63B 5.1.1.2: at least 8 characters, verifiers SHOULD allow at least 64. We ask for
# 12 (ASVS 2.1.1) and allow 128 (ASVS 2.1.2), counted as code points after NFKC.
MIN_LENGTH = 12
MAX_LENGTH = 128

# zxcvbn's cost grows quickly with length and it refuses long inputs, so it sees a prefix.
ZXCVBN_MAX_CHARS = 100
ZXCVBN_MIN_SCORE = 3
ZXCVBN_EXTRA_INPUTS = ("pickup", "portal")

# Email local parts and name tokens shorter than this are too common to refuse on.
MIN_PERSONAL_TOKEN = 3

# 800-63B 5.1.1.2: refuse context-specific words, "such as the name of the service". The
# product's name always, the organisation's (PORTAL_ORG_NAME) when the caller passes it;
# compared without spaces, punctuation or common substitutions, and also as near-copies.
PRODUCT_NAME = "Pickup Portal"
MIN_CONTEXT_NAME = 4  # compacted names shorter than this are too common to refuse on
CLOSE_MATCH_RATIO = 0.85  # difflib ratio from which a stretch of the password copies a name
_UNLEET = (
    str.maketrans(
        {"0": "o", "1": "i", "!": "i", "3": "e", "4": "a", "@": "a", "5": "s", "$": "s", "7": "t"}
    ),
    str.maketrans(
        {"0": "o", "1": "l", "|": "l", "3": "e", "4": "a", "@": "a", "5": "s", "$": "s", "7": "t"}
    ),
)

# Unicode categories refused: Cc (controls: tab, newline, NUL...) and Cs (lone surrogates,
# which cannot be encoded). Cf stays allowed: emoji sequences need the zero-width joiner.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs"})
_TOKEN_SPLIT = re.compile(r"[\W_]+")

# zxcvbn stores the user inputs in a module-level dictionary during each call, so two
# threads scoring at once could see each other's inputs: one call at a time.
_ZXCVBN_LOCK = threading.Lock()

# argon2id of a random, discarded password, with the default parameters above. Verify
# against it when the account does not exist, so the response takes as long as for a
# real account and does not reveal which emails are registered (ASVS 2.2.x, 3.x).
DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=2,p=1$BPBogvnADA53VALaqvC4tA$"
    "4yEMNnRva4Ta108ZB4uPgXxY8oCHrf+rRg2knAq5i3E"
)


def normalise(password: str) -> str:
    """Return the NFKC form of ``password`` (800-63B 5.1.1.2). Raises nothing."""
    return unicodedata.normalize("NFKC", password)


class PasswordHasher:
    """argon2id hasher over NFKC-normalised passwords."""

    def __init__(
        self,
        *,
        time_cost: int = TIME_COST,
        memory_cost: int = MEMORY_COST_KIB,
        parallelism: int = PARALLELISM,
        enforce_floor: bool = True,
    ) -> None:
        """Build a hasher. Raises ValueError for parameters below the OWASP floor.

        ``enforce_floor=False`` is for insecure_hasher_for_tests() alone.
        """
        below = time_cost < MIN_TIME_COST or memory_cost < MIN_MEMORY_COST_KIB or parallelism < 1
        if enforce_floor and below:
            raise ValueError(
                f"argon2id parameters below the floor (t>={MIN_TIME_COST}, "
                f"m>={MIN_MEMORY_COST_KIB} KiB, p>=1): t={time_cost}, m={memory_cost}, "
                f"p={parallelism}"
            )
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            type=argon2.Type.ID,
        )
        self.parameters = (time_cost, memory_cost, parallelism)

    @cached_property
    def dummy_hash(self) -> str:
        """Return a hash of a random, discarded password made with this hasher's parameters.

        Verify against it when there is no stored hash, so that check costs what a real one
        does. DUMMY_HASH for the default parameters; made once otherwise. Raises nothing.
        """
        if self.parameters == (TIME_COST, MEMORY_COST_KIB, PARALLELISM):
            return DUMMY_HASH
        return self._hasher.hash(secrets.token_urlsafe(16))

    def hash_password(self, password: str) -> str:
        """Return the encoded argon2id hash (``$argon2id$v=19$m=...``) of the NFKC password.

        Raises ValueError (UnicodeEncodeError) for a password holding lone surrogates.
        """
        return self._hasher.hash(normalise(password))

    def verify_password(self, stored: str, password: str) -> bool:
        """Return True when ``password`` matches ``stored``.

        Returns False, never raises, for a wrong password, a malformed or foreign stored
        hash, or a password that cannot be encoded.
        """
        try:
            return self._hasher.verify(stored, normalise(password))
        except (VerificationError, InvalidHashError, ValueError, TypeError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        """Return True when ``stored`` was made with other parameters (or is malformed).

        Call after a successful verify and store a fresh hash. Raises nothing.
        """
        try:
            return self._hasher.check_needs_rehash(stored)
        except (InvalidHashError, ValueError, TypeError):
            return True


def make_hasher(
    time_cost: int = TIME_COST,
    memory_cost: int = MEMORY_COST_KIB,
    parallelism: int = PARALLELISM,
) -> PasswordHasher:
    """Return a PasswordHasher with these parameters. Raises ValueError below the floor."""
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism)


def insecure_hasher_for_tests(**parameters: int) -> PasswordHasher:
    """DANGEROUS, tests only: return a hasher below the OWASP floor.

    INSECURE_TEST_PARAMETERS, updated with ``parameters``. Fixtures hash with it so that
    enrolling users costs microseconds; never store a real password with it. Raises
    nothing (argon2 itself refuses impossible parameters at the first hash).
    """
    return PasswordHasher(**{**INSECURE_TEST_PARAMETERS, **parameters}, enforce_floor=False)


def default_hasher() -> PasswordHasher:
    """Return the hasher with the production parameters (TIME_COST, MEMORY_COST_KIB)."""
    return _default_hasher


_default_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    """Return the argon2id hash of ``password`` with the default parameters.

    Raises ValueError (UnicodeEncodeError) for a password holding lone surrogates.
    """
    return _default_hasher.hash_password(password)


def verify_password(stored: str, password: str) -> bool:
    """Return True when ``password`` matches ``stored``; False otherwise. Never raises."""
    return _default_hasher.verify_password(stored, password)


def needs_rehash(stored: str) -> bool:
    """Return True when ``stored`` does not use the default parameters. Never raises."""
    return _default_hasher.needs_rehash(stored)


def _blocklist_key(password: str) -> bytes:
    return hashlib.sha256(normalise(password).casefold().encode("utf-8", "surrogatepass")).digest()


class Blocklist:
    """Breached or common passwords (800-63B 5.1.1.2, ASVS 2.1.7).

    Entries are NFKC-normalised and case-folded, then kept only as SHA-256 digests in a
    set: every lookup is one hash and one set membership test, whatever the list size.
    Memory: about 110 bytes per entry in CPython (33-byte digest object plus set slot),
    so 1 million entries take about 110 MB. For lists far larger (the full Have I Been
    Pwned corpus) use a k-anonymity range service or an on-disk index instead.
    """

    def __init__(self, entries: Iterable[str] = ()) -> None:
        """Build from an iterable of passwords; blank entries are skipped. Raises nothing."""
        self._digests: frozenset[bytes] = frozenset(
            _blocklist_key(entry) for entry in entries if entry
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Blocklist:
        """Load a UTF-8 file holding one password per line.

        Only line endings are stripped: spaces inside or around a password are part of it.
        Raises ValueError when the file cannot be read or is not UTF-8.
        """
        try:
            with open(path, encoding="utf-8") as handle:
                return cls(line.rstrip("\r\n") for line in handle)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"Cannot read password blocklist {os.fspath(path)!r}: {exc}") from exc

    def __contains__(self, password: object) -> bool:
        """Return True when ``password`` (compared NFKC and case-folded) is listed."""
        return isinstance(password, str) and _blocklist_key(password) in self._digests

    def __len__(self) -> int:
        """Return the number of distinct entries."""
        return len(self._digests)


def _personal_tokens(email: str, name: str) -> tuple[list[str], list[str]]:
    local = normalise(email.rpartition("@")[0] if "@" in email else email).casefold()
    email_tokens = [local, *_TOKEN_SPLIT.split(local)]
    name_tokens = _TOKEN_SPLIT.split(normalise(name).casefold())
    keep = MIN_PERSONAL_TOKEN
    return (
        [t for t in email_tokens if len(t) >= keep],
        [t for t in name_tokens if len(t) >= keep],
    )


def _shape_messages(password: str) -> list[str]:
    messages = []
    if len(password) < MIN_LENGTH:
        messages.append(
            f"Use at least {MIN_LENGTH} characters. A passphrase of several unrelated words "
            "is long and easy to remember."
        )
    if len(password) > MAX_LENGTH:
        messages.append(f"Use at most {MAX_LENGTH} characters.")
    if any(unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in password):
        messages.append(
            "Remove control characters such as tabs or line breaks. Letters, digits, "
            "spaces, punctuation and symbols in any language are all fine."
        )
    return messages


def _personal_messages(password: str, email: str, name: str) -> list[str]:
    folded = password.casefold()
    email_tokens, name_tokens = _personal_tokens(email, name)
    messages = []
    if any(token in folded for token in email_tokens):
        messages.append("Do not include your email address or part of it.")
    if any(token in folded for token in name_tokens):
        messages.append("Do not include your name or part of it.")
    return messages


def _compact(text: str) -> str:
    return "".join(ch for ch in normalise(text).casefold() if ch.isalnum())


def _copies(password: str, target: str) -> bool:
    """True when some stretch of ``password`` about as long as ``target`` nearly equals it."""
    matcher = SequenceMatcher(None, b=target)  # difflib caches what it learns of b
    for n in (len(target) - 1, len(target), len(target) + 1):
        for i in range(max(1, len(password) - n + 1)):
            matcher.set_seq1(password[i : i + n])
            if (
                matcher.quick_ratio() >= CLOSE_MATCH_RATIO  # cheap upper bound first
                and matcher.ratio() >= CLOSE_MATCH_RATIO
            ):
                return True
    return False


def _context_message(password: str, organisation: str) -> str | None:
    folded = password[:MAX_LENGTH].casefold()  # bounded work whatever the input's length
    variants = {_compact(folded), *(_compact(folded.translate(table)) for table in _UNLEET)}
    names = [c for c in map(_compact, (PRODUCT_NAME, organisation)) if len(c) >= MIN_CONTEXT_NAME]
    if any(_copies(variant, name) for variant in variants for name in names):
        return "Do not use the name of this service or of the organisation."
    return None


def _strength_message(password: str, email: str, name: str, organisation: str = "") -> str | None:
    prefix = password[:ZXCVBN_MAX_CHARS]
    inputs = [email, name, organisation, *ZXCVBN_EXTRA_INPUTS]
    with _ZXCVBN_LOCK:
        result = zxcvbn(prefix, user_inputs=inputs, max_length=ZXCVBN_MAX_CHARS)
    if result["score"] >= ZXCVBN_MIN_SCORE:
        return None
    feedback = result.get("feedback") or {}
    hint = feedback.get("warning") or next(iter(feedback.get("suggestions") or []), "")
    hint = hint.rstrip(".")
    reason = f": {hint[:1].lower()}{hint[1:]}" if hint else ""
    return (
        f"This password is too easy to guess{reason}. "
        "Try a longer passphrase of several unrelated words."
    )


def check_password(
    password: str,
    *,
    email: str = "",
    name: str = "",
    organisation: str = "",
    blocklist: Blocklist | None = None,
) -> list[str]:
    """Return the reasons ``password`` is refused; an empty list means it is acceptable.

    No composition rules (800-63B 5.1.1.2). Refused too: the product's name and
    ``organisation`` (the operator's name), close copies included. Messages say what to
    change and never echo the password, the email or the names. Raises nothing.
    """
    password = normalise(password)
    messages = _shape_messages(password)
    messages += _personal_messages(password, email, name)
    context = _context_message(password, organisation)
    if context:
        messages.append(context)
    if blocklist is not None and password in blocklist:
        messages.append("This password appears in a list of breached or common passwords.")
    if not messages:
        # Only scored once the shape is right: zxcvbn's hints would repeat the rules above.
        strength = _strength_message(password, email, name, organisation)
        if strength:
            messages.append(strength)
    return messages
