"""Create the development Secrets with random values, once: modelguard-s3 (the services'
S3 credentials, also the dev MinIO's root credentials) and modelguard-signing (the HMAC
key). An existing Secret is left alone, so re-applying the overlay changes nothing.

Runs in the cluster as the secrets-bootstrap Job, with the Python standard library only:
no credential is ever written into the repository.
"""

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


if __name__ == "__main__":
    main()
