"""The launch's checks of its inputs (pipeline/launch/inputs.py): the MLflow server asked as MLflow asks it."""

import datetime
import http.server
import ssl
import threading

import pytest

from pipeline.core import base
from pipeline.core.base import ConfigError, mask_credentials, network_file_system
from pipeline.core.options import TrainConfig
from pipeline.launch.inputs import check_trackers


def certificate_authority(tmp_path):
    """A hospital's own CA (ca.pem) and the server certificate it signed for 127.0.0.1 (server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, key, issuer, issuer_key, extensions):
        builder = x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        builder = builder.serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        builder = builder.not_valid_after(now + datetime.timedelta(days=1))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Hospital Root CA")])
    ca = certificate(ca_name, ca_key, ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    import ipaddress

    server = certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlflow.hospital")]),
        server_key,
        ca_name,
        ca_key,
        [(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)],
    )
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.key").write_bytes(
        server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "ca.pem"


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture()
def https_server(tmp_path):
    """A loopback HTTPS server answering /health, its certificate signed by a CA of its own: (URL, CA file)."""
    ca = certificate_authority(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", str(ca)
    server.shutdown()
    server.server_close()


def test_an_mlflow_server_behind_a_hospital_ca_is_checked_with_the_certificate_settings_mlflow_reads(https_server, monkeypatch):
    """Refused without its CA (saying which variable to set), accepted with MLFLOW_TRACKING_SERVER_CERT_PATH,
    REQUESTS_CA_BUNDLE or MLFLOW_TRACKING_INSECURE_TLS, as MLflow's own client would be; no message shows a password."""
    url, ca = https_server
    cfg = TrainConfig(report_to="mlflow")
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS"):
        monkeypatch.delenv(name, raising=False)
    with_password = url.replace("https://", "https://nurse:p@ss$word1@")
    with pytest.raises(ConfigError) as e:
        check_trackers(cfg, {"MLFLOW_TRACKING_URI": with_password})
    message = str(e.value)
    assert f"MLFLOW_TRACKING_URI={url.replace('https://', 'https://***@')} does not answer" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message and "set MLFLOW_TRACKING_SERVER_CERT_PATH" in message
    assert "p@ss" not in message and "nurse" not in message
    check_trackers(cfg, {"MLFLOW_TRACKING_URI": with_password, "MLFLOW_TRACKING_SERVER_CERT_PATH": ca})
    from urllib3.exceptions import InsecureRequestWarning

    with pytest.warns(InsecureRequestWarning):  # verification really off, as MLflow turns it off
        check_trackers(cfg, {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_INSECURE_TLS": "true"})
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca)  # read by requests itself, from the process environment
    check_trackers(cfg, {"MLFLOW_TRACKING_URI": url})
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_SERVER_CERT_PATH=/no/ca.pem: file not found"):
        check_trackers(cfg, {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_SERVER_CERT_PATH": "/no/ca.pem"})
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH are both set"):
        check_trackers(
            cfg, {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_SERVER_CERT_PATH": ca, "MLFLOW_TRACKING_INSECURE_TLS": "true"}
        )


def test_credentials_are_masked_in_any_uri_of_a_message():
    assert (
        mask_credentials("API request to https://u:p@ss@host:5000/api failed")
        == "API request to https://***@host:5000/api failed"
    )
    assert mask_credentials("http://token@h/x and sqlite:////runs/mlflow.db") == "http://***@h/x and sqlite:////runs/mlflow.db"


def test_a_sqlite_store_on_a_network_file_system_gets_one_warning(tmp_path, capsys, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\nfiler:/team /shared nfs4 rw,vers=4.2 0 0\n/dev/sdb1 /shared/local ext4 rw 0 0\n"
        "filer:/x /mnt/my\\040runs nfs rw 0 0\n",
        encoding="utf-8",
    )
    assert network_file_system("/shared/team/runs/mlflow.db", str(mounts)) == "nfs4"
    assert network_file_system("/shared/local/mlflow.db", str(mounts)) == ""  # a local disk mounted below it
    assert network_file_system("/mnt/my runs/mlflow.db", str(mounts)) == "nfs"
    assert network_file_system("/home/me/mlflow.db", str(mounts)) == ""
    assert network_file_system("/shared/x", str(tmp_path / "no-such-file")) == ""
    # The launch's check reads the mount table: a SQLite store there gets one line saying what is safe.
    monkeypatch.setattr(base, "MOUNTS", str(mounts))
    check_trackers(TrainConfig(report_to="mlflow", output_dir="/shared/team/runs"), {})
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(
        "launch: warning: --report-to mlflow: the MLflow store sqlite:////shared/team/runs/mlflow.db is a SQLite file "
        "on a network file system (nfs4)"
    )
    assert "run one MLflow server per team" in line
    check_trackers(TrainConfig(report_to="mlflow", output_dir="/shared/local/runs"), {})
    check_trackers(TrainConfig(report_to="tensorboard", output_dir="/shared/team/runs"), {})  # no MLflow: no word
    assert capsys.readouterr().out == ""
