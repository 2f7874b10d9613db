"""One source for choices and defaults: the CLI's defaults are the dataclasses' and the functions' own,
and the choice tuples the CLI checks before torch loads are the ones the learner checks."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import click
import typer
from typer.testing import CliRunner

from conftest import BLOCK_TORCH

ROOT = Path(__file__).resolve().parent.parent


def _defaults(command: str) -> dict:
    """{parameter name: default} of a `cgil` command as click sees it (what a user gets by leaving it out)."""
    from cli import app

    group = typer.main.get_command(app)
    cmd = group.get_command(click.Context(group), command)
    return {p.name: p.default for p in cmd.params}


def test_train_flags_default_to_the_train_config():
    from cgil.config import TrainConfig
    from cli import SAVED_FLAGS, _lookup

    saved = TrainConfig().to_dict()
    cli = _defaults("train")
    # None on the CLI means "the preset's value or the dataclass's"; device "auto" is resolved at run time
    typed = {flag: cli[flag] for flag in SAVED_FLAGS if cli[flag] is not None and flag != "device"}
    assert {"dataset", "model", "method", "seed", "generator"} <= set(typed)
    assert {flag: _lookup(saved, SAVED_FLAGS[flag]) for flag in typed} == typed


def test_update_flags_default_to_the_library_function():
    from export.update import update_from_images

    library = {k: p.default for k, p in inspect.signature(update_from_images).parameters.items()}
    cli = _defaults("update")
    for name in ("epochs", "lr", "passes", "seed", "store_precision", "device", "keep"):
        assert cli[name] == library[name], name


def test_serve_defaults_are_the_serve_config(monkeypatch, tmp_path):
    """`cgil serve BUNDLE` with no options builds exactly ServeConfig(BUNDLE) and listens where serve() would."""
    import runtime.server
    from runtime.server import ServeConfig, serve

    started = []
    monkeypatch.delenv("CGIL_ADMIN_TOKEN", raising=False)
    # serve() is replaced only to catch what the command hands it: the server itself is tested in test_serve.py
    monkeypatch.setattr(runtime.server, "serve", lambda cfg, host, port, log_level, on_ready=None: started.append((cfg, host, port)))
    from cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 0, result.output
    signature = inspect.signature(serve).parameters
    assert started == [(ServeConfig(tmp_path), signature["host"].default, signature["port"].default)]


def test_the_cli_checks_the_learners_choices():
    from cgil import choices, config, train
    from cgil.generators import GENERATORS, mog, vae
    from cli import MOG_ESTEPS, TRAIN_METHODS, VAE_OBJECTIVES

    assert tuple(GENERATORS) == choices.GENERATOR_KINDS
    assert vae.VAE_OBJECTIVES is VAE_OBJECTIVES is choices.VAE_OBJECTIVES
    assert mog.MOG_ESTEPS is MOG_ESTEPS is choices.MOG_ESTEPS
    assert config.METHODS is train.METHODS is choices.METHODS and TRAIN_METHODS == (*choices.METHODS, "all")


def test_choices_load_and_refuse_a_typo_without_torch():
    script = BLOCK_TORCH + """
import cgil.choices
from typer.testing import CliRunner
from cli import app
r = CliRunner().invoke(app, ["train", "--mog-estep", "exakt"])
print(r.exit_code, r.output)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("2 ") and "unknown MoG E-step 'exakt' (did you mean 'exact'?)" in out.stdout
    assert "choose one of: exact, reference" in out.stdout
