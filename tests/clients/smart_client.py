"""A small SMART Backend Services client: makes a key pair and gets access tokens.

Needs only the `cryptography` package (`pip install cryptography`).

    # 1. A key pair: the private key stays with you, the JWK Set goes to the server.
    python3 smart_client.py keygen --kid my-key-1 --key client.pem --jwks client.jwks.json
    bulk-export clients add --id my-client --jwks client.jwks.json --scope 'system/*.read'

    # 2. An access token (valid 5 minutes) from the server's token endpoint.
    python3 smart_client.py token --token-url http://127.0.0.1:8080/auth/token \\
        --client-id my-client --key client.pem --kid my-key-1 --scope 'system/*.read'

The client assertion is an ES384 JWT: iss = sub = the client id, aud = the token URL, a random
jti, and an exp four minutes ahead (SMART allows at most five).
"""

import argparse
import base64
import hashlib
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def keygen(args):
    key = ec.generate_private_key(ec.SECP384R1())
    with open(args.key, "wb") as f:
        f.write(key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
    numbers = key.public_key().public_numbers()
    x, y = b64url(numbers.x.to_bytes(48, "big")), b64url(numbers.y.to_bytes(48, "big"))
    # Without --kid, the key's RFC 7638 thumbprint, which is what most JWT libraries use.
    thumbprint = b64url(hashlib.sha256(
        f'{{"crv":"P-384","kty":"EC","x":"{x}","y":"{y}"}}'.encode()).digest())
    jwk = {"kty": "EC", "crv": "P-384", "alg": "ES384", "use": "sig",
           "kid": args.kid or thumbprint, "x": x, "y": y}
    with open(args.jwks, "w") as f:
        json.dump({"keys": [jwk]}, f)
    print(f"private key: {args.key}; public JWK Set (register this): {args.jwks}; kid: {jwk['kid']}")


def assertion(client_id: str, token_url: str, key_file: str, kid: str) -> str:
    with open(key_file, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    header = {"alg": "ES384", "typ": "JWT", "kid": kid}
    claims = {"iss": client_id, "sub": client_id, "aud": token_url,
              "exp": int(time.time()) + 240, "jti": str(uuid.uuid4())}
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64url(r.to_bytes(48, 'big') + s.to_bytes(48, 'big'))}"


def token(args):
    body = urllib.parse.urlencode({
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion(args.client_id, args.token_url, args.key, args.kid),
        "scope": args.scope,
    }).encode()
    request = urllib.request.Request(
        args.token_url, data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as e:
        sys.exit(f"token request refused ({e.code}): {e.read().decode()}")
    if args.json:
        print(json.dumps(answer))
    else:
        print(answer["access_token"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    k = commands.add_parser("keygen", help="make an ES384 key pair and its public JWK Set")
    k.add_argument("--kid", help="the key id (default: the key's RFC 7638 thumbprint)")
    k.add_argument("--key", required=True, help="where to write the private key (PEM)")
    k.add_argument("--jwks", required=True, help="where to write the public JWK Set")
    k.set_defaults(run=keygen)
    t = commands.add_parser("token", help="sign an assertion and get an access token")
    t.add_argument("--token-url", required=True)
    t.add_argument("--client-id", required=True)
    t.add_argument("--key", required=True)
    t.add_argument("--kid", required=True)
    t.add_argument("--scope", default="system/*.read")
    t.add_argument("--json", action="store_true", help="print the whole token response")
    t.set_defaults(run=token)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
