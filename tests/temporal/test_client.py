"""Temporal connection settings: plain, TLS, mTLS files, API key; clear errors for half a pair."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from drctl.settings import DrctlSettings
from drctl.temporal.client import TemporalSettingsError, tls_config


def test_plain_by_default_and_tls_with_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tls_config(DrctlSettings()) is False
    monkeypatch.setenv("DRCTL_TEMPORAL_API_KEY", "secret")
    settings = DrctlSettings()
    assert tls_config(settings) is True
    assert "secret" not in repr(settings)


def test_mtls_files_are_read(tmp_path: Path) -> None:
    cert, key, ca = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    for path in (cert, key, ca):
        path.write_bytes(path.name.encode())
    config = tls_config(DrctlSettings(temporal_tls_cert=cert, temporal_tls_key=key, temporal_tls_ca=ca))
    assert isinstance(config, TLSConfig)
    assert (config.client_cert, config.client_private_key, config.server_root_ca_cert) == (
        b"c.pem",
        b"k.pem",
        b"ca.pem",
    )


def test_half_a_key_pair_or_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TemporalSettingsError, match="go together"):
        tls_config(DrctlSettings(temporal_tls_cert=tmp_path / "c.pem"))
    with pytest.raises(TemporalSettingsError, match="cannot read"):
        tls_config(DrctlSettings(temporal_tls_ca=tmp_path / "missing.pem"))
