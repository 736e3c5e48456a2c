"""`edgefed certs`: CA, node certificates, tokens and keys from the command line, with clear errors."""

from __future__ import annotations

import json

import pytest

from coordinator.security import SecretStore
from edge_node import tls
from edgefed.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_init_then_node_gives_a_loadable_tls_dir(tmp_path, capsys):
    d = tmp_path / "tls"
    rc, out, err = _run(capsys, "certs", "init", "--tls-dir", str(d), "--host", "10.0.0.5", "--host", "coord.lan")
    assert rc == 0 and "created CA" in err and "coordinator.pem" in out
    bundle = tls.load_bundle(d, "coordinator.pem", "coordinator.key")
    assert bundle.name == tls.COORDINATOR_NAME
    from cryptography import x509

    sans = x509.load_pem_x509_certificate(bundle.cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"10.0.0.5"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"coord.lan", tls.COORDINATOR_NAME}

    rc, out, err = _run(capsys, "certs", "node", "pi-1", "--tls-dir", str(d), "--out", str(tmp_path / "pi"),
                        "--days", "30")
    assert rc == 0 and "copy" in err
    assert tls.load_bundle(tmp_path / "pi").name == "pi-1"


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    d = tmp_path / "tls"
    rc, _, err = _run(capsys, "certs", "node", "pi-1", "--tls-dir", str(d))
    assert rc == 2 and "no CA here" in err and "Traceback" not in err
    assert _run(capsys, "certs", "init", "--tls-dir", str(d))[0] == 0
    rc, _, err = _run(capsys, "certs", "init", "--tls-dir", str(d))
    assert rc == 2 and "already exists" in err and "--force" in err
    rc, _, err = _run(capsys, "certs", "node", "Bad_Name", "--tls-dir", str(d))
    assert rc == 2 and "node name 'Bad_Name' is not valid" in err
    with pytest.raises(SystemExit):
        main(["certs", "node", "pi-1", "--tls-dir", str(d), "--days", "-1"])
    assert "expected a positive number" in capsys.readouterr().err


def test_tokens_and_keys_are_minted_listed_and_revoked(tmp_path, capsys):
    state = str(tmp_path / "state")
    rc, token, err = _run(capsys, "certs", "token", "--state", state, "--uses", "2", "--label", "rack")
    token = token.strip()
    assert rc == 0 and "shown once" in err
    rc, out, _ = _run(capsys, "certs", "api-key", "--state", state, "--admin", "--json")
    admin = json.loads(out)
    assert admin["kind"] == "admin" and "hash" not in admin and admin["expires"] is None
    rc, user, _ = _run(capsys, "certs", "api-key", "--state", state)
    store = SecretStore(state)
    rec = store.check(token, ("enroll",))
    assert rec.uses_left == 2 and rec.label == "rack" and rec.expires - rec.created == pytest.approx(24 * 3600)
    assert store.check(admin["secret"], ("admin",)) is not None
    assert store.check(user.strip(), ("api",)) is not None

    rc, out, _ = _run(capsys, "certs", "list", "--state", state, "--json")
    listed = json.loads(out)["secrets"]
    assert sorted(r["kind"] for r in listed) == ["admin", "api", "enroll"]
    assert token not in out and admin["secret"] not in out
    assert _run(capsys, "certs", "revoke", rec.id, "--state", state)[0] == 0
    assert store.check(token, ("enroll",)) is None
    rc, _, err = _run(capsys, "certs", "revoke", "nope", "--state", state)
    assert rc == 2 and "no token or key with id 'nope'" in err


def test_revoke_node_and_show(tmp_path, capsys):
    d, state = tmp_path / "tls", str(tmp_path / "state")
    assert _run(capsys, "certs", "init", "--tls-dir", str(d))[0] == 0
    assert _run(capsys, "certs", "node", "pi-2", "--tls-dir", str(d))[0] == 0
    rc, out, _ = _run(capsys, "certs", "show", str(d / "nodes" / "pi-2"), "--json")
    info = json.loads(out)
    assert rc == 0 and info["name"] == "pi-2" and info["subject_alt_names"] == ["pi-2"]
    assert info["issuer"] == "CN=edgefed fleet CA,O=edgefed" and len(info["sha256"]) == 64
    rc, out, _ = _run(capsys, "certs", "show", str(d))
    assert "name: edgefed-coordinator" in out and "127.0.0.1, localhost, edgefed-coordinator" in out

    rc, _, err = _run(capsys, "certs", "revoke-node", "pi-2", "--state", state)
    assert rc == 0 and "--force" in err
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((d / "nodes" / "pi-2" / "node.pem").read_bytes())
    assert SecretStore(state).certificate_revoked(cert)
    rc, out, _ = _run(capsys, "certs", "list", "--state", state)
    assert "node pi-2: certificates issued until" in out
    rc, _, err = _run(capsys, "certs", "show", str(tmp_path / "none.pem"))
    assert rc == 2 and "none.pem: not found" in err
