"""Pure security primitives for sign-in (NIST SP 800-63B AAL2, OWASP ASVS L2).

Leaf modules: standard library and crypto libraries only, no Flask, no database,
nothing else from ``portal``. Services call them and keep any state (the last
TOTP step used, burned recovery codes, token rows) themselves.

- ``passwords``: argon2id hashing, NFKC normalisation, the password policy, a blocklist.
- ``otp``: RFC 6238 TOTP secrets, provisioning URIs and stateless code matching.
- ``qr``: an inline SVG QR code for enrolling an authenticator app.
- ``recovery``: single-use recovery codes, stored as peppered HMAC-SHA256.
- ``tokens``: 256-bit URL tokens, stored as SHA-256 digests.
"""
