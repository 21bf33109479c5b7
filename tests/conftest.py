import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFLENS_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


class TinyFolders:
    """folders["flux" | "flux-dev" | "sd3" | "pixart" | "dit"]: a tiny random diffusers pipeline
    (`difflens.models.tiny`), saved with `save_pretrained` on first use, once per test session."""

    def __init__(self, root_factory):
        self._root = root_factory
        self._made = {}

    def __getitem__(self, family: str):
        if family not in self._made:
            from difflens.models.tiny import save_tiny_pipeline

            self._made[family] = save_tiny_pipeline(family, self._root.mktemp(f"tiny_{family}") / family)
        return self._made[family]


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """The tiny random pipelines saved to folders (see TinyFolders), shared by every test module."""
    return TinyFolders(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_folder(tiny_folders):
    """tiny_folder("flux" | "sd3" | "pixart" | "dit"): a tiny random pipeline saved once per session."""
    return tiny_folders.__getitem__


@pytest.fixture
def hub_offline(monkeypatch):
    """No Hugging Face Hub access in this test, whatever the environment says."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
