"""Create the development Secrets with random values, once: modelguard-s3 (the services'
S3 credentials, also the dev MinIO's root credentials), modelguard-signing (the HMAC
key) and modelguard-auth (the API tokens file with one admin token: key ``tokens`` holds
its salted hash, the only key the services mount; key ``admin-token`` the token itself,
for the operator: ``kubectl get secret modelguard-auth -o jsonpath='{.data.admin-token}'
| base64 -d``). Mint tenant tokens with ``modelguard token create``. modelguard-keyring
holds the artifact encryption keyring (key ``keyring.json``: one random key-encryption
key for the platform). An existing Secret is left alone, so re-applying the overlay changes nothing.

Runs in the cluster as the secrets-bootstrap Job, with the Python standard library only:
no credential is ever written into the repository.
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
    api: str, namespace: str, token: str, context: ssl.SSLContext, name: str, data: dict[str, str]
) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "modelguard"}},
        "type": "Opaque",
        "stringData": data,
    }
    request = urllib.request.Request(
        f"{api}/api/v1/namespaces/{namespace}/secrets",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(request, context=context, timeout=30).close()
        print(f"created secret {name}")
    except urllib.error.HTTPError as err:
        if err.code != 409:  # 409 Conflict: it exists already
            raise
        print(f"secret {name} exists; left as it is")


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
    create(
        api,
        namespace,
        token,
        context,
        "modelguard-signing",
        {"signing-key": secrets.token_urlsafe(48)},
    )
    create(api, namespace, token, context, "modelguard-auth", admin_tokens())
    create(api, namespace, token, context, "modelguard-keyring", keyring())


if __name__ == "__main__":
    main()
