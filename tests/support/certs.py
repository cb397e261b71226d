"""Throwaway TLS material made at test time: a CA, a server certificate for 127.0.0.1 and
localhost, and a client certificate, all signed by that CA and valid for a day.

Made with the `openssl` command line (the venv has no `cryptography`), so nothing secret is
ever committed. P-256 keys, because they are made in milliseconds.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The extensions each certificate gets, given explicitly so the system's openssl.cnf does not matter.
_EXTENSIONS = {
    "ca": "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    "server": "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
    "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    "client": "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n",
}


@dataclass(frozen=True)
class Certs:
    """PEM files: the CA's certificate, and each party's certificate and private key."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def make_certs(folder: Path) -> Certs:
    """Write a fresh CA, server and client certificate (with their keys) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _certificate(folder, "ca", "plinth-test-ca", signer=None)
    server_cert, server_key = _certificate(folder, "server", "localhost", signer=(ca_cert, ca_key))
    client_cert, client_key = _certificate(folder, "client", "plinth-test-client", signer=(ca_cert, ca_key))
    return Certs(ca_cert, server_cert, server_key, client_cert, client_key)


def _certificate(folder: Path, name: str, common_name: str, signer: tuple[Path, Path] | None) -> tuple[Path, Path]:
    """A new key and certificate `name`.pem/.key, signed by `signer` (cert, key) or by itself."""
    key, request, cert, extensions = (folder / f"{name}.{ext}" for ext in ("key", "csr", "pem", "ext"))
    extensions.write_text(_EXTENSIONS[name])
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        request,
        "-subj",
        f"/CN={common_name}",
    )
    signing = ["-signkey", key] if signer is None else ["-CA", signer[0], "-CAkey", signer[1]]
    serial = str(len(list(folder.glob("*.pem"))) + 1)
    _openssl(
        "x509",
        "-req",
        "-in",
        request,
        *signing,
        "-set_serial",
        serial,
        "-days",
        "1",
        "-extfile",
        extensions,
        "-out",
        cert,
    )
    return cert, key


def _openssl(*args: object) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")
