from pathlib import Path

import pytest

from gpuschedd.config import Config, ConfigError, host_ram_bytes, parse_size

REPO = Path(__file__).resolve().parents[2]


def test_sizes() -> None:
    assert parse_size("512") == 512
    assert parse_size("64G") == 64 << 30
    assert parse_size("1.5T") == int(1.5 * (1 << 40))
    assert parse_size("100MiB") == 100 << 20
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_defaults_when_missing(tmp_path: Path) -> None:
    cfg = Config.load(str(tmp_path / "absent.conf"))
    assert cfg.ram_budget_bytes == host_ram_bytes() // 2
    assert (cfg.checkpoint_backend, cfg.unit_backend, cfg.lock_timeout_ms) == ("auto", "auto", 10_000)


def test_shipped_default_config_parses() -> None:
    shipped = REPO / "conf" / "gpuschedd.conf"
    if not shipped.exists():
        pytest.skip("conf/gpuschedd.conf not written yet")
    assert Config.load(str(shipped)).ram_budget_bytes == host_ram_bytes() // 2


def test_settings_and_errors(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text("[Daemon]\nRamBudget=64G\nLockTimeoutSec=2.5\nCheckpointBackend=cli\nUnitBackend=cgroupfs\n")
    cfg = Config.load(str(conf))
    assert (cfg.ram_budget_bytes, cfg.lock_timeout_ms) == (64 << 30, 2500)
    assert (cfg.checkpoint_backend, cfg.unit_backend) == ("cli", "cgroupfs")
    conf.write_text("[Daemon]\nRamBudjet=1G\n")
    with pytest.raises(ConfigError, match="RamBudjet"):
        Config.load(str(conf))
    conf.write_text("[Daemon]\nCheckpointBackend=magic\n")
    with pytest.raises(ConfigError, match="magic"):
        Config.load(str(conf))


def test_per_user_limits_and_ended_ttl(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    cfg = Config.load(str(conf))
    assert (cfg.max_models_per_user, cfg.max_command_bytes_per_user, cfg.ended_model_ttl_sec) == (64, 1 << 20, 3600)
    conf.write_text("[Daemon]\nMaxModelsPerUser=0\nMaxCommandBytesPerUser=64K\nEndedModelTTLSec=5\n")
    cfg = Config.load(str(conf))
    assert (cfg.max_models_per_user, cfg.max_command_bytes_per_user, cfg.ended_model_ttl_sec) == (0, 64 << 10, 5)
    for bad in ("MaxModelsPerUser=-1", "MaxCommandBytesPerUser=lots", "EndedModelTTLSec=1h"):
        conf.write_text(f"[Daemon]\n{bad}\n")
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            Config.load(str(conf))
