"""The credentials of an Apple School Manager / Apple Business API account, and the client assertion.

Apple's OAuth is `client_credentials` with a JWT client assertion signed by the account's EC P-256
key (research apple-api.md §1.1). The assertion is built exactly as Apple's Python sample builds it
with PyJWT: header `alg=ES256` + `kid`; claims `aud` (the **v2** token URL), `iat`, `exp` (at most
180 days after `iat`), `sub` and `iss` (both the client id, as Apple's sample and every public client
do), and a fresh `jti`. PyJWT emits the raw `r||s` signature JWS requires, not DER (§1.3).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from daemon.apple.abm_wire import CONFIG_CLIENT_ID, CONFIG_KEY_FILE, AbmAuthError

AUDIENCE: Final = "https://account.apple.com/auth/oauth2/v2/token"
"""The `aud` claim; note the v2 path even though the token POST goes to `/auth/oauth2/token` (§1.2)."""

MAX_ASSERTION_LIFETIME: Final = 180 * 86400
"""Apple: `exp` "may not exceed 180 days from the issue timestamp" (the sample uses exactly this)."""

DEFAULT_ASSERTION_LIFETIME: Final = 600.0
"""A fresh assertion is signed for every token mint, so a long-lived one buys nothing and is a
bearer secret if leaked. Short assertions (60 s to 20 min) work in production (pyaxm, asbmutil;
§1.3 [3RD-PARTY])."""

Scope = Literal["business.api", "school.api"]

_PREFIXES: Final[dict[str, Scope]] = {"BUSINESSAPI.": "business.api", "SCHOOLAPI.": "school.api"}


class AbmKeyError(AbmAuthError):
    """The configured private key cannot sign assertions: a configuration error, never retried."""

    code = "abm_key"


def scope_for(client_id: str) -> Scope:
    """The OAuth scope an account needs, read from its client id prefix (as nanoaxm and
    apple-business-go do, §1.3); a scope/host mismatch is a classic cause of `invalid_client`."""
    for prefix, scope in _PREFIXES.items():
        if client_id.startswith(prefix):
            return scope
    raise AbmAuthError(
        f"{CONFIG_CLIENT_ID}: a client id starts with BUSINESSAPI. or SCHOOLAPI. (got {client_id[:12]!r}…)"
    )


def check_private_key(pem: bytes, source: str = "the private key") -> ec.EllipticCurvePrivateKey:
    """Load the PEM and insist on an unencrypted EC P-256 key, in one line naming what is wrong.

    Apple hands out P-256 keys as PKCS#8 (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`);
    both load here (§1.3 [INFERRED]). The message never contains key material.
    """
    where = f"{CONFIG_KEY_FILE} ({source})"
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise AbmKeyError(f"{where}: the key is password-protected; export it without a password") from None
    except (ValueError, UnsupportedAlgorithm):
        raise AbmKeyError(
            f"{where}: not a PEM private key (expected the .pem Apple Business/School Manager gave you)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AbmKeyError(f"{where}: a {type(key).__name__} key, Apple's API account keys are EC P-256")
    if not isinstance(key.curve, ec.SECP256R1):
        raise AbmKeyError(f"{where}: an EC key on {key.curve.name}, ES256 needs P-256 (secp256r1)")
    return key


@dataclass(frozen=True, slots=True)
class AbmCredentials:
    """One API account: the client id, the id of the uploaded public key, and the private key.

    Construction validates the key and the client id, so a bad configuration fails at startup with a
    one-line message rather than as `invalid_client` an hour later. `repr` hides the key.
    """

    client_id: str
    key_id: str
    private_key_pem: bytes = field(repr=False)
    key_source: str = field(default="the private key", compare=False)
    """Where the key came from (a file name), for error messages only."""

    def __post_init__(self) -> None:
        scope_for(self.client_id)
        check_private_key(self.private_key_pem, self.key_source)

    @property
    def scope(self) -> Scope:
        return scope_for(self.client_id)

    @classmethod
    def from_file(cls, client_id: str, key_id: str, key_file: Path) -> AbmCredentials:
        try:
            pem = key_file.read_bytes()
        except OSError as e:
            raise AbmKeyError(f"{CONFIG_KEY_FILE}: cannot read {key_file}: {e.strerror}") from None
        return cls(client_id, key_id, pem, key_source=str(key_file))


def make_client_assertion(
    creds: AbmCredentials, now: float, lifetime: float = DEFAULT_ASSERTION_LIFETIME
) -> str:
    """The signed client assertion, as in Apple's Python sample (§1.1), valid from `now` (UNIX s)."""
    if not 0 < lifetime <= MAX_ASSERTION_LIFETIME:
        raise ValueError(f"assertion lifetime must be within (0, {MAX_ASSERTION_LIFETIME}] s")
    issued_at = int(now)
    payload = {
        "aud": AUDIENCE,
        "exp": issued_at + int(lifetime),
        "iat": issued_at,
        "sub": creds.client_id,
        "jti": str(uuid.uuid4()),
        "iss": creds.client_id,
    }
    headers = {"alg": "ES256", "kid": creds.key_id}
    return jwt.encode(payload, creds.private_key_pem, algorithm="ES256", headers=headers)
