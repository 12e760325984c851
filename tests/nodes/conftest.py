import pytest

from tests.nodes.stubs import install_comfy_api_stand_in, install_folder_paths

install_comfy_api_stand_in()  # before any test module imports the node classes


@pytest.fixture(autouse=True)
def folder_paths(monkeypatch, tmp_path):
    """ComfyUI's folder_paths, with output and temp folders in the test's tmp_path."""
    return install_folder_paths(monkeypatch, tmp_path)


@pytest.fixture(scope="session")
def comfyui_report(tmp_path_factory):
    """What every ComfyUI harness scenario reported (one ComfyUI subprocess per test session)."""
    from tests.nodes.comfyui_report import run_harness

    return run_harness(tmp_path_factory)
