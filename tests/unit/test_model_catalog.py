"""The model catalog: its files read by options.py's declarations (every option type, bad lines, /etc masking
/usr/lib), and its models in the engine (listed stopped, Start, reload, Preload, their end, restart, limits). The
journal catalog (catalog/gpuschedd.catalog) is test_catalog.py's."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from engine_kit import Recorder, make_engine
from fake_units import FakeUnits

from gpuschedd import catalog
from gpuschedd.config import Config
from gpuschedd.engine import DAEMON, Engine, Requester
from gpuschedd.errors import InvalidState, ModelExists, NoSuchModel, UnitFailed
from gpuschedd.events import EventKind
from gpuschedd.model import State
from gpuschedd.options import RunOptions, declared
from gpuschedd.statefile import StateFile

ME = pwd.getpwuid(os.getuid()).pw_name
UID = os.getuid()


def parse(text: str, name: str = "llama") -> catalog.Entry:
    return catalog.parse(name, f"/etc/gpusched/models.d/{name}.conf", text)


def refusal(text: str) -> catalog.CatalogError:
    with pytest.raises(catalog.CatalogError) as caught:
        parse(text)
    return caught.value


def test_every_option_of_run_is_a_key_of_the_file() -> None:
    entry = parse(
        f"""# a comment
; another
[Model]
Command=/usr/bin/python3 "/srv/my models/serve.py" --port 9001 \\
        --flag
User={ME}
Description=Llama 3 8B
WorkingDirectory=/srv
Environment=A=1 "B=two words"
Environment=C=3
Gpus=0 GPU-1234abcd
GpuMemory=8G
Priority=-5
IdleFreezeSec=300
FrozenTTLSec=3600
Agent=yes
KeepContext=true
InjectAgent=no
Port=8001
BackendPort=9001
ListenAddress=::1
Aliases=llama3 llama-8b llama3
Preload=on
"""
    )
    assert entry.argv == ["/usr/bin/python3", "/srv/my models/serve.py", "--port", "9001", "--flag"]
    assert (entry.user, entry.uid) == (ME, UID)
    assert entry.options == RunOptions(
        priority=-5,
        idle_freeze_sec=300,
        frozen_ttl_sec=3600,
        description="Llama 3 8B",
        working_directory="/srv",
        environment=["A=1", "B=two words", "C=3"],
        gpus=["0", "GPU-1234abcd"],
        user=ME,
        port=8001,
        backend_port=9001,
        listen_address="[::1]",
        gpu_memory=8 << 30,
        agent=True,
        keep_context=True,
        inject_agent=False,
    )
    assert entry.aliases == ["llama3", "llama-8b"] and entry.preload
    # one table: every Run option is a key the file knows
    keys = {spec.key for _f, spec in declared(RunOptions)}
    assert keys <= {key for _n, _s, key, _v in catalog.assignments("[Model]\n" + "".join(f"{k}=\n" for k in keys))}


def test_a_key_given_again_keeps_the_last_value_and_an_empty_list_assignment_empties_it() -> None:
    entry = parse(f"[Model]\nCommand=a\nCommand=b c\nUser={ME}\nEnvironment=A=1\nEnvironment=\nEnvironment=B=2\n")
    assert entry.argv == ["b", "c"] and entry.options.environment == ["B=2"]


def test_defaults_and_the_digest_follow_the_definition() -> None:
    one = parse(f"[Model]\nCommand=sleep 1\nUser={ME}\n")
    assert one.options == RunOptions(user=ME) and not one.preload and one.aliases == []
    assert one.digest == parse(f"[Model]\nUser={ME}\n# moved\nCommand=sleep  1\n").digest
    assert one.digest != parse(f"[Model]\nCommand=sleep 2\nUser={ME}\n").digest


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("[Model]\nCommand=x\n", 0, "Command= and User= are required"),
        (f"[Model]\nUser={ME}\n", 0, "Command= and User= are required"),
        ("Command=x\n", 1, "before any section"),
        ("[Service]\nCommand=x\n", 2, "unknown section"),
        (f"[Model]\nUser={ME}\nCommand=x\nExecStart=y\n", 4, "unknown key"),
        (f"[Model]\nUser={ME}\njust words\n", 3, "not KEY=VALUE"),
        (f"[Model]\nUser={ME}\nCommand='unclosed\n", 3, "cannot split"),
        (f"[Model]\nUser={ME}\nCommand=\n", 3, "argv must not be empty"),
        (f"[Model]\nUser={ME}\nCommand=./serve\n", 3, "absolute path"),
        ("[Model]\nCommand=x\nUser=no-such-user-here\n", 3, "no such user"),
        ("[Model]\nCommand=x\nUser=Bad User\n", 3, "valid user name"),
        (f"[Model]\nCommand=x\nUser={ME}\nPriority=high\n", 4, "whole number"),
        (f"[Model]\nCommand=x\nUser={ME}\nPort=70000\n", 4, "out of range"),
        (f"[Model]\nCommand=x\nUser={ME}\nIdleFreezeSec=-3\n", 4, "out of range"),
        (f"[Model]\nCommand=x\nUser={ME}\nAgent=maybe\n", 4, "yes or no"),
        (f"[Model]\nCommand=x\nUser={ME}\nGpuMemory=lots\n", 4, "not a size"),
        (f"[Model]\nCommand=x\nUser={ME}\nGpus=0;rm\n", 4, "GPUs are named"),
        (f"[Model]\nCommand=x\nUser={ME}\nEnvironment=1A=x\n", 4, "NAME=value"),
        (f"[Model]\nCommand=x\nUser={ME}\nWorkingDirectory=srv\n", 4, "absolute path"),
        (f"[Model]\nCommand=x\nUser={ME}\nDescription=a\u202eb\n", 4, "printable"),
        (f"[Model]\nCommand=x\nUser={ME}\nListenAddress=example.com\n", 4, "IP address"),
        (f"[Model]\nCommand=x\nUser={ME}\nAliases=ok ../etc\n", 4, "not a model name"),
        (f"[Model]\nCommand=x\nUser={ME}\nAliases=llama\n", 4, "names the model itself"),
        (f"[Model]\nCommand=x\nUser={ME}\nPort=8000\n", 4, "Port needs BackendPort"),
        (f"[Model]\nCommand=x\nUser={ME}\nBackendPort=1\nListenAddress=127.0.0.1\n", 5, "need Port"),
        (f"[Model]\nCommand=x\nUser={ME}\nCommand=a \\\n", 4, "ends with a backslash"),
    ],
)
def test_a_bad_file_is_refused_naming_the_line(text: str, line: int, says: str) -> None:
    error = refusal(text)
    assert error.line == line and says in str(error), (error.line, str(error))


def test_a_backend_port_alone_is_what_the_front_door_needs() -> None:
    assert parse(f"[Model]\nCommand=x\nUser={ME}\nBackendPort=9001\n").options.backend_port == 9001


def write(directory: Path, name: str, text: str, mode: int = 0o644) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.conf"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """/etc/gpusched/models.d and /usr/lib/gpusched/models.d, in that order, owned by the test's user."""
    return tmp_path / "etc", tmp_path / "usr"


def read(dirs: tuple[Path, Path]) -> catalog.Catalog:
    return catalog.read(tuple(map(str, dirs)), UID)


def model_text(command: str = "sleep 100", extra: str = "") -> str:
    return f"[Model]\nCommand={command}\nUser={ME}\n{extra}"


def test_etc_masks_usr_lib_and_dev_null_masks_without_replacing(dirs: tuple[Path, Path]) -> None:
    etc, usr = dirs
    write(usr, "a", model_text("vendor a"))
    write(etc, "a", model_text("admin a"))
    write(usr, "b", model_text("vendor b"))
    etc.mkdir(exist_ok=True)
    (etc / "b.conf").symlink_to("/dev/null")
    write(usr, "c", model_text("vendor c"))
    write(usr, ".hidden", model_text())
    (usr / "notes.txt").write_text("not a catalog file")
    found = read(dirs)
    assert found.errors == []
    assert {name: e.argv[0] for name, e in found.entries.items()} == {"a": "admin", "c": "vendor"}
    assert found.entries["a"].path == str(etc / "a.conf")


def test_a_bad_file_is_one_error_and_the_rest_load(dirs: tuple[Path, Path]) -> None:
    etc, usr = dirs
    write(etc, "good", model_text())
    bad = write(etc, "bad", model_text(extra="Gpus=zero\n"))
    write(etc, "bad name!\nforged line", model_text())
    writable = write(usr, "writable", model_text(), mode=0o666)
    write(usr, "clash", model_text(extra="Aliases=good\n"))
    found = read(dirs)
    assert list(found.entries) == ["good"]
    assert len(found.errors) == 4
    assert any(e.startswith(f"{bad}:4: Gpus=zero: GPUs are named") for e in found.errors)
    assert all(e.endswith("; the file is ignored") for e in found.errors)
    assert any(e.startswith(f"{etc}/bad name!\\nforged line.conf: ") for e in found.errors)
    assert not any("\n" in e for e in found.errors)
    assert any(e.startswith(f"{writable}: must be owned by uid {UID} and writable by it alone") for e in found.errors)
    assert any("Aliases=good: already the name or an alias" in e for e in found.errors)


def test_files_of_another_user_or_in_an_open_directory_are_not_read(dirs: tuple[Path, Path]) -> None:
    etc, usr = dirs
    write(etc, "a", model_text())
    write(usr, "b", model_text())
    usr.chmod(0o777)
    found = catalog.read(tuple(map(str, dirs)), UID)
    assert list(found.entries) == ["a"]
    assert found.errors == [f"{usr}: must be owned by uid {UID} and writable by it alone (it is uid {UID}, mode 0777)"
                            ": the directory is ignored"]  # fmt: skip
    other = catalog.read((str(etc),), UID + 1)
    assert other.entries == {} and "must be owned by uid" in other.errors[0]


# ------------------------------------------------------------------------------------------------- in the engine


@pytest.fixture
async def cat(dirs: tuple[Path, Path], units: FakeUnits, rec: Recorder) -> Engine:
    """A started engine whose catalog is `dirs`."""
    engine, _ = make_engine(units, recorder=rec)
    engine.catalog_dirs, engine.catalog_owner = tuple(map(str, dirs)), UID
    await engine.start()
    return engine


async def test_catalog_models_are_listed_stopped_and_started_as_their_file_says(
    cat: Engine, dirs: tuple[Path, Path], units: FakeUnits, rec: Recorder
) -> None:
    write(dirs[0], "llama", model_text("serve --port 9001", "BackendPort=9001\nAliases=l3\nEnvironment=A=1\n"))
    await cat.reload_catalog()
    listed = cat.get("llama")
    assert listed.state == State.STOPPED and listed.catalog_digest and listed.aliases == ["l3"]
    assert (listed.owner, listed.backend_port, listed.main_pid) == (UID, 9001, 0) and units.specs == {}
    model = await cat.start_catalog("llama", Requester(UID))
    spec = units.specs["gpusched-model@llama.service"]
    assert spec.argv == ["serve", "--port", "9001"] and spec.user == ME and spec.environment == ["A=1"]
    assert model.state == State.RUNNING and model.catalog_digest == listed.catalog_digest and model.aliases == ["l3"]
    assert await cat.start_catalog("llama", Requester(UID)) is model  # running: nothing to do
    assert units.calls.count(("start", "gpusched-model@llama.service")) == 1
    assert rec.kinds() == [EventKind.RUN]


async def test_start_refuses_what_is_not_the_catalogs(cat: Engine) -> None:
    with pytest.raises(NoSuchModel):
        await cat.start_catalog("nothing", DAEMON)
    await cat.run("mine", ["sleep", "1"], RunOptions(), UID)
    with pytest.raises(NoSuchModel):
        await cat.start_catalog("mine", DAEMON)


async def test_the_catalogs_names_are_not_free_for_run(cat: Engine, dirs: tuple[Path, Path]) -> None:
    write(dirs[0], "llama", model_text())
    await cat.reload_catalog()
    with pytest.raises(ModelExists, match="model catalog"):
        await cat.run("llama", ["evil"], RunOptions(), UID)
    assert cat.get("llama").state == State.STOPPED and cat.get("llama").command == ["sleep", "100"]


async def test_a_start_that_fails_leaves_it_listed(cat: Engine, dirs: tuple[Path, Path], units: FakeUnits) -> None:
    write(dirs[0], "llama", model_text())
    await cat.reload_catalog()
    units.fail["start"] = "gpusched-model@llama.service"
    with pytest.raises(UnitFailed):
        await cat.start_catalog("llama", DAEMON)
    assert cat.get("llama").state == State.STOPPED and cat.get("llama").catalog_digest


async def test_reload_adds_updates_and_removes(
    cat: Engine, dirs: tuple[Path, Path], units: FakeUnits, rec: Recorder
) -> None:
    etc, _usr = dirs
    write(etc, "a", model_text("a1"))
    write(etc, "b", model_text("b1"))
    write(etc, "c", model_text("c1"))
    await cat.reload_catalog()
    await cat.start_catalog("b", DAEMON)
    running = cat.get("b")
    write(etc, "a", model_text("a2"))
    write(etc, "b", model_text("b2"))
    (etc / "c.conf").unlink()
    write(etc, "d", model_text("d1"))
    await cat.reload_catalog()
    assert cat.get("a").command == ["a2"] and cat.get("a").state == State.STOPPED
    assert cat.get("b") is running and running.command == ["b1"]  # runs with its old definition
    assert "c" not in cat.models and cat.get("d").state == State.STOPPED
    assert [r for r in rec.reasons() if r[0] == EventKind.FORGET] == [(EventKind.FORGET, "c", "catalog")]
    # once it stops, it is listed as the file now says
    await cat.stop("b")
    await cat.drain(5)
    assert cat.get("b") is not running and cat.get("b").command == ["b2"] and cat.get("b").state == State.STOPPED
    # a running model whose file is gone leaves the catalog when it ends
    await cat.start_catalog("d", DAEMON)
    (etc / "d.conf").unlink()
    await cat.reload_catalog()
    assert cat.get("d").state == State.RUNNING
    units.exit("gpusched-model@d.service", "exit-code")
    await cat.drain(5)
    assert "d" not in cat.models


async def test_an_ended_catalog_model_stays_listed_with_its_exit_and_starts_again(
    cat: Engine, dirs: tuple[Path, Path], units: FakeUnits
) -> None:
    cat.config.ended_model_ttl_sec = 1
    write(dirs[0], "llama", model_text())
    await cat.reload_catalog()
    await cat.start_catalog("llama", DAEMON)
    units.exit("gpusched-model@llama.service", "exit-code")
    await cat.drain(5)
    assert cat.get("llama").state == State.FAILED
    cat.now_usec = lambda: cat.get("llama").state_change_usec + 10_000_000  # past EndedModelTTLSec=
    await cat.apply_policies()
    assert cat.get("llama").state == State.FAILED
    assert (await cat.start_catalog("llama", DAEMON)).state == State.RUNNING


async def test_forget_of_a_catalog_model_only_once_it_ended_until_the_next_reload(
    cat: Engine, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], "llama", model_text())
    await cat.reload_catalog()
    await cat.start_catalog("llama", DAEMON)
    with pytest.raises(InvalidState):
        await cat.forget("llama")
    await cat.stop("llama")
    await cat.drain(5)
    await cat.forget("llama")
    assert "llama" not in cat.models
    await cat.reload_catalog()
    assert cat.get("llama").state == State.STOPPED


async def test_the_daemons_idle_freeze_is_not_a_catalog_models_but_its_files_is(
    cat: Engine, dirs: tuple[Path, Path]
) -> None:
    cat.config.idle_freeze_sec = 60
    write(dirs[0], "routed", model_text())
    write(dirs[0], "own", model_text(extra="IdleFreezeSec=30\n"))
    await cat.reload_catalog()
    ran = await cat.run("ran", ["sleep", "1"], RunOptions(), UID)
    assert (cat.idle_limit(cat.get("routed")), cat.idle_limit(cat.get("own")), cat.idle_limit(ran)) == (0, 30, 60)
    started = await cat.start_catalog("routed", DAEMON)
    assert cat.idle_limit(started) == 0


async def test_preload_starts_what_does_not_run(cat: Engine, dirs: tuple[Path, Path], units: FakeUnits) -> None:
    write(dirs[0], "warm", model_text(extra="Preload=yes\n"))
    write(dirs[0], "cold", model_text())
    write(dirs[0], "broken", model_text(extra="Preload=yes\n"))
    await cat.reload_catalog()
    units.fail["start"] = "gpusched-model@broken.service"
    await cat.preload_catalog()
    assert cat.get("warm").state == State.RUNNING and cat.get("cold").state == State.STOPPED
    assert cat.get("broken").state == State.STOPPED


async def test_a_running_catalog_model_is_still_the_catalogs_after_a_restart(
    tmp_path: Path, dirs: tuple[Path, Path], units: FakeUnits
) -> None:
    write(dirs[0], "llama", model_text(extra="Aliases=l3\n"))
    write(dirs[0], "idle", model_text())
    state = StateFile(str(tmp_path / "models.json"))
    first, _ = make_engine(units, state_file=state)
    first.catalog_dirs, first.catalog_owner = tuple(map(str, dirs)), UID
    await first.start()
    await first.reload_catalog()
    await first.start_catalog("llama", DAEMON)
    second, rec = make_engine(units, state_file=StateFile(state.path))
    second.catalog_dirs, second.catalog_owner = tuple(map(str, dirs)), UID
    await second.start()
    await second.reload_catalog()
    taken = second.get("llama")
    assert taken.state == State.RUNNING and taken.main_pid == first.get("llama").main_pid
    assert taken.catalog_digest == first.get("llama").catalog_digest and taken.aliases == ["l3"]
    assert second.get("idle").state == State.STOPPED and rec.kinds() == []


async def test_catalog_models_do_not_count_against_their_users_limits(
    dirs: tuple[Path, Path], units: FakeUnits
) -> None:
    """The catalog is the admin's: its models (here two, of user nobody) leave nobody's MaxModelsPerUser=1 free."""
    nobody = pwd.getpwnam("nobody")
    engine, _ = make_engine(units, config=Config(ram_budget_bytes=1 << 30, max_models_per_user=1))
    engine.catalog_dirs, engine.catalog_owner = tuple(map(str, dirs)), UID
    await engine.start()
    for name in ("a", "b"):
        write(dirs[0], name, "[Model]\nCommand=sleep 100\nUser=nobody\n")
    await engine.reload_catalog()
    await engine.start_catalog("a", DAEMON)
    await engine.start_catalog("b", DAEMON)
    assert engine.get("b").owner == nobody.pw_uid and units.specs["gpusched-model@b.service"].user == "nobody"
    await engine.run("own", ["sleep", "1"], RunOptions(), nobody.pw_uid)


def test_the_shipped_example_parses() -> None:
    """examples/models.d/qwen.conf, with its user (llm) replaced by one this host has."""
    example = Path(__file__).resolve().parents[2] / "examples" / "models.d" / "qwen.conf"
    entry = catalog.parse("qwen", str(example), example.read_text().replace("User=llm", f"User={ME}"))
    assert entry.argv[:3] == ["/opt/vllm/bin/vllm", "serve", "Qwen/Qwen2.5-7B-Instruct"] and entry.argv[-1] == "0.45"
    assert entry.options.backend_port == 9001 and entry.options.gpu_memory == 20 << 30 and entry.preload
    assert entry.aliases == ["qwen2.5", "qwen-7b"] and entry.options.environment[-1] == "VLLM_LOGGING_LEVEL=WARNING"


async def test_a_model_someone_ran_under_a_new_catalog_name_gives_way_once_it_ends(
    cat: Engine, dirs: tuple[Path, Path], rec: Recorder
) -> None:
    await cat.run("llama", ["mine"], RunOptions(), UID)
    write(dirs[0], "llama", model_text())
    await cat.reload_catalog()
    assert not cat.get("llama").catalog_digest and cat.get("llama").state == State.RUNNING
    await cat.stop("llama")
    await cat.drain(5)
    assert cat.get("llama").catalog_digest and cat.get("llama").command == ["sleep", "100"]
    assert cat.get("llama").state == State.STOPPED
    assert (EventKind.FORGET, "llama", "catalog") in rec.reasons()
