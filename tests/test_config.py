"""Config files: the shipped examples load; bad files give one clear line per problem and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config, read_secret

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[station]
id = "bench-1"

[[hubs]]
id = "hub-a"
kind = "sim"

[sim]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "station.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["demo.toml", "station.example.toml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(ROOT / "config" / name)
    assert config.hubs
    assert config.storage.path.is_absolute()


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.station.id == "bench-1"
    assert config.workflow.steps == ("update", "erase", "enroll", "assign", "setup")
    assert config.workflow.policy_for("update").concurrency is None  # capped per controller instead
    assert config.scheduler.restores_per_controller == 10
    assert config.storage.path == tmp_path / "benchhub.sqlite3"
    assert config.mqtt.embedded


def test_policy_override_keeps_other_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "\n[workflow.policy.update]\ntimeout = 10\n"))
    update = config.workflow.policy_for("update")
    assert (update.timeout, update.retries, update.backoff) == (10, 1, 30)


BAD = [
    (
        "[station]\nid = 'Bench 1'\n[[hubs]]\nid='a'\nkind='sim'\n[sim]\n",
        "station.id: must use only lowercase",
    ),
    (
        MINIMAL.replace('kind = "sim"', 'kind = "ykush"'),
        "hubs[0].kind: unknown hub kind 'ykush'; expected one of: sim, cambrionix",
    ),
    (
        MINIMAL.replace('kind = "sim"', 'kind = "cambrionix"\nserial_port = "/dev/ttyUSB0"'),
        "hubs[0]: ports is required with serial_port",
    ),
    (
        MINIMAL.replace(
            'kind = "sim"', 'kind = "cambrionix"\nserial_port = "/dev/ttyUSB0"\nsimulate = "PP15S"'
        ),
        "hubs[0]: give exactly one of serial_port",
    ),
    (
        MINIMAL.replace('kind = "sim"', 'kind = "cambrionix"\nsimulate = "PP99"'),
        "hubs[0].simulate: Input should be",
    ),
    (MINIMAL.replace('kind = "sim"', 'kind = "datamation"\nports = 10'), "hubs[0].usb_path: is required"),
    (MINIMAL + "\n[hubs.leds]\ndone = 'rainbow'\n", "hubs[0].leds.done: Input should be"),
    (MINIMAL.replace('kind = "sim"', 'kind = "sim"\nports = 0'), "hubs[0].ports: Input should be greater"),
    (MINIMAL + "\n[workflow]\nminimum_ios = 'seventeen'\n", "workflow.minimum_ios: must be an iOS version"),
    (
        MINIMAL + "\n[workflow]\nsteps = ['erase', 'update']\n",
        "workflow.steps: steps must keep the workflow order",
    ),
    (MINIMAL + "\n[workflow.policy.flash]\ntimeout = 1\n", "workflow.policy: unknown step 'flash'"),
    (MINIMAL + "\n[mqtt]\nurl = 'http://broker'\n", "mqtt.url: must be 'embedded' or look like mqtt://"),
    (MINIMAL + "\n[mqtt]\nurl = 'mqtt://u:p@broker'\n", "mqtt.url: must not carry credentials"),
    (MINIMAL + "\n[mqtt]\npasword_file = 'x'\n", "mqtt.pasword_file: is not a known setting"),
    (MINIMAL.replace("[sim]\n", ""), "(file): simulated hubs need a [sim] table"),
    ("[station]\nid = 'x'\n", "hubs: is required"),
    ("[station\nid=1", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_bad_config_names_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert any(expected in line for line in caught.value.lines), caught.value.lines
    for line in caught.value.lines:
        assert "\n" not in line
        assert line.startswith(str(tmp_path / "station.toml"))


def test_every_problem_is_reported(tmp_path: Path) -> None:
    text = "[station]\nid = 'BAD'\n[[hubs]]\nid = 'a'\nkind = 'sim'\nports = 99\n[sim]\nspeed = -1\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    keys = [line.split(": ")[1] for line in caught.value.lines]
    assert keys == ["station.id", "hubs[0].ports", "sim.speed"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_cli_exits_2_with_one_line_per_problem_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('kind = "sim"', 'kind = "usb3000"') + "\n[mqtt]\nkeepalive = 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert "hubs[0].kind: unknown hub kind 'usb3000'; expected one of: sim" in lines[0]
    assert "mqtt.keepalive" in lines[1]
    assert "Traceback" not in proc.stderr


def test_secret_from_file_and_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_secret(tmp_path / "pw") == "s3cret"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret(Path("credential:pw")) == "s3cret"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        read_secret(Path("credential:pw"))


def test_firmware_ipsw_dir_is_resolved_against_the_config_file(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL)).firmware.ipsw_dir is None
    config = load_config(write(tmp_path, MINIMAL + "\n[firmware]\nipsw_dir = 'ipsw'\n"))
    assert config.firmware.ipsw_dir == tmp_path / "ipsw"
    absolute = load_config(write(tmp_path, MINIMAL + "\n[firmware]\nipsw_dir = '/srv/ipsw'\n"))
    assert absolute.firmware.ipsw_dir == Path("/srv/ipsw")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("[firmware]\nipsw_dir = 5\n", "firmware.ipsw_dir: must be a path, as a string (got 5)"),
        (
            "[firmware]\nipsw_directory = 'x'\n",
            "firmware.ipsw_directory: is not a known setting (check the spelling)",
        ),
    ],
)
def test_bad_firmware_table_names_the_key(tmp_path: Path, table: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL + "\n" + table))
    assert len(caught.value.lines) == 1, caught.value.lines
    assert caught.value.lines[0] == f"{tmp_path / 'station.toml'}: {expected}"


REAL = """
[station]
id = "bench-1"

[[hubs]]
id = "hub-a"
kind = "cambrionix"
serial_port = "/dev/ttyUSB0"
ports = 15
"""


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", "apple.client_id: the enroll step watches devices arrive in Apple Business Manager"),
        (
            '[workflow]\nsteps = ["erase", "assign", "setup"]\n',
            "apple.client_id: the assign step needs the Apple Business API (or apple.dep_token_file)",
        ),
        (
            '[workflow]\nsteps = ["erase", "assign", "setup"]\n[apple]\nclient_id = "BUSINESSAPI.1"\n'
            'key_id = "k"\nprivate_key_file = "key.pem"\n',
            "workflow.mdm_server: name the MDM server devices must be assigned to",
        ),
        (
            '[workflow]\nsteps = ["erase", "setup"]\nmdm_server = "A"\n[apple]\nauto_assign = "B"\n',
            "apple.auto_assign: names 'B' but workflow.mdm_server names 'A'",
        ),
        ('[workflow]\nsteps = ["update", "erase", "setup"]\n', "firmware.ipsw_dir: the update step needs"),
    ],
)
def test_a_real_bench_says_what_it_still_lacks(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, REAL + extra))
    assert len(caught.value.lines) == 1
    assert expected in caught.value.lines[0]


def test_a_real_bench_for_abm_devices_loads_with_pair_records_next_to_the_database(tmp_path: Path) -> None:
    text = REAL + '[workflow]\nsteps = ["erase", "setup"]\n[storage]\npath = "state/bench.sqlite3"\n'
    config = load_config(write(tmp_path, text))
    assert config.devices.pair_records == tmp_path / "state" / "pair-records"
    assert config.devices.usbmuxd is None
