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


def test_what_callers_without_manage_may_ask(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text("[Daemon]\n")
    cfg = Config.load(str(conf))
    assert (cfg.max_user_priority, cfg.unprivileged_port_start) == (0, 1024)
    assert not cfg.wake_allow_ports and not cfg.wake_allow_addresses
    conf.write_text(
        "[Daemon]\nMaxUserPriority=10\nUnprivilegedPortStart=2048\nWakeAllowPorts=80 8000-8002\n"
        "WakeAllowAddresses=0.0.0.0 0:0::0\n"
    )
    cfg = Config.load(str(conf))
    assert (cfg.max_user_priority, cfg.unprivileged_port_start) == (10, 2048)
    assert cfg.wake_allow_ports == {80, 8000, 8001, 8002} and cfg.wake_allow_addresses == {"0.0.0.0", "::"}
    for bad in (
        "WakeAllowPorts=0",
        "WakeAllowPorts=http",
        "WakeAllowPorts=9-8",
        "WakeAllowAddresses=any",
        "MaxUserPriority=x",
    ):
        conf.write_text(f"[Daemon]\n{bad}\n")
        with pytest.raises(ConfigError):
            Config.load(str(conf))


def test_repeated_key_last_wins(tmp_path: Path) -> None:
    """As in systemd's files: a key or a section given twice is no error, the last value counts."""
    conf = tmp_path / "c.conf"
    conf.write_text("[Daemon]\nRamBudget=1G\nRamBudget=2G\n[Daemon]\nLockTimeoutSec=3\nLockTimeoutSec=4\n")
    cfg = Config.load(str(conf))
    assert (cfg.ram_budget_bytes, cfg.lock_timeout_ms) == (2 << 30, 4000)


def test_dropins_in_lexical_order(tmp_path: Path) -> None:
    """gpuschedd.conf.d/*.conf are read after the main file, in lexical order of their names; other files there are
    ignored, and a drop-in's unknown key is refused like the main file's, naming the drop-ins."""
    conf = tmp_path / "gpuschedd.conf"
    conf.write_text("[Daemon]\nRamBudget=1G\nLockTimeoutSec=1\nCheckpointBackend=cli\n")
    dropins = tmp_path / "gpuschedd.conf.d"
    dropins.mkdir()
    (dropins / "50-ram.conf").write_text("[Daemon]\nRamBudget=8G\nLockTimeoutSec=5\n")
    (dropins / "10-early.conf").write_text("[Daemon]\nRamBudget=4G\nUnitBackend=cgroupfs\n")
    (dropins / "90-late.conf").write_text("[Daemon]\nLockTimeoutSec=9\n")
    (dropins / "99-ignored.conf.bak").write_text("[Daemon]\nRamBudget=16G\n")
    cfg = Config.load(str(conf))
    assert (cfg.ram_budget_bytes, cfg.lock_timeout_ms) == (8 << 30, 9000)
    assert (cfg.checkpoint_backend, cfg.unit_backend) == ("cli", "cgroupfs")
    # without the main file, the drop-ins still count
    conf.unlink()
    assert Config.load(str(conf)).ram_budget_bytes == 8 << 30
    (dropins / "60-typo.conf").write_text("[Daemon]\nRamBudjet=1G\n")
    with pytest.raises(ConfigError, match=r"60-typo\.conf.*RamBudjet"):
        Config.load(str(conf))


def test_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text("RamBudget=1G\n")  # no section header
    with pytest.raises(ConfigError, match=r"c\.conf"):
        Config.load(str(conf))
