"""The config file, the environment and the flags of ``dxa`` (agent/cli/settings.py): no event loop, no sockets.

What a user sees: which value wins (default < file < environment < flag), that a typo or a
wrong type in the file stops every command with exit status 2 and a message naming the file,
section and key, what ``dxa config`` prints, and that contrib/config.example.toml and the
flags cannot drift from the table of settings.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from agent.cli.main import EXIT_USAGE, _settings, _transfer_options, build_parser, main
from agent.cli.settings import ONE_SHOT, SECTIONS, SETTINGS, load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "contrib" / "config.example.toml"
# the commands defined in agent/cli/main.py and the section each one reads (identity: all of them)
COMMANDS = {("init",): "init", ("serve",): "serve", ("cp",): "cp", ("bench",): "bench",
            ("controller", "serve"): "controller"}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("DXA_HOME", str(h))
    for s in SETTINGS:  # a DXA_* variable of the machine running the tests must not leak in
        if s.env:
            monkeypatch.delenv(s.env, raising=False)
    return h


def shown(capsys, *args: str) -> dict:
    assert main(["config", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)["settings"]


def test_file_then_environment_then_flag(home, monkeypatch, capsys):
    (home / "config.toml").write_text('[cp]\nstreams = 3\nchunk_size = "8M"\nno_encrypt = true\n'
                                      '[serve]\nlisten = "0.0.0.0:7400"\nfsync = true\n')
    cp = shown(capsys, "cp")["cp"]
    assert cp["streams"] == {"value": 3, "source": "file", "origin": str(home / "config.toml")}
    assert cp["chunk_size"]["value"] == "8M" and cp["no_encrypt"]["value"] is True
    assert cp["compress"] == {"value": "auto", "source": "default", "origin": None}

    monkeypatch.setenv("DXA_STREAMS", "5")
    monkeypatch.setenv("DXA_NO_ENCRYPT", "0")
    monkeypatch.setenv("DXA_FSYNC", "no")
    settings = shown(capsys)
    assert settings["cp"]["streams"] == {"value": 5, "source": "env", "origin": "DXA_STREAMS"}
    assert settings["cp"]["no_encrypt"]["value"] is False
    assert settings["serve"]["fsync"] == {"value": False, "source": "env", "origin": "DXA_FSYNC"}
    assert settings["serve"]["listen"]["source"] == "file"

    args = build_parser().parse_args(["cp", "-P", "7", "--no-encrypt", "--chunk-size", "1M", "a", "dxa://h:1/b"])
    opts = _transfer_options(args, _settings(args, "cp"))
    assert (opts.streams, opts.encrypt, opts.chunk_size) == (7, False, 1 << 20)  # flags win over env and file
    args = build_parser().parse_args(["cp", "a", "dxa://h:1/b"])
    opts = _transfer_options(args, _settings(args, "cp"))
    assert (opts.streams, opts.encrypt, opts.chunk_size) == (5, True, 8 << 20)   # env, env, file

    monkeypatch.delenv("DXA_NO_ENCRYPT")
    args = build_parser().parse_args(["cp", "a", "dxa://h:1/b"])
    assert not _transfer_options(args, _settings(args, "cp")).encrypt            # the file's no_encrypt
    args = build_parser().parse_args(["cp", "--encrypt", "a", "dxa://h:1/b"])
    assert _transfer_options(args, _settings(args, "cp")).encrypt                # ... and the flag undoing it
    args = build_parser().parse_args(["serve", "--fsync"])
    assert _settings(args, "serve").fsync is True                                # over DXA_FSYNC=no


def test_controller_admins_from_file_env_and_repeated_flags(home, monkeypatch, capsys):
    (home / "config.toml").write_text('[controller]\nadmins = ["ops"]\nlease_timeout = 12\n')
    ctl = shown(capsys, "controller")["controller"]
    assert ctl["admins"]["value"] == ["ops"] and ctl["lease_timeout"]["value"] == 12.0
    monkeypatch.setenv("DXA_CONTROLLER_ADMINS", "ops, noc")
    assert shown(capsys, "controller")["controller"]["admins"]["value"] == ["ops", "noc"]
    args = build_parser().parse_args(["controller", "serve", "--admin", "alice", "--admin", "bob"])
    assert _settings(args, "controller").admins == ["alice", "bob"]              # the flags replace the list


def test_commands_take_their_required_settings_from_the_file(home, tmp_path, capsys):
    (home / "config.toml").write_text('[controller]\nlisten = "nonsense"\n')
    assert main(["controller", "serve"]) == EXIT_USAGE
    assert "needs --topology (or topology = ... in [controller]" in capsys.readouterr().err
    (home / "config.toml").write_text(f'[controller]\nlisten = "nonsense"\ntopology = "t.toml"\n'
                                      f'state = "{tmp_path / "s.db"}"\n')
    assert main(["controller", "serve"]) == EXIT_USAGE
    assert "--listen wants HOST:PORT, got 'nonsense'" in capsys.readouterr().err
    (home / "config.toml").write_text(f'[serve]\nroot = "{tmp_path}"\nlisten = "no-port"\n')
    assert main(["serve"]) == EXIT_USAGE
    assert "--listen wants HOST:PORT, got 'no-port'" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("[srve]\nroot = '/srv'\n", r"unknown section \[srve\] \(did you mean 'serve'\?\)"),
    ("[cp]\nstreems = 8\n", r"\[cp\] unknown key 'streems' \(did you mean 'streams'\?\)"),
    ("[serve]\nrot = '/srv'\n", r"\[serve\] unknown key 'rot' \(did you mean 'root'\?\)"),
    ("streams = 8\n", r"'streams' is outside any section"),
    ("[cp]\nstreams = '8'\n", r"\[cp\] streams: expected a whole number, got '8'"),
    ("[cp]\nstreams = true\n", r"\[cp\] streams: expected a whole number, got True"),
    ("[serve]\nfsync = 'yes'\n", r"\[serve\] fsync: expected true or false, got 'yes'"),
    ("[cp]\nchunk_size = '8Q'\n", r"\[cp\] chunk_size: not a size: '8Q'"),
    ("[cp]\ncompress = 'lz4'\n", r"\[cp\] compress: expected one of auto, off, zstd, got 'lz4'"),
    ("[controller]\nadmins = 'ops'\n", r"\[controller\] admins: expected a list of strings, got 'ops'"),
    ("[serve]\ncapacity = -1\n", r"\[serve\] capacity: expected a rate .*, zero or more, got -1"),
    ("[cp\n", r"config.toml: "),
])
def test_a_bad_file_stops_every_command_naming_file_section_and_key(home, capsys, text, message):
    (home / "config.toml").write_text(text)
    for argv in (["config"], ["cp", "a", "dxa://127.0.0.1:1/b"], ["init"]):
        assert main(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert str(home / "config.toml") in err
    assert not (home / "ca.pem").exists()  # dxa init did nothing


def test_bad_environment_and_flag_values_name_their_origin(home, monkeypatch, capsys):
    monkeypatch.setenv("DXA_STREAMS", "many")
    assert main(["cp", "a", "dxa://127.0.0.1:1/b"]) == EXIT_USAGE
    assert "environment DXA_STREAMS: expected a whole number, got 'many'" in capsys.readouterr().err
    monkeypatch.delenv("DXA_STREAMS")
    assert main(["cp", "--rate", "fast", "a", "dxa://127.0.0.1:1/b"]) == EXIT_USAGE
    assert "--rate: not a rate: 'fast'" in capsys.readouterr().err


def test_a_named_config_file_must_exist(home, tmp_path, capsys):
    assert main(["config", "--config", str(tmp_path / "nope.toml")]) == EXIT_USAGE
    assert "nope.toml: config file not found" in capsys.readouterr().err
    assert main(["config"]) == 0  # $DXA_HOME/config.toml is optional
    assert "(none)" in capsys.readouterr().out


def test_dxa_config_table_and_json(home, monkeypatch, capsys):
    cfg = home / "elsewhere.toml"
    cfg.write_text('[bench]\nseconds = 2.5\n[identity]\nca = "/etc/dxa/ca.pem"\n')
    monkeypatch.setenv("DXA_CIPHER", "chacha20poly1305")
    assert main(["config", "--config", str(cfg), "bench", "identity"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"config file: {cfg}"
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines()[2:]}
    assert rows[("bench", "seconds")] == ["2.5", "file"]
    assert rows[("bench", "cipher")] == ["chacha20poly1305", "env", "DXA_CIPHER"]
    assert rows[("bench", "fsync")] == ["false", "default"]
    assert rows[("identity", "cert")] == ["-", "default"]
    assert {section for section, _ in rows} == {"bench", "identity"}

    assert main(["config", "--config", str(cfg), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"] == str(cfg)
    assert list(doc["settings"]) == list(SECTIONS)
    assert doc["settings"]["identity"]["ca"] == {"value": "/etc/dxa/ca.pem", "source": "file", "origin": str(cfg)}
    assert main(["config", "srve"]) == EXIT_USAGE
    assert "no section 'srve' (did you mean 'serve'?)" in capsys.readouterr().err


def _uncommented(text: str) -> str:
    """The example with its ``#key = value`` lines switched on (prose comments are ``# ...``)."""
    return re.sub(r"(?m)^#(?=[a-z_]+ = )", "", text)


def test_the_example_file_loads_and_lists_every_key(tmp_path):
    assert load_config(str(EXAMPLE), explicit=True).path == str(EXAMPLE)  # as shipped: every key commented out
    full = tmp_path / "full.toml"
    full.write_text(_uncommented(EXAMPLE.read_text()))
    values = load_config(str(full), explicit=True).values
    assert {(section, key) for section, keys in values.items() for key in keys} == \
        {(s.section, s.key) for s in SETTINGS}
    assert values["controller"]["admins"] == ["ops"]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_flag_that_sets_a_value_has_a_key_and_every_key_a_flag():
    top = _subcommands(build_parser())
    for path, section in COMMANDS.items():
        parser = top[path[0]] if len(path) == 1 else _subcommands(top[path[0]])[path[1]]
        dests = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
        keys = {s.key for s in SETTINGS if s.section in (section, "identity")}
        assert not dests - keys - set(ONE_SHOT), f"dxa {' '.join(path)}: flags without a key"
        assert keys <= dests, f"dxa {' '.join(path)}: keys without a flag: {keys - dests}"
        for action in parser._actions:  # None: "not given", so the file and the environment can speak
            if action.dest in keys:
                assert action.default is None, f"dxa {' '.join(path)} {action.option_strings}: default must be None"
    assert {s.section for s in SETTINGS} == set(COMMANDS.values()) | {"identity"}


def test_the_table_defaults_are_the_library_defaults(home):
    from agent.config import TransferOptions

    args = build_parser().parse_args(["bench", "dxa://h:1"])
    assert _transfer_options(args, _settings(args, "bench")) == TransferOptions()
    args = build_parser().parse_args(["cp", "--ack-timeout", "0", "a", "dxa://h:1/b"])
    assert _transfer_options(args, _settings(args, "cp")).ack_timeout == 0


def test_the_readme_example_is_a_valid_config(tmp_path):
    section = (REPO / "README.md").read_text().split("### Configuration", 1)[1]
    snippet = tmp_path / "readme.toml"
    snippet.write_text(section.split("```toml\n", 1)[1].split("```", 1)[0])
    assert load_config(str(snippet), explicit=True).values["controller"]["admins"] == ["ops"]


def test_dxa_init_takes_the_node_name_from_the_file(home, capsys):
    (home / "config.toml").write_text('[init]\nname = "gw9"\n')
    assert main(["init", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "gw9"
    assert main(["init", "--json", "--home", str(home / "other"), "--name", "gw10"]) == 0  # no config.toml there
    assert json.loads(capsys.readouterr().out)["name"] == "gw10"


def test_site_or_capacity_without_a_controller_is_an_error(home, tmp_path, capsys):
    assert main(["serve", "--root", str(tmp_path / "r"), "--site", "geneva"]) == 2
    assert "--controller" in capsys.readouterr().err


# -- start-up: what building the parser and dxa cp import (no timing: which modules) ---------
def _new_modules(code: str, tmp_path) -> list[str]:
    """Run ``code`` in a fresh interpreter; the modules it imported (not those of start-up)."""
    import os
    import subprocess
    import sys

    script = ("import sys\nbefore = set(sys.modules)\n" + code +
              "\nprint('\\n'.join(sorted(set(sys.modules) - before)))\n")
    env = dict(os.environ, DXA_HOME=str(tmp_path / "empty-home"))  # no identity: dxa cp stops before connecting
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return out.split()


def test_building_the_parser_imports_no_command(tmp_path):
    new = _new_modules("import agent.cli.main as m\nm.build_parser()", tmp_path)
    assert "agent.cli.main" in new
    heavy = ("controller_stub", "asyncio", "json", "grpc", "cryptography", "agent.aio", "agent.service",
             "agent.store", "agent.wire", "agent.config")
    assert not [m for m in new if m.startswith(heavy)]


def test_dxa_cp_does_not_import_the_scheduler(tmp_path):
    new = _new_modules("import agent.cli.main as m\nassert m.main(['cp', 'a', 'dxa://127.0.0.1:1/b']) == 2",
                       tmp_path)
    assert "agent.aio.client" in new  # cp got as far as loading the identity (refused: there is none)
    assert not [m for m in new if m.startswith(("controller_stub", "agent.aio.bench", "agent.service"))]


def test_the_cli_state_choices_are_the_reservation_states():
    from agent.cli.controller import STATES
    from controller_stub.ledger import State

    assert STATES == tuple(s.value for s in State)
