"""Create the development Secrets with random values, once: modelguard-s3 (the services'
S3 credentials, also the dev MinIO's root credentials), modelguard-signing (a new Ed25519
private key, key ``signing-key.pem``; its public half is published as the ConfigMap
modelguard-signing-public, key ``signing-public-key.pem``) and modelguard-auth (the API
tokens file with one admin token: key ``tokens`` holds its salted hash, the only key the
services mount; key ``admin-token`` the token itself,
for the operator: ``kubectl get secret modelguard-auth -o jsonpath='{.data.admin-token}'
| base64 -d``). Mint tenant tokens with ``modelguard token create``. modelguard-keyring
holds the artifact encryption keyring (key ``keyring.json``: one random key-encryption
key for the platform). An existing Secret is left alone, so re-applying the overlay changes nothing.

Runs in the cluster as the secrets-bootstrap Job, with the Python standard library and
``cryptography`` (installed in the project's image): no credential is ever written into
the repository.
"""

import base64
import hashlib
import json
import os
import secrets
import ssl
import urllib.error
import urllib.request

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def create(
    api: str,
    namespace: str,
    token: str,
    context: ssl.SSLContext,
    name: str,
    data: dict[str, str],
    kind: str = "Secret",
) -> bool:
    """Create the object unless it exists; whether it was created."""
    body: dict[str, object] = {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "modelguard"}},
    }
    if kind == "Secret":
        body.update(type="Opaque", stringData=data)
    else:
        body["data"] = data
    request = urllib.request.Request(
        f"{api}/api/v1/namespaces/{namespace}/{kind.lower()}s",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(request, context=context, timeout=30).close()
        print(f"created {kind.lower()} {name}")
        return True
    except urllib.error.HTTPError as err:
        if err.code != 409:  # 409 Conflict: it exists already
            raise
        print(f"{kind.lower()} {name} exists; left as it is")
        return False


def signing_key_pair() -> tuple[str, str]:
    """A new Ed25519 key: (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM), as
    `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private.decode(), public.decode()


def admin_tokens() -> dict[str, str]:
    """The same format as modelguard.auth.mint_token (this Job has the standard library only)."""
    key_id = secrets.token_hex(6)
    token = f"mg1.{key_id}.{secrets.token_urlsafe(32)}"
    salt = secrets.token_bytes(16)
    digest = hashlib.sha256(salt + token.encode()).hexdigest()
    line = f"admin admin sha256${key_id}${base64.b64encode(salt).decode()}${digest}"
    return {"tokens": line + "\n", "admin-token": token}


def keyring() -> dict[str, str]:
    """The keyring file of modelguard.store.encryption: one 32-byte key, active."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    document = {"tenants": {"platform": {"active": "platform-1", "keys": {"platform-1": key}}}}
    return {"keyring.json": json.dumps(document, indent=2) + "\n"}


def main() -> None:
    with open(f"{ACCOUNT}/namespace") as f:
        namespace = f.read().strip()
    with open(f"{ACCOUNT}/token") as f:
        token = f.read().strip()
    context = ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt")
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    host = f"[{host}]" if ":" in host else host
    api = f"https://{host}:{os.environ['KUBERNETES_SERVICE_PORT']}"
    create(
        api,
        namespace,
        token,
        context,
        "modelguard-s3",
        {"access-key": "modelguard", "secret-key": secrets.token_urlsafe(32)},
    )
    private_pem, public_pem = signing_key_pair()
    signing = {"signing-key.pem": private_pem}
    if create(api, namespace, token, context, "modelguard-signing", signing):
        # published only with the key it belongs to: an existing Secret keeps its own key,
        # whose public half `modelguard public-key` reads from the services
        public = {"signing-public-key.pem": public_pem}
        create(
            api, namespace, token, context, "modelguard-signing-public", public, kind="ConfigMap"
        )
    create(api, namespace, token, context, "modelguard-auth", admin_tokens())
    create(api, namespace, token, context, "modelguard-keyring", keyring())


if __name__ == "__main__":
    main()
