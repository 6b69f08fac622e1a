"""Session fixtures: tiny real-class models, built once per test session and loaded via ``from_pretrained``."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_report_header(config):
    """The resolved versions of the packages behind most upstream breaks, at the top of every run (``.ci/run``
    sets MTFLOW_PRINT_VERSIONS so the table shows under ``-q`` too: a red CI log then says what was resolved)."""
    from mtflow.environment import version_table

    return ["resolved packages:", *version_table().splitlines()]


def pytest_sessionstart(session):
    if os.environ.get("MTFLOW_PRINT_VERSIONS") and session.config.get_verbosity() < 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            for line in pytest_report_header(session.config):
                reporter.write_line(line)


@pytest.fixture(autouse=True)
def _no_global_seed_from_earlier_tests(monkeypatch):
    """A module's seed=None follows seed_everything (mtflow.seeding); one test's seed must not leak into the next."""
    from mtflow.seeding import GLOBAL_SEED_VARIABLE

    monkeypatch.delenv(GLOBAL_SEED_VARIABLE, raising=False)


@pytest.fixture(scope="session")
def tiny_kontext_path(tmp_path_factory):
    """Folder holding a tiny ``FluxKontextPipeline`` saved with ``save_pretrained``."""
    from mtflow.testing.tiny_kontext import build_tiny_kontext

    return build_tiny_kontext(tmp_path_factory.mktemp("models") / "tiny-kontext", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3vl_path(tmp_path_factory):
    """Folder holding a tiny ``Qwen3VLForConditionalGeneration`` + processor saved with ``save_pretrained``."""
    from mtflow.testing.tiny_qwen3vl import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("models") / "tiny-qwen3vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_image_edit_path(tmp_path_factory):
    """Folder holding a tiny ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509 layout) saved with
    ``save_pretrained``."""
    from mtflow.testing.tiny_qwen_image_edit import build_tiny_qwen_image_edit

    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("models") / "tiny-qwen-image-edit", seed=0)


@pytest.fixture(scope="session")
def tiny_flux2_klein_path(tmp_path_factory):
    """Folder holding a tiny ``Flux2KleinPipeline`` (a guided -base model) saved with ``save_pretrained``."""
    from mtflow.testing.tiny_flux2_klein import build_tiny_flux2_klein

    return build_tiny_flux2_klein(tmp_path_factory.mktemp("models") / "tiny-flux2-klein", seed=0)
